"""Tracklets through a Runner (docs/contract.md §4): clip requests, decoding on the pool, features.

A tracklet becomes the clips of ``split_into_clips``; each clip request holds only file paths and
the camera, and ``clip_loader`` decodes it (frames via ``images.load_frame``, keypoints via
``poses.load_pose``) on the runner's preprocessing threads, so decoding overlaps inference.
``run_tracklets`` submits every tracklet, collects the futures in input order and turns each
failed one into a ``TrackletFailure``: one corrupt frame fails its own tracklet and nothing else.
A missing or bad pose file is not a failure; it reads as "no joint visible" and is counted in the
run's ``PoseTally``.
"""
import sys
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from keyreid.contract import CLIP_FRAMES, camera_problem
from keyreid.errors import KeyreidError
from keyreid.runtime.inputs.images import DEFAULT_MAX_FRAME_SIDE, load_frame
from keyreid.runtime.inputs.poses import PoseTally, load_pose
from keyreid.runtime.serving.runner import Preprocess, QueueFull, Runner
from keyreid.runtime.inputs.tracklets import Tracklet, TrackletFailure, num_clips, split_into_clips


# run_tracklets fails what still waits when no tracklet finished for this long (a hung engine).
DEFAULT_STALL_TIMEOUT_S = 600.0
_POLL_S = 0.5       # how often a wait checks that the runner still serves


def clip_requests(tracklet: Tracklet, clip_frames: int = CLIP_FRAMES) -> List[Dict[str, Any]]:
    """The tracklet's clips as undecoded requests: ``frames`` and ``poses`` are ``clip_frames``
    file paths each (the last clip cycles its own frames), ``camera`` the tracklet's camera."""
    return [{"frames": [tracklet.frame_paths[index] for index in group],
             "poses": [tracklet.pose_paths[index] for index in group],
             "camera": tracklet.camera}
            for group in split_into_clips(tracklet.num_frames, clip_frames)]


def clip_loader(pose_tally: Optional[PoseTally] = None, max_frame_side: int = DEFAULT_MAX_FRAME_SIDE) -> Preprocess:
    """The runner's ``preprocess`` hook for ``clip_requests``: decode frames, read poses.

    A clip whose ``frames`` are already an array passes through, so one runner serves both.
    A frame repeated inside a clip (a short tracklet's cycled frames) is decoded and counted
    once. A frame that cannot be decoded, or declares a side above ``max_frame_side`` pixels,
    raises (failing its tracklet); a pose file that is missing or bad gives zeros and is
    recorded in ``pose_tally``.
    """
    def load(clip: Dict[str, Any]) -> Dict[str, Any]:
        if isinstance(clip["frames"], np.ndarray):      # already decoded: passes through
            return clip
        decoded: Dict[Path, Tuple[np.ndarray, Tuple[int, int]]] = {}
        keypoints: Dict[Path, np.ndarray] = {}
        for frame_path, pose_path in zip(clip["frames"], clip["poses"]):
            if frame_path not in decoded:
                decoded[frame_path] = load_frame(frame_path, max_frame_side)
                keypoints[frame_path] = load_pose(pose_path, pose_tally, crop_size=decoded[frame_path][1])
        frames = [decoded[path] for path in clip["frames"]]
        return {"frames": np.stack([frame for frame, _ in frames]),
                "keypoints": np.stack([keypoints[path] for path in clip["frames"]]),
                "crop_size": np.array([size for _, size in frames], dtype=np.float32),
                "camera": clip["camera"]}
    return load


def load_tracklet_clips(tracklets: Sequence[Tracklet], pose_tally: Optional[PoseTally] = None,
                        limit: Optional[int] = None,
                        max_frame_side: int = DEFAULT_MAX_FRAME_SIDE) -> List[Dict[str, Any]]:
    """Decoded clips of ``tracklets`` in order, on this thread, at most ``limit`` of them
    (for tools that need the clips themselves rather than tracklet features)."""
    load = clip_loader(pose_tally, max_frame_side)
    clips: List[Dict[str, Any]] = []
    for tracklet in tracklets:
        for request in clip_requests(tracklet):
            if limit is not None and len(clips) >= limit:
                return clips
            clips.append(load(request))
    return clips


class Progress:
    """A line on ``stream`` at most every ``interval_s`` seconds: tracklets, clips, clips/s, ETA.

    ``done`` is called from the runner's threads (future callbacks), so it takes a lock.
    """

    def __init__(self, total_tracklets: int, total_clips: int, interval_s: float = 1.0,
                 stream: Optional[TextIO] = None, enabled: bool = True):
        self.total_tracklets, self.total_clips = total_tracklets, total_clips
        self.interval_s, self.enabled = interval_s, enabled
        self.stream = stream
        self.tracklets = self.clips = self.failed = 0
        self.started = time.perf_counter()
        self._last_print = self.started
        self._lock = threading.Lock()

    def done(self, clips: int, failed: bool) -> None:
        with self._lock:
            self.tracklets += 1
            self.clips += clips
            self.failed += int(failed)
            now = time.perf_counter()
            if self.enabled and now - self._last_print >= self.interval_s:
                self._last_print = now
                print(self.line(now), file=self.stream or sys.stderr, flush=True)

    def line(self, now: Optional[float] = None) -> str:
        elapsed = (now or time.perf_counter()) - self.started
        rate = self.clips / elapsed if elapsed > 0 else 0.0
        remaining = self.total_clips - self.clips
        eta = f", about {remaining / rate:.0f} s left" if rate > 0 and remaining > 0 else ""
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (f"      {self.tracklets}/{self.total_tracklets} tracklets{failed}, "
                f"{self.clips}/{self.total_clips} clips, {rate:.1f} clips/s{eta}")


