"""From cameras to re-identified tracks: streams and their tracks in, per-track features and
cross-camera matches out (``StreamSession``).

Each stream has a reader thread (``stream_source.VideoSource``: decoding, reconnects, a bounded
frame queue) and a camera thread that matches decoded frames with the tracker's records
(``track_formats``) by frame number, cuts each person with the crop rule (``crops``) and
pushes every ``stride``-th usable crop of a track into one shared ``OnlineEncoder``, so clips of
every camera share engine batches. A track ends when its stream has gone ``track_timeout_s``
of stream time (frame number / frame rate) without it, or when the stream ends; a finisher
thread then completes its feature, searches the live ``Gallery`` for its nearest tracks on other
cameras, adds it there, and hands a ``FinishedTrack`` to ``on_track``.

Every queue is bounded: frames (per stream), crops held by the encoder (up to 3 per live track
waiting for their clip, plus ``max_backlog`` in clips waiting for the engine), tracks waiting
for the finisher. When the engine lags, live streams drop frames at their reader
and crops that find the encoder full for ``busy_timeout_s``; both are counted. Files wait
instead, so a file's result does not depend on the machine's speed.

Nothing a stream does stops another: a source that cannot be opened or gives up reconnecting
ends that stream with its reason; unreadable track records, frames without tracks, records for
frames that never came, boxes outside the frame and NaN joints are skipped or cleared and
counted (``CameraCounts``). ``stop()`` (a signal) ends every stream and finishes every track
seen so far.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from keyreid.contract import checked_camera
from keyreid.errors import KeyreidError
from keyreid.lazy import require
from keyreid.runtime.inputs.crops import cut_person
from keyreid.runtime.backends.base import Engine
from keyreid.runtime.results.gallery_store import Gallery, Match
from keyreid.runtime.serving.online import EncoderBusy, OnlineEncoder
from keyreid.runtime.inputs.stream_source import (DEFAULT_QUEUE_FRAMES, DEFAULT_RECONNECT_TIMEOUT_S, DecodedFrame,
                                           SourceEnd, VideoSource)
from keyreid.runtime.inputs.track_formats import FrameTracks, TrackId, TrackReader, open_tracks

DEFAULT_STRIDE = 1
DEFAULT_TRACK_TIMEOUT_S = 2.0
DEFAULT_TOP_K = 5
DEFAULT_MAX_TRACKS = 256
DEFAULT_BUSY_TIMEOUT_S = 0.5
# Crops in clips waiting for the engine; with up to 3 crops per live track waiting for their
# clip, the encoder holds at most 3 * max_tracks + 4 + max_backlog resized crops (96 KiB each).
DEFAULT_MAX_BACKLOG = 64
THUMBNAIL_SIZE = (64, 128)             # (width, height) of the crops kept for the figure
STOP_JOIN_S = 2.0                      # how long stop() waits for a camera thread before ending its tracks itself
_POLL_S = 0.1


@dataclass(frozen=True)
class StreamSpec:
    """One camera: where its frames come from and where its tracks come from."""
    source: str                            # video file, camera device number, or URL
    tracks: Union[str, Path]               # track file (folder for ultralytics-txt; a FIFO works for jsonl)
    camera: int                            # the model's camera index (-1: an unseen camera)
    track_format: Optional[str] = None     # track_formats.FORMATS; default from the tracks' name
    keypoints: Optional[Union[str, Path]] = None   # mot only: the keypoints CSV
    stream_id: Optional[int] = None        # which camera this is, in track names and the gallery
                                           # (default: the stream's position); model cameras may repeat (-1)


@dataclass(frozen=True)
class StreamOptions:
    stride: int = DEFAULT_STRIDE                     # embed every stride-th usable crop of a track
    track_timeout_s: float = DEFAULT_TRACK_TIMEOUT_S  # stream seconds without a track ends it
    top_k: int = DEFAULT_TOP_K                       # cross-camera matches per finished track
    realtime: bool = False                           # pace files at their frame rate, dropping when behind
    queue_frames: int = DEFAULT_QUEUE_FRAMES          # decoded frames held per stream
    reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S
    max_tracks: int = DEFAULT_MAX_TRACKS             # live tracks over all streams
    max_backlog: int = DEFAULT_MAX_BACKLOG           # crops waiting for the engine, besides partial clips
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S    # live streams: drop a crop after waiting this long
    thumbnails: int = 0                              # crops kept per track for a figure (0: none)
    max_batch_size: Optional[int] = None
    max_queue_delay_ms: float = 5.0

    def check(self) -> None:
        for name, value, least in (("stride", self.stride, 1), ("top_k", self.top_k, 1),
                                   ("queue_frames", self.queue_frames, 1), ("max_tracks", self.max_tracks, 1),
                                   ("max_backlog", self.max_backlog, 0),
                                   ("thumbnails", self.thumbnails, 0)):
            if int(value) < least:
                raise KeyreidError(f"{name} must be at least {least}, got {value}")
        for name, value in (("track_timeout_s", self.track_timeout_s), ("busy_timeout_s", self.busy_timeout_s),
                            ("reconnect_timeout_s", self.reconnect_timeout_s)):
            if not 0 <= value < math.inf:
                raise KeyreidError(f"{name} must be a finite number of seconds >= 0, got {value}")


@dataclass
class CameraCounts:
    """What one stream met, for the summary and the progress lines."""
    frames: int = 0                    # decoded frames the camera thread took
    frames_without_tracks: int = 0
    records_without_frame: int = 0     # track records for frames that were dropped or never came
    boxes_outside: int = 0             # boxes with no pixel inside the frame (or not finite)
    duplicate_people: int = 0          # a track id a second time in one frame (the first is kept)
    cleared_joints: int = 0            # joints zeroed for NaN/inf or a negative confidence
    crops: int = 0                     # usable crops
    crops_pushed: int = 0
    crops_dropped: int = 0             # the engine was behind (live streams)
    crops_refused: int = 0             # max_tracks live tracks already
    tracks: int = 0                    # tracks started
    cpu_s: float = 0.0                 # matching, cutting and resizing crops (thread CPU time)
    refused_example: str = ""


@dataclass
class FinishedTrack:
    """One track, ended: where and when it was seen, its feature and its matches."""
    camera: int                        # the stream's id (its position, or StreamSpec.stream_id)
    track: TrackId
    generation: int                    # 0, or n when the id came back after ending n times
    first_frame: int
    last_frame: int
    first_time: float
    last_time: float
    frames_seen: int                   # frames the tracker reported it on
    frames_used: int                   # crops embedded (every stride-th usable one, 41 clips at most)
    clips: int
    has_pose: bool                     # some used frame had a joint with confidence > 0
    feature: Optional[np.ndarray]      # [E] float32; None when it has none (error says why)
    matches: List[Match] = field(default_factory=list)
    error: Optional[str] = None
    thumbnails: List[np.ndarray] = field(default_factory=list)   # RGB crops for the figure
    model_camera: int = 0              # the camera index the engine was given (StreamSpec.camera)

    @property
    def name(self) -> str:
        return track_name(self.camera, self.track, self.generation)


def track_name(camera: int, track: TrackId, generation: int = 0) -> str:
    """The gallery name of a track: ``cam0/track7`` (``cam0/track7#2`` for a reused id)."""
    return f"cam{camera}/track{track}" + (f"#{generation}" if generation else "")


@dataclass
class _LiveTrack:
    key: Tuple[int, TrackId, int]      # the encoder's track id: (camera, track, generation)
    first_frame: int
    first_time: float
    last_frame: int
    last_time: float
    frames_seen: int = 0
    usable: int = 0
    used: int = 0
    has_pose: bool = False
    in_encoder: bool = False
    thumbnails: List[np.ndarray] = field(default_factory=list)
    model_camera: int = 0


class TimedEngine:
    """An engine that counts the clips it ran and the seconds it took (for progress and the
    benchmark's ratio); everything else is the wrapped engine's."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self.clips = 0
        self.seconds = 0.0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def infer(self, feed):
        started = time.perf_counter()
        outputs = self._engine.infer(feed)
        self.seconds += time.perf_counter() - started
        self.clips += len(feed["camera"])
        return outputs


class _FrameMatcher:
    """Takes a stream's track records in frame order and hands each decoded frame its record."""

    def __init__(self, records: Iterator[FrameTracks]):
        self._records = records
        self._next: Optional[FrameTracks] = None
        self._exhausted = False

    def take(self, frame: int) -> Tuple[Optional[FrameTracks], int]:
        """(the record of ``frame`` or None, records skipped because their frame never came)."""
        skipped = 0
        while True:
            if self._next is None and not self._exhausted:
                self._next = next(self._records, None)
                self._exhausted = self._next is None
            if self._next is None:
                return None, skipped
            if self._next.frame < frame:
                skipped += 1
                self._next = None
                continue
            if self._next.frame == frame:
                record, self._next = self._next, None
                return record, skipped
            return None, skipped

    def remaining(self, reads: bool) -> int:
        """Records left over at the end (all of them when ``reads``, else only one read ahead)."""
        left = int(self._next is not None)
        self._next = None
        if reads and not self._exhausted:
            left += sum(1 for _ in self._records)
        self._exhausted = True
        return left


class _Camera:
    """One stream's camera thread: frames + records -> crops -> the encoder; ends tracks."""

    def __init__(self, session: "StreamSession", spec: StreamSpec, stream_id: int, source: VideoSource,
                 reader: TrackReader):
        self.session, self.spec, self.stream_id, self.source, self.reader = session, spec, stream_id, source, reader
        self.name = f"camera {stream_id}"
        self.counts = CameraCounts()
        self.end: Optional[SourceEnd] = None
        self.error: Optional[str] = None
        self._live: Dict[TrackId, _LiveTrack] = {}
        self._generations: Dict[TrackId, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.thread = threading.Thread(target=self._run, name=f"keyreid-camera-{stream_id}", daemon=True)

    # --- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        matcher = _FrameMatcher(self.reader.frames())
        try:
            while not self.session.stopping:
                try:
                    item = self.source.frames.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if isinstance(item, SourceEnd):
                    self.end = item
                    break
                self._frame(item, matcher)
            if self.end is not None and not self.session.stopping:
                self.counts.records_without_frame += matcher.remaining(reads=not self.reader.streams)
        except Exception as exc:        # a bug here must end this camera with the reason, not hang the session
            self.error = f"{self.name}: {type(exc).__name__}: {exc}"
        finally:
            self.end_all()

    def _frame(self, frame: DecodedFrame, matcher: _FrameMatcher) -> None:
        cpu = time.thread_time()
        counts = self.counts
        counts.frames += 1
        record, skipped = matcher.take(frame.index)
        counts.records_without_frame += skipped
        if self._closed:
            return
        fps = self.source.fps
        if record is None or not record.people:
            counts.frames_without_tracks += 1
        else:
            height, width = frame.image.shape[:2]
            record = record.in_pixels(width, height)
            when = record.time if record.time is not None else frame.index / fps
            seen = set()
            for person in record.people:
                if person.track in seen:      # one id twice in a frame: the tracker's bug; keep the first
                    counts.duplicate_people += 1
                    continue
                seen.add(person.track)
                self._person(frame, person, when)
        self._end_stale(frame.index, fps)
        counts.cpu_s += time.thread_time() - cpu

    def _person(self, frame: DecodedFrame, person, when: float) -> None:
        counts, options = self.counts, self.session.options
        with self._lock:
            live = self._live.get(person.track)
            if live is None:
                generation = self._generations.get(person.track, 0)
                live = _LiveTrack((self.stream_id, person.track, generation), frame.index, when, frame.index, when,
                                  model_camera=self.spec.camera)
                self._live[person.track] = live
                counts.tracks += 1
            live.frames_seen += 1
            live.last_frame, live.last_time = frame.index, when
        crop = cut_person(frame.image, person.box, person.keypoints)
        if crop is None:
            counts.boxes_outside += 1
            return
        counts.cleared_joints += crop.cleared_joints
        counts.crops += 1
        live.usable += 1
        if (live.usable - 1) % options.stride:
            return
        if not self._push(live, crop):
            return
        live.used += 1
        live.in_encoder = True
        counts.crops_pushed += 1
        if crop.keypoints is not None and (crop.keypoints[:, 2] > 0).any():
            live.has_pose = True
        if options.thumbnails and len(live.thumbnails) < options.thumbnails and _is_kept(live.used - 1):
            live.thumbnails.append(thumbnail(crop.image))

    def _push(self, live: _LiveTrack, crop) -> bool:
        """Push one crop; False when it was not taken (dropped: engine behind; refused)."""
        encoder, counts = self.session.encoder, self.counts
        while True:
            try:
                encoder.push(live.key, crop.image, crop.keypoints, camera=self.spec.camera, timestamp=live.last_time)
                return True
            except EncoderBusy:
                if self.source.drops:
                    counts.crops_dropped += 1
                    return False
                if self.session.stopping or self._closed:
                    return False
            except KeyreidError as exc:          # max_tracks live tracks: this crop is not taken
                counts.crops_refused += 1
                counts.refused_example = counts.refused_example or str(exc)
                return False

    def _end_stale(self, frame_index: int, fps: float) -> None:
        timeout_frames = self.session.options.track_timeout_s * fps
        with self._lock:
            stale = [track for track, live in self._live.items() if frame_index - live.last_frame > timeout_frames]
            ended = [self._pop(track) for track in stale]
        for live in ended:
            self.session.finish(live)

    def _pop(self, track: TrackId) -> _LiveTrack:
        live = self._live.pop(track)
        self._generations[track] = live.key[2] + 1
        return live

    def end_all(self) -> None:
        """End every live track (the stream ended or the session stops); idempotent."""
        with self._lock:
            self._closed = True
            ended = [self._pop(track) for track in list(self._live)]
        for live in ended:
            self.session.finish(live)


def _is_kept(index: int) -> bool:
    """Crops 0, 1, 2, 4, 8, ... of a track are kept as thumbnails: spread over any length."""
    return index < 3 or (index & (index - 1)) == 0


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A BGR crop as a small RGB image for figures."""
    cv2 = require("cv2")
    small = cv2.resize(np.ascontiguousarray(image), THUMBNAIL_SIZE, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(small[:, :, ::-1])


@dataclass
class StreamSummary:
    """What a session did, per stream, when it ended."""
    cameras: List[Tuple[str, StreamSpec, CameraCounts, VideoSource, TrackReader, Optional[str], Optional[str]]]
    finished: int
    failed: int                        # tracks whose crops reached the engine but that got no feature
    unusable: int                      # tracks none of whose boxes gave a crop (counted, not failures)
    without_pose: List[str]            # names of tracks whose used frames had no keypoint
    seconds: float
    clips: int
    engine_seconds: float
    interrupted: bool

    @property
    def failed_streams(self) -> List[str]:
        return [error for *_, error, _ in self.cameras if error]


class StreamSession:
    """Streams and their trackers' records -> per-track features, matched across cameras.

    Use as a context manager around ``run()``; ``stop()`` may be called from a signal handler.
    """

    def __init__(self, engine: Engine, streams: Sequence[StreamSpec], options: StreamOptions = StreamOptions(),
                 gallery: Optional[Gallery] = None, on_track: Optional[Callable[[FinishedTrack], None]] = None):
        options.check()
        if not streams:
            raise KeyreidError("give at least one stream")
        ids = [position if spec.stream_id is None else spec.stream_id for position, spec in enumerate(streams)]
        if len(set(ids)) != len(ids):
            raise KeyreidError(f"two streams have the same id ({ids}); give each its own")
        self.options = options
        self.on_track = on_track
        self.engine = TimedEngine(engine)
        if not engine.is_active:
            engine.activate()
        for spec in streams:
            checked_camera(spec.camera, engine.num_cameras)
        self.gallery = gallery if gallery is not None else Gallery(engine.embedding_dim)
        if self.gallery.dim != engine.embedding_dim:
            raise KeyreidError(f"the gallery holds features of length {self.gallery.dim}, the engine makes "
                               f"{engine.embedding_dim}; use a gallery of this model")
        readers = [open_tracks(spec.tracks, spec.track_format, spec.keypoints) for spec in streams]
        self.encoder = OnlineEncoder(self.engine, color="bgr", max_tracks=options.max_tracks,
                                     max_buffered_frames=3 * options.max_tracks + 4 + options.max_backlog,
                                     busy_timeout_s=min(options.busy_timeout_s, 1.0), idle_timeout_s=None,
                                     max_batch_size=options.max_batch_size,
                                     max_queue_delay_ms=options.max_queue_delay_ms)
        self.cameras = [_Camera(self, spec, stream_id, VideoSource(spec.source, queue_frames=options.queue_frames,
                                                                   realtime=options.realtime,
                                                                   reconnect_timeout_s=options.reconnect_timeout_s,
                                                                   name=f"camera {stream_id} ({spec.source})"), reader)
                        for stream_id, spec, reader in zip(ids, streams, readers)]
        # Ended tracks wait here for the finisher; bounded: a full queue holds up the camera threads.
        self._ended: "queue.Queue[Optional[_LiveTrack]]" = queue.Queue(max(options.max_tracks, 8))
        self._finisher = threading.Thread(target=self._finish_tracks, name="keyreid-finisher", daemon=True)
        self._stop = threading.Event()
        self.finished: List[FinishedTrack] = []
        self._lock = threading.Lock()
        self.started = time.monotonic()

    # --- control --------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """End every stream now and finish the tracks seen so far (safe in a signal handler)."""
        self._stop.set()

    def run(self, on_tick: Optional[Callable[["StreamSession"], None]] = None,
            tick_s: float = 1.0) -> StreamSummary:
        """Run every stream to its end (or until ``stop()``); ``on_tick`` is called on this thread
        every ``tick_s`` seconds (progress lines, periodic saves). Returns the summary once every
        track is finished."""
        self.started = time.monotonic()
        self._finisher.start()
        for camera in self.cameras:
            camera.source.start()
            camera.thread.start()
        next_tick = time.monotonic() + tick_s
        while any(camera.thread.is_alive() for camera in self.cameras) and not self.stopping:
            self._stop.wait(_POLL_S)
            if on_tick is not None and time.monotonic() >= next_tick:
                next_tick += tick_s
                on_tick(self)
        interrupted = self.stopping
        self._stop.set()
        for camera in self.cameras:
            camera.source.stop()
        for camera in self.cameras:
            camera.thread.join(STOP_JOIN_S)
            if camera.thread.is_alive():   # blocked on a track FIFO: end its tracks from here
                camera.end_all()
        self._ended.put(None)
        self._finisher.join()
        return self.summary(interrupted)

    def summary(self, interrupted: bool = False) -> StreamSummary:
        with self._lock:
            finished = list(self.finished)
        cameras = []
        for camera in self.cameras:
            end = camera.end
            error = camera.error or (end.error if end is not None else None)
            cameras.append((camera.name, camera.spec, camera.counts, camera.source, camera.reader, error,
                            end.note if end is not None else None))
        return StreamSummary(cameras, len(finished),
                             sum(track.feature is None and track.frames_used > 0 for track in finished),
                             sum(track.feature is None and track.frames_used == 0 for track in finished),
                             [track.name for track in finished if track.feature is not None and not track.has_pose],
                             time.monotonic() - self.started, self.engine.clips, self.engine.seconds, interrupted)

    def close(self) -> None:
        self._stop.set()
        for camera in self.cameras:
            camera.source.stop()
        self.encoder.close()

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- finishing tracks -----------------------------------------------------------------
    def finish(self, live: _LiveTrack) -> None:
        """Hand an ended track to the finisher (waits while its queue is full)."""
        self._ended.put(live)

    def _finish_tracks(self) -> None:
        while True:
            live = self._ended.get()
            if live is None:
                return
            try:
                track = self._finished_track(live)
            except Exception as exc:   # never lose a track to a bug: it ends with the reason
                track = self._track(live, None, 0, f"{type(exc).__name__}: {exc}")
            with self._lock:
                self.finished.append(track)
            if self.on_track is not None:
                self.on_track(track)

    def _track(self, live: _LiveTrack, feature: Optional[np.ndarray], clips: int, error: Optional[str]) -> FinishedTrack:
        camera, track, generation = live.key
        return FinishedTrack(camera, track, generation, live.first_frame, live.last_frame, live.first_time,
                             live.last_time, live.frames_seen, live.used, clips, live.has_pose, feature,
                             error=error, thumbnails=live.thumbnails, model_camera=live.model_camera)

    def _finished_track(self, live: _LiveTrack) -> FinishedTrack:
        if not live.in_encoder:
            reason = ("no box of this track had pixels inside the frame" if live.usable == 0
                      else "none of its crops reached the engine (dropped while it was behind)")
            return self._track(live, None, 0, reason)
        try:
            result = self.encoder.finish(live.key)
        except KeyreidError as exc:
            return self._track(live, None, 0, str(exc))
        track = self._track(live, result.feature, result.num_clips, result.error)
        if result.feature is None:
            track.error = track.error or "no clip was embedded"
            return track
        track.matches = self.gallery.search(result.feature, k=self.options.top_k, camera=track.camera,
                                            exclude="camera")
        self.gallery.add(result.feature, camera=track.camera, timestamp=track.last_time, name=track.name)
        return track
