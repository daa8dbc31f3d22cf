"""Decoded frames from a video file, a camera device or a network stream, on a reader thread.

``VideoSource(location)`` opens the location with OpenCV's ``VideoCapture`` (its FFmpeg backend
reads files, RTSP, HTTP and TCP/UDP MPEG-TS; a number is a camera device) and hands frames over
a bounded queue, numbered from 0 in decode order (the numbers go on across reconnects):

- **Files** are read as fast as the consumer takes them: when the queue is full the reader
  waits, so nothing is dropped (``realtime=True`` paces a file at its frame rate and drops
  instead, to stand in for a camera).
- **Live sources** (network streams and devices) never wait: a frame that finds the queue full
  is dropped and counted, so a slow consumer costs frames, never memory.
- A live source that fails (the server went away, a read timed out) is reopened with back-off
  (``RECONNECT_FIRST_S`` doubling up to ``RECONNECT_MAX_S``) until it has failed for
  ``reconnect_timeout_s`` in a row; then it ends with the reason. A file that cannot be opened
  ends at once with the reason; one that stops before the frame count its header announces is
  reported as truncated.

The queue holds ``DecodedFrame``s and, last, one ``SourceEnd`` saying why the source ended.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.lazy import require

DEFAULT_QUEUE_FRAMES = 8              # decoded frames held per source (a 1080p frame is 6 MiB)
DEFAULT_FPS = 25.0                    # when the source does not say (raw MJPEG, some cameras)
MAX_FPS = 1000.0                      # a larger CAP_PROP_FPS is a broken header, not a frame rate
OPEN_TIMEOUT_MS = 10_000              # FFmpeg's open and read timeouts for network sources
READ_TIMEOUT_MS = 10_000
RECONNECT_FIRST_S = 0.25
RECONNECT_MAX_S = 8.0
DEFAULT_RECONNECT_TIMEOUT_S = 60.0
LIVE_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "tcp://", "udp://", "rtp://", "srt://")
# OpenCV's FFmpeg backend takes its options from this variable; RTSP over TCP survives packet
# loss that UDP turns into broken frames. A value the user set is left alone.
FFMPEG_OPTIONS_VARIABLE = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
FFMPEG_OPTIONS = "rtsp_transport;tcp"


@dataclass(frozen=True)
class DecodedFrame:
    index: int                 # 0-based, in decode order, counting dropped frames too
    image: np.ndarray          # BGR uint8 [H, W, 3], as OpenCV decodes
    decode_cpu_s: float        # thread CPU time spent reading and decoding it


@dataclass(frozen=True)
class SourceEnd:
    frames: int                # frames decoded (delivered and dropped)
    error: Optional[str] = None  # why the source failed; None when it simply ended
    note: Optional[str] = None   # something the user should know (a truncated file)


def is_live(location: str) -> bool:
    """Network streams and camera devices are live; anything else is a file."""
    return location.lower().startswith(LIVE_PREFIXES) or location.isdigit() or location.startswith("/dev/video")


class VideoSource:
    """One stream's frames on a reader thread (``start``), through ``frames`` (a bounded queue)."""

    def __init__(self, location: Union[str, os.PathLike], *, queue_frames: int = DEFAULT_QUEUE_FRAMES,
                 realtime: bool = False, reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S,
                 name: Optional[str] = None):
        if queue_frames < 1:
            raise KeyreidError(f"queue_frames must be at least 1, got {queue_frames}")
        self.location = str(location)
        self.name = name or self.location
        self.live = is_live(self.location)
        self.drops = self.live or realtime          # a full queue drops instead of waiting
        self.realtime = realtime and not self.live
        self.reconnect_timeout_s = reconnect_timeout_s
        # One slot more than the frames, so the end marker always fits.
        self.frames: "queue.Queue[Union[DecodedFrame, SourceEnd]]" = queue.Queue(queue_frames + 1)
        self._queue_frames = queue_frames
        self.fps = DEFAULT_FPS
        self.fps_known = False
        self.decoded = 0
        self.dropped = 0
        self.reconnects = 0
        self.decode_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._opened = threading.Event()

    # --- life cycle -----------------------------------------------------------------------
    def start(self) -> "VideoSource":
        self._thread = threading.Thread(target=self._run, name=f"keyreid-source-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the reader to stop; it ends at its next frame (a network read may take up to its
        timeout, and the thread is a daemon so it never holds up the process)."""
        self._stop.set()

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_opened(self, timeout: float) -> bool:
        return self._opened.wait(timeout)

    # --- reading --------------------------------------------------------------------------
    def _open(self):
        cv2 = require("cv2")
        if self.location.isdigit():
            capture = cv2.VideoCapture(int(self.location))
        elif self.live:
            if self.location.lower().startswith(("rtsp://", "rtsps://")):
                os.environ.setdefault(FFMPEG_OPTIONS_VARIABLE, FFMPEG_OPTIONS)
            capture = cv2.VideoCapture(self.location, cv2.CAP_FFMPEG,
                                       [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS,
                                        cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS])
        else:
            if not os.path.isfile(self.location):
                raise KeyreidError(f"video file {self.location} does not exist")
            capture = cv2.VideoCapture(self.location, cv2.CAP_FFMPEG)
        if not capture.isOpened():
            capture.release()
            what = "open the stream" if self.live else "read the video file (not a video, or damaged)"
            raise KeyreidError(f"{self.name}: cannot {what}")
        fps = capture.get(cv2.CAP_PROP_FPS)
        if 0 < fps <= MAX_FPS:
            self.fps, self.fps_known = float(fps), True
        return capture

    def _put(self, item: Union[DecodedFrame, SourceEnd]) -> None:
        """Queue a frame: wait for room (files) or drop it when full (live, realtime)."""
        if isinstance(item, SourceEnd):
            while not self._stop.is_set():
                try:
                    self.frames.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue
            self._force_put(item)
            return
        if self.drops:
            if self.frames.qsize() >= self._queue_frames:
                self.dropped += 1
                return
            self.frames.put(item)
            return
        while not self._stop.is_set():
            if self.frames.qsize() < self._queue_frames:
                self.frames.put(item)
                return
            time.sleep(0.002)

    def _force_put(self, item: SourceEnd) -> None:
        """The end marker, even when stopping: make room by dropping a frame if needed."""
        while True:
            try:
                self.frames.put_nowait(item)
                return
            except queue.Full:
                try:
                    self.frames.get_nowait()
                except queue.Empty:
                    pass

    def _run(self) -> None:
        try:
            end = self._read_all()
        except KeyreidError as exc:
            end = SourceEnd(self.decoded, error=str(exc))
        except Exception as exc:      # OpenCV errors: the source ends with the reason, others go on
            end = SourceEnd(self.decoded, error=f"{self.name}: {type(exc).__name__}: {exc}")
        finally:
            self._opened.set()
        self._put(end)

    def _read_all(self) -> SourceEnd:
        cv2 = require("cv2")
        failing_since: Optional[float] = None
        delay = RECONNECT_FIRST_S
        last_error = ""
        started = None
        while not self._stop.is_set():
            try:
                capture = self._open()
            except KeyreidError as exc:
                if not self.live:
                    raise
                capture, last_error = None, str(exc)
            self._opened.set()
            if capture is not None:
                announced = capture.get(cv2.CAP_PROP_FRAME_COUNT) if not self.live else 0
                before = self.decoded
                started = started or time.monotonic()
                try:
                    self._read_frames(capture, started)
                finally:
                    capture.release()
                if self._stop.is_set():
                    break
                if not self.live:
                    read = self.decoded - before
                    note = None
                    if announced and announced > 0 and read < int(announced) - 1:
                        note = (f"{self.name}: the video ended after {read} of the {int(announced)} frames its "
                                "header announces (truncated or damaged)")
                    return SourceEnd(self.decoded, note=note)
                if self.decoded > before:       # it ran for a while: a fresh failure
                    failing_since, delay = None, RECONNECT_FIRST_S
                last_error = f"{self.name}: the stream stopped"
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since >= self.reconnect_timeout_s:
                return SourceEnd(self.decoded, error=f"{last_error}; gave up after {self.reconnect_timeout_s:g} s "
                                                     "of failed reconnects")
            self.reconnects += 1
            self._stop.wait(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
        return SourceEnd(self.decoded)

    def _read_frames(self, capture, started: float) -> None:
        while not self._stop.is_set():
            cpu = time.thread_time()
            ok, image = capture.read()
            cpu = time.thread_time() - cpu
            if not ok or image is None:
                return
            if image.ndim == 2:          # a grey camera: three equal channels, as decode_frame does
                image = np.repeat(image[:, :, None], 3, axis=2)
            index = self.decoded
            self.decoded += 1
            self.decode_cpu_s += cpu
            if self.realtime:            # a file standing in for a camera: frame i at i / fps
                wait = started + index / self.fps - time.monotonic()
                if wait > 0:
                    self._stop.wait(wait)
            self._put(DecodedFrame(index, image, cpu))