@dataclass
class TrackletRun:
    """What ``run_tracklets`` produced, in input order."""
    tracklets: List[Tracklet]           # every tracklet submitted, in input order
    indices: np.ndarray                 # [M] positions in ``tracklets`` that produced a feature
    features: np.ndarray                # [M, E] float32, the tracklet features (mean of clips)
    failures: List[TrackletFailure] = field(default_factory=list)
    pose_tally: PoseTally = field(default_factory=PoseTally)
    num_clips: int = 0                  # clips of the tracklets that succeeded
    seconds: float = 0.0

    @property
    def succeeded(self) -> List[Tracklet]:
        return [self.tracklets[index] for index in self.indices]

    @property
    def clips_per_second(self) -> float:
        return self.num_clips / self.seconds if self.seconds > 0 else 0.0

    def arrays(self) -> Dict[str, np.ndarray]:
        """The arrays of the ``--output`` npz: embeddings, tracklets, pids, cameras."""
        succeeded = self.succeeded
        return {"embeddings": self.features,
                "tracklets": np.array([tracklet.name for tracklet in succeeded], dtype=str),
                "pids": np.array([tracklet.pid for tracklet in succeeded], dtype=np.int64),
                "cameras": np.array([tracklet.camera for tracklet in succeeded], dtype=np.int64)}


def describe_failure(exception: BaseException) -> str:
    """One line for a failed tracklet: the KeyreidError sentence, else the exception type too."""
    text = str(exception).strip().splitlines()[0] if str(exception).strip() else ""
    if isinstance(exception, KeyreidError):
        return text or type(exception).__name__
    return f"{type(exception).__name__}: {text}" if text else type(exception).__name__


def _wait_for(future: Future, runner: Runner, deadline: float, stall_timeout_s: float) -> Optional[BaseException]:
    """The future's exception (None on success), polling so that a dead scheduler or an engine
    that stops finishing work turns into a failure instead of a wait without end."""
    while True:
        try:
            return future.exception(timeout=min(_POLL_S, max(deadline - time.monotonic(), 0.0)))
        except FutureTimeout:
            pass
        if not runner.is_serving and not future.done():
            return KeyreidError("the runner stopped before this tracklet finished")
        if time.monotonic() > deadline:
            return KeyreidError(f"nothing finished for {stall_timeout_s:g} s: the engine appears hung")


def run_tracklets(runner: Runner, tracklets: Sequence[Tracklet], pose_tally: PoseTally,
                  progress: Optional[Progress] = None,
                  stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> TrackletRun:
    """Submit every tracklet to ``runner`` and gather features and failures, in input order.

    The runner must have been built with ``preprocess=clip_loader(pose_tally)``. Tracklets whose
    camera the engine does not know fail here, before any frame is decoded. ``submit_tracklet``
    blocks while the runner's queue is full, which bounds the decoded frames held in memory.
    When no tracklet finishes for ``stall_timeout_s`` seconds, the ones still waiting fail.
    """
    tracklets = list(tracklets)
    started = time.perf_counter()
    failures: Dict[int, TrackletFailure] = {}
    futures = []
    queue_stalled: Optional[str] = None
    for position, tracklet in enumerate(tracklets):
        reason = camera_problem(tracklet.camera, runner.engine.num_cameras)
        if reason or queue_stalled:
            failures[position] = TrackletFailure(tracklet.name, reason or queue_stalled)
            if progress is not None:
                progress.done(0, failed=True)
            continue
        clips = clip_requests(tracklet, runner.engine.clip_frames)    # the model file's clip length
        try:
            future = runner.submit_tracklet(clips)
        except QueueFull as exc:        # the engine stopped freeing room (block_timeout_s)
            failures[position] = TrackletFailure(tracklet.name, str(exc))
            # Waiting as long again for each later tracklet would turn one hung engine into
            # hours of waiting: they fail now, with the reason.
            queue_stalled = f"not run: {exc}"
            continue
        if progress is not None:
            future.add_done_callback(
                lambda done, count=len(clips): progress.done(count if done.exception() is None else 0,
                                                             failed=done.exception() is not None))
        futures.append((position, len(clips), future))

    indices, features, clips_done, stalled = [], [], 0, False
    deadline = time.monotonic() + stall_timeout_s
    for position, count, future in futures:
        exception = _wait_for(future, runner, deadline, stall_timeout_s)
        if future.done():
            deadline = time.monotonic() + stall_timeout_s
        else:
            stalled = True
        if exception is not None:
            failures[position] = TrackletFailure(tracklets[position].name, describe_failure(exception))
            continue
        indices.append(position)
        features.append(future.result())
        clips_done += count

    width = features[0].shape[0] if features else runner.engine.embedding_dim
    if stalled:
        runner.close(cancel=True)      # do not leave the hung requests for close() to wait on
    return TrackletRun(
        tracklets=tracklets,
        indices=np.array(indices, dtype=np.int64),
        features=np.stack(features) if features else np.zeros((0, width), np.float32),
        failures=[failures[position] for position in sorted(failures)],
        pose_tally=pose_tally,
        num_clips=clips_done,
        seconds=time.perf_counter() - started)


def total_clips(tracklets: Sequence[Tracklet]) -> int:
    return sum(num_clips(tracklet.num_frames) for tracklet in tracklets)
