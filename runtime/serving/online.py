"""Online encoder: per-track identity embeddings for a camera appliance, frame by frame.

A tracker hands over, for each frame, a person crop, that person's keypoints and a track id::

    with OnlineEncoder(open_engine("model.onnx"), color="bgr") as encoder:
        encoder.push(track_id, crop, keypoints, camera=0)     # returns at once
        encoder.feature(track_id)                              # the feature so far
        result = encoder.finish(track_id)                      # the final feature

Each track collects frames; every 4th frame completes a clip, which goes to a batched
``Runner`` at once, so clips of many tracks share engine batches. The track's feature is the
mean of its clip embeddings, over at most the first 41 clips, and ``finish`` fills the last
partial clip by cycling its own frames: exactly what ``infer.py --tracklets`` computes for the
same frames (docs/contract.md §4). Crops are resized to 256x128 as ``images.load_frame`` resizes
decoded files (Pillow's bilinear, bit for bit).

Memory is bounded by explicit limits: ``max_tracks`` live tracks; ``max_buffered_frames``
resized frames held at once (frames waiting for their clip plus frames of clips in the
engine's queue). When the engine falls behind, ``push`` waits for room up to
``busy_timeout_s`` and then raises ``EncoderBusy``, leaving the frame untaken and every track as
it was. Tracks idle for ``idle_timeout_s`` are finished by a background thread; their results
go to ``on_finished`` or wait in ``drain_finished()``.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Hashable, List, Literal, Optional

import numpy as np

from keyreid.contract import IMAGE_HEIGHT, IMAGE_WIDTH, MAX_CLIPS_PER_TRACKLET, NUM_KEYPOINTS
from keyreid.errors import KeyreidError
from keyreid.contract import checked_camera
from keyreid.runtime.backends.base import Engine
from keyreid.runtime.inputs.images import resize_like_pil
from keyreid.runtime.serving.pipeline import describe_failure
from keyreid.runtime.inputs.poses import no_joints
from keyreid.runtime.serving.runner import Runner, tracklet_feature
from keyreid.runtime.inputs.tracklets import split_into_clips

_log = logging.getLogger(__name__)

ColorOrder = Literal["rgb", "bgr"]
# Larger crops than this are refused rather than resized: a tracker never hands over a person
# crop of 64 megapixels, and resizing one would stall every other track.
MAX_CROP_PIXELS = 8192 * 8192


class EncoderBusy(KeyreidError):
    """The engine is behind: ``max_buffered_frames`` are held and none freed in time."""


@dataclass
class TrackResult:
    """A finished track: its feature (None if it failed) and what it was built from."""
    track_id: Hashable
    camera: int
    feature: Optional[np.ndarray]      # [E] float32, mean of the clip embeddings
    num_frames: int                    # frames pushed (frames past the 41st clip are not used)
    num_clips: int
    first_timestamp: float
    last_timestamp: float
    error: Optional[str] = None        # why the feature is None


@dataclass
class _Track:
    camera: int
    first_timestamp: float
    last_timestamp: float
    last_push: float                                        # time.monotonic() of the last push
    frames: List[np.ndarray] = field(default_factory=list)  # resized frames not yet in a clip
    keypoints: List[np.ndarray] = field(default_factory=list)
    crop_sizes: List[tuple] = field(default_factory=list)
    clips: List[Future] = field(default_factory=list)      # one per submitted clip, in order
    num_frames: int = 0

    @property
    def full(self) -> bool:
        """True once the track has its 41 clips: later frames are not used (docs/contract.md §4)."""
        return len(self.clips) >= MAX_CLIPS_PER_TRACKLET


class OnlineEncoder:
    """Per-track embeddings from frames pushed one at a time, from any number of threads."""

    def __init__(self, engine: Engine, *, color: ColorOrder = "rgb", max_tracks: int = 256,
                 max_buffered_frames: int = 2048, busy_timeout_s: float = 5.0,
                 idle_timeout_s: Optional[float] = 10.0, on_finished: Optional[Callable[[TrackResult], None]] = None,
                 max_batch_size: Optional[int] = None, max_queue_delay_ms: float = 2.0):
        """
        Args:
            engine: the model to run (activated here if it is not active yet).
            color: channel order of the crops given to ``push``: "rgb", or "bgr" (OpenCV).
            max_tracks: most live tracks; a push that would start one more raises.
            max_buffered_frames: most resized frames held at once (about 96 KiB each). Must be
                at least 3 * max_tracks + 4, so that a finishing clip can always make room.
            busy_timeout_s: how long ``push`` waits for the engine to free room before it
                raises EncoderBusy (0: raise at once).
            idle_timeout_s: a track with no push for this long is finished in the background;
                None keeps tracks until ``finish``.
            on_finished: called (on the background thread) with each idle-finished track's
                TrackResult; without it they wait in ``drain_finished()``.
            max_batch_size, max_queue_delay_ms: the batched runner's settings.
        """
        if color not in ("rgb", "bgr"):
            raise KeyreidError(f"color must be 'rgb' or 'bgr', got {color!r}")
        if max_tracks < 1:
            raise KeyreidError(f"max_tracks must be at least 1, got {max_tracks}")
        if not busy_timeout_s >= 0:
            raise KeyreidError(f"busy_timeout_s must not be negative, got {busy_timeout_s}")
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise KeyreidError(f"idle_timeout_s must be positive or None, got {idle_timeout_s}")
        self.color = color
        self.max_tracks = max_tracks
        self.max_buffered_frames = max_buffered_frames
        self.busy_timeout_s = busy_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._on_finished = on_finished
        # Every clip in the runner holds at least one buffered frame (a last partial clip may hold
        # only one), so a queue of max_buffered_frames clips never fills: the frame limit rules.
        self._runner = Runner(engine, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                              max_queue_size=max_buffered_frames, block_when_full=False)
        clip_frames = engine.clip_frames          # the model file's clip length (active now)
        least_frames = (clip_frames - 1) * max_tracks + clip_frames
        if max_buffered_frames < least_frames:
            self._runner.close()
            raise KeyreidError(f"max_buffered_frames must be at least {clip_frames - 1} * max_tracks + "
                               f"{clip_frames} = {least_frames}, got {max_buffered_frames}")
        self._num_cameras = engine.num_cameras
        self._clip_frames = clip_frames
        # Re-entrant: a clip's done-callback may run at once, on the thread that submitted it.
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)     # buffered frames went down, or closing
        self._tracks: Dict[Hashable, _Track] = {}
        self._buffered_frames = 0
        self._finished: Deque[TrackResult] = deque(maxlen=max_tracks)
        self._closed = False
        self._stop_reaper = threading.Event()
        self._reaper = None
        if idle_timeout_s is not None:
            self._reaper = threading.Thread(target=self._reap_idle, name="keyreid-online-reaper", daemon=True)
            self._reaper.start()

    # --- input checks -------------------------------------------------------------------
    def _model_frame(self, frame: np.ndarray) -> tuple:
        """(RGB uint8 [256, 128, 3], (width, height)) from a crop, or a KeyreidError."""
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise KeyreidError(f"a crop is uint8 [height, width, 3] ({self.color.upper()}), "
                               f"got {frame.dtype} {list(frame.shape)}")
        height, width = frame.shape[:2]
        if height == 0 or width == 0:
            raise KeyreidError(f"the crop has zero size ({width}x{height} pixels)")
        if height * width > MAX_CROP_PIXELS:
            raise KeyreidError(f"the crop is {width}x{height} pixels, above the limit of {MAX_CROP_PIXELS}")
        if self.color == "bgr":
            frame = frame[:, :, ::-1]
        if (height, width) == (IMAGE_HEIGHT, IMAGE_WIDTH):
            return np.array(frame, dtype=np.uint8, order="C"), (width, height)    # a copy: the caller may reuse its buffer
        return resize_like_pil(np.ascontiguousarray(frame)), (width, height)

    @staticmethod
    def _keypoints(keypoints) -> np.ndarray:
        if keypoints is None:
            return no_joints()
        array = np.asarray(keypoints)
        if array.shape != (NUM_KEYPOINTS, 3) or array.dtype.kind not in "fiu":
            raise KeyreidError(f"keypoints must be a [{NUM_KEYPOINTS}, 3] array of numbers "
                               f"(x, y, confidence in crop pixels), got {array.dtype} {list(array.shape)}")
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise KeyreidError("keypoints contain NaN or infinity; give 0 confidence for undetected joints")
        return array

    # --- pushing frames -----------------------------------------------------------------
    def push(self, track_id: Hashable, frame: np.ndarray, keypoints: Optional[np.ndarray], camera: int,
             timestamp: Optional[float] = None) -> None:
        """Add one frame to ``track_id`` (starting the track if it is new).

        Args:
            frame: the person crop, uint8 [height, width, 3] in the encoder's ``color`` order,
                any size; it is copied, so the caller may reuse the buffer.
            keypoints: [17, 3] COCO (x, y, confidence) in crop pixels, or None (no joint seen).
            camera: 0-based camera index (or -1: an unseen camera); fixed for a track.
            timestamp: when the frame was taken (default: now, ``time.time()``).

        Returns once the frame is stored; a completed clip goes to the engine in the
        background. Bad input raises KeyreidError and leaves the track as it was.
        """
        model_frame, crop_size = self._model_frame(frame)
        joints = self._keypoints(keypoints)
        camera = checked_camera(camera, self._num_cameras)
        timestamp = time.time() if timestamp is None else float(timestamp)
        with self._lock:
            track = self._checked_track(track_id, camera)
            if track is None or not track.full:
                self._wait_for_room()
                track = self._checked_track(track_id, camera)   # it may have changed meanwhile
            if track is None:
                track = self._tracks[track_id] = _Track(camera, timestamp, timestamp, time.monotonic())
            track.num_frames += 1
            track.last_timestamp, track.last_push = timestamp, time.monotonic()
            if track.full:
                return
            track.frames.append(model_frame)
            track.keypoints.append(joints)
            track.crop_sizes.append(crop_size)
            self._buffered_frames += 1
            if len(track.frames) == self._clip_frames:
                self._submit_clip(track, list(range(self._clip_frames)))

    def _checked_track(self, track_id: Hashable, camera: int) -> Optional[_Track]:
        """The live track (None if new) after the checks a push makes (lock held)."""
        if self._closed:
            raise KeyreidError("the online encoder is closed")
        track = self._tracks.get(track_id)
        if track is None and len(self._tracks) >= self.max_tracks:
            raise KeyreidError(f"already {self.max_tracks} live tracks (max_tracks); finish some, "
                               "or lower idle_timeout_s so idle ones finish sooner")
        if track is not None and track.camera != camera:
            raise KeyreidError(f"track {track_id!r} is on camera {track.camera}, not {camera}; "
                               "a track belongs to one camera")
        return track

    def _wait_for_room(self) -> None:
        """Wait (lock held) until one more frame fits in ``max_buffered_frames``, or raise."""
        deadline = time.monotonic() + self.busy_timeout_s
        while self._buffered_frames >= self.max_buffered_frames:
            remaining = deadline - time.monotonic()
            if self._closed:
                raise KeyreidError("the online encoder was closed while the frame waited for room")
            if remaining <= 0:
                raise EncoderBusy(f"the engine is behind: {self._buffered_frames} frames are buffered "
                                  f"(max_buffered_frames) and none was freed within {self.busy_timeout_s} s; "
                                  "the frame was not taken")
            self._room.wait(remaining)

    def _submit_clip(self, track: _Track, order: List[int]) -> None:
        """Send the track's buffered frames as one clip (lock held). ``order`` picks the 4 frames
        (the buffer's own frames cycled for a last partial clip). The frames stay counted in
        ``_buffered_frames`` until the engine is done with them."""
        clip = {"frames": np.stack([track.frames[i] for i in order]),
                "keypoints": np.stack([track.keypoints[i] for i in order]),
                "crop_size": np.array([track.crop_sizes[i] for i in order], dtype=np.float32),
                "camera": track.camera}
        held = len(track.frames)
        track.frames, track.keypoints, track.crop_sizes = [], [], []
        future = self._runner.submit_clip(clip)     # never blocks: the runner's queue fits every held clip
        track.clips.append(future)
        future.add_done_callback(lambda _, count=held: self._release(count))

    def _release(self, count: int) -> None:
        with self._lock:
            self._buffered_frames -= count
            self._room.notify_all()

    # --- features -----------------------------------------------------------------------
    def _clip_feature(self, track_id: Hashable, clips: List[Future], timeout: Optional[float]) -> Optional[np.ndarray]:
        if not clips:
            return None
        try:
            embeddings = np.stack([future.result(timeout)["embedding"] for future in clips])
        except FutureTimeout:        # concurrent.futures has its own before Python 3.11
            raise KeyreidError(f"track {track_id!r}: the engine did not finish its clips within {timeout} s") from None
        except Exception as exc:        # the engine failed on one of the track's clips
            raise KeyreidError(f"track {track_id!r}: {describe_failure(exc)}") from exc
        return tracklet_feature(embeddings)

    def _track(self, track_id: Hashable) -> _Track:
        track = self._tracks.get(track_id)
        if track is None:
            raise KeyreidError(f"unknown track id {track_id!r} (never pushed, or already finished)")
        return track

    def feature(self, track_id: Hashable, timeout: Optional[float] = None) -> Optional[np.ndarray]:
        """The track's current feature: the mean of its complete clips' embeddings, [E] float32,
        waiting for clips still in the engine; None while the track has fewer than 4 frames."""
        with self._lock:
            clips = list(self._track(track_id).clips)
        return self._clip_feature(track_id, clips, timeout)

    def finish(self, track_id: Hashable, timeout: Optional[float] = None) -> TrackResult:
        """End the track: its last partial clip is completed by cycling its own frames, and the
        result holds the final feature (the same as ``infer.py --tracklets`` on these frames).
        The track id is free for reuse afterwards. An engine failure raises KeyreidError."""
        with self._lock:
            if self._closed:     # the runner is gone: the track's last clip could not be sent
                raise KeyreidError("the online encoder is closed; finish tracks before closing it")
            self._track(track_id)
            track = self._end(track_id)
        return self._result(track_id, track, timeout)

    def _end(self, track_id: Hashable) -> _Track:
        """Remove the track and send its last partial clip (lock held)."""
        track = self._tracks.pop(track_id)
        if track.frames:
            self._submit_clip(track, split_into_clips(len(track.frames), self._clip_frames)[0])
        return track

    def _result(self, track_id: Hashable, track: _Track, timeout: Optional[float]) -> TrackResult:
        feature = self._clip_feature(track_id, track.clips, timeout)
        return TrackResult(track_id, track.camera, feature, track.num_frames, len(track.clips),
                           track.first_timestamp, track.last_timestamp)

    @property
    def track_ids(self) -> List[Hashable]:
        with self._lock:
            return list(self._tracks)

    @property
    def buffered_frames(self) -> int:
        return self._buffered_frames

    # --- idle tracks --------------------------------------------------------------------
    def finish_idle(self, now: Optional[float] = None) -> List[TrackResult]:
        """Finish every track idle for ``idle_timeout_s`` (the background thread calls this);
        their results go to ``on_finished``, else to ``drain_finished()``, and are returned."""
        if self.idle_timeout_s is None:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = {track_id: self._end(track_id) for track_id, track in list(self._tracks.items())
                     if now - track.last_push >= self.idle_timeout_s}
        results = []
        for track_id, track in stale.items():
            try:
                result = self._result(track_id, track, timeout=None)
            except KeyreidError as exc:     # an engine failure: the track ends without a feature
                result = TrackResult(track_id, track.camera, None, track.num_frames, len(track.clips),
                                     track.first_timestamp, track.last_timestamp, error=str(exc))
            results.append(result)
            if self._on_finished is None:
                with self._lock:
                    self._finished.append(result)
                continue
            try:
                self._on_finished(result)
            except Exception:   # the caller's bug must not stop the other tracks being finished
                _log.exception("on_finished raised for track %r; the other idle tracks go on", track_id)
        return results

    def drain_finished(self) -> List[TrackResult]:
        """Results of tracks finished for idleness since the last call (without ``on_finished``;
        at most ``max_tracks`` are kept, oldest dropped first)."""
        with self._lock:
            results = list(self._finished)
            self._finished.clear()
        return results

    def _reap_idle(self) -> None:
        interval = min(self.idle_timeout_s / 4, 1.0)
        while not self._stop_reaper.wait(interval):
            self.finish_idle()

    # --- shutting down ------------------------------------------------------------------
    def close(self) -> None:
        """Stop taking frames, let clips in the engine finish and stop the threads. Tracks not
        yet finished are dropped; finish them first to keep their features."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()
        self._stop_reaper.set()
        # on_finished may call close() from the reaper thread itself, which cannot join itself.
        if self._reaper is not None and self._reaper is not threading.current_thread():
            self._reaper.join()
        self._runner.close()

    def __enter__(self) -> "OnlineEncoder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
