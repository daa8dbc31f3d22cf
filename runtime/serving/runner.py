"""Batched runner: many callers, one engine, full batches.

Callers on any thread submit clips or whole tracklets and get ``concurrent.futures.Future``s.
One scheduler thread packs the clips of many requests into engine batches, Triton dynamic
batcher style: a batch leaves as soon as ``max_batch_size`` clips are waiting, or when the
oldest waiting clip has waited ``max_queue_delay_ms``. A tracklet's clips may travel in several
batches; its feature is the mean of its clip embeddings (docs/contract.md §4).

Optional preprocessing (for example decoding frames from image files) runs on a thread pool,
so it overlaps with inference: ``Runner(engine, preprocess=pipeline.clip_loader(tally))``.

Failures stay with their request: a bad clip, a camera out of range, a preprocessing error,
non-finite outputs, or an engine error on a batch (its requests are retried one by one, so a
one-off failure or one bad request does not take the others with it) fails only that request's
future, and the runner keeps serving. Even a BaseException from the engine fails futures
rather than the scheduler.

Nothing waits on itself: a done-callback (it runs on one of the runner's threads) that submits
to a full queue gets QueueFull instead of waiting for a slot only its own thread could free, and
``close()`` called from such a callback starts the shutdown and returns. Leaving the
with-block on an exception (Ctrl-C, SIGTERM under ``keyreid.cli.run_main``) cancels every
request not yet finished instead of running them all.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence

import numpy as np

from keyreid.contract import INPUT_NAMES, checked_camera, stack_clips
from keyreid.errors import KeyreidError
from keyreid.runtime.backends.base import Engine

# Clips per batch when the engine itself sets no limit (ONNX Runtime).
DEFAULT_MAX_BATCH_SIZE = 16
# How long a cancelling close() waits for the batch already in the engine.
CANCEL_JOIN_TIMEOUT_S = 60.0

Clip = Mapping[str, Any]
Preprocess = Callable[[Clip], Clip]


@dataclass(frozen=True)
class RunnerOptions:
    """How a Runner batches and bounds its queue: the one place for these defaults. The library
    (``Runner(engine, ...)``) and the command-line tools (``--max-batch``, ``--queue-delay-ms``,
    ``--queue-size``, ``--workers``) both start from them."""
    max_batch_size: Optional[int] = None   # None: the engine's maximum, else DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_ms: float = 5.0         # longest a clip waits for a fuller batch
    # Requests (clips or tracklets) admitted and not yet handed to the engine: as many as one
    # full batch of single clips, so clip-by-clip callers still fill batches, while tracklet
    # callers hold at most this many tracklets' decoded frames.
    max_queue_size: int = DEFAULT_MAX_BATCH_SIZE
    block_when_full: bool = True            # a full queue makes submit_* wait (else QueueFull)
    block_timeout_s: Optional[float] = None  # longest that wait (None: as long as it takes)
    preprocess_workers: int = 4             # threads running ``preprocess`` (decoding frames)

    def as_kwargs(self) -> Dict[str, Any]:
        return asdict(self)


_DEFAULTS = RunnerOptions()


class QueueFull(KeyreidError):
    """The runner already holds ``max_queue_size`` requests and was told not to block (or the
    submit came from one of the runner's own threads, which must never wait for a slot)."""


class Cancelled(KeyreidError):
    """The runner was cancelled (``close(cancel=True)``) before the request finished."""


def tracklet_feature(clip_embeddings: np.ndarray) -> np.ndarray:
    """Mean of a tracklet's clip embeddings [clips, E] -> [E] float32 (docs/contract.md §4)."""
    return clip_embeddings.mean(axis=0, dtype=np.float64).astype(np.float32)


class _Request:
    """One submitted clip or tracklet and the results gathered for it so far."""

    __slots__ = ("future", "is_tracklet", "num_clips", "undispatched", "unfinished",
                 "holds_slot", "started", "done", "embeddings", "part_weights")

    def __init__(self, is_tracklet: bool, num_clips: int):
        self.future: Future = Future()
        self.is_tracklet = is_tracklet
        self.num_clips = num_clips
        self.undispatched = num_clips      # clips not yet taken into a batch
        self.unfinished = num_clips        # clips without an embedding yet
        self.holds_slot = False            # counts against max_queue_size
        self.started = False               # future moved to RUNNING (no longer cancellable)
        self.done = False                  # result or exception decided
        self.embeddings: Optional[np.ndarray] = None
        self.part_weights: Optional[np.ndarray] = None


class _ClipItem:
    """One validated clip waiting for a batch."""

    __slots__ = ("request", "index", "arrays", "enqueued_at")

    def __init__(self, request: _Request, index: int, arrays: Dict[str, np.ndarray]):
        self.request = request
        self.index = index
        self.arrays = arrays
        self.enqueued_at = 0.0             # set when queued


class Runner:
    """Serve one engine to many threads with dynamic batching. Use as a context manager."""

    def __init__(self, engine: Engine, *, max_batch_size: Optional[int] = _DEFAULTS.max_batch_size,
                 max_queue_delay_ms: float = _DEFAULTS.max_queue_delay_ms,
                 max_queue_size: int = _DEFAULTS.max_queue_size,
                 block_when_full: bool = _DEFAULTS.block_when_full,
                 block_timeout_s: Optional[float] = _DEFAULTS.block_timeout_s,
                 preprocess: Optional[Preprocess] = None,
                 preprocess_workers: int = _DEFAULTS.preprocess_workers):
        """The defaults are ``RunnerOptions()``'s; ``Runner(engine, **options.as_kwargs())``
        takes a whole options object.

        Args:
            engine: the engine to serve; activated here if it is not active yet (and then
                deactivated by ``close``).
            max_batch_size: most clips per engine call; default the engine's maximum, or
                DEFAULT_MAX_BATCH_SIZE for engines without one. Must not exceed the engine's.
            max_queue_delay_ms: longest a clip waits for a fuller batch.
            max_queue_size: most requests (clips or tracklets) admitted but not yet fully
                handed to the engine.
            block_when_full: on a full queue, ``submit_*`` waits for room (True) or raises
                QueueFull (False).
            block_timeout_s: longest ``submit_*`` waits for room before raising QueueFull
                (None: as long as it takes; the engine frees room as it works).
            preprocess: turns a submitted clip into one with decoded arrays (for example
                ``pipeline.clip_loader(tally)``); runs on ``preprocess_workers`` threads.
            preprocess_workers: size of the preprocessing thread pool.
        """
        if max_queue_size < 1:
            raise KeyreidError(f"max_queue_size must be at least 1, got {max_queue_size}")
        if max_queue_delay_ms < 0:
            raise KeyreidError(f"max_queue_delay_ms must not be negative, got {max_queue_delay_ms}")
        self._owns_activation = not engine.is_active
        engine.activate()
        try:
            self.max_batch_size = self._resolve_max_batch_size(engine, max_batch_size)
        except KeyreidError:
            if self._owns_activation:
                engine.deactivate()
            raise
        self.engine = engine
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.block_when_full = block_when_full
        self.block_timeout_s = block_timeout_s
        self._preprocess = preprocess
        self._clip_shapes = {spec.name: tuple(spec.shape[1:]) for spec in engine.input_specs}
        self._clip_dtypes = {spec.name: spec.dtype for spec in engine.input_specs}
        self._num_cameras = engine.num_cameras

        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)    # clips queued, or stopping
        self._slot_free = threading.Condition(self._lock)     # a request left the queue, or closing
        self._pending: Deque[_ClipItem] = deque()
        self._slots_used = 0
        self._closing = False       # no new requests
        self._stopping = False      # preprocessing finished: drain without waiting
        self._closed = False
        self._live: set = set()     # admitted requests not yet done (what a cancel fails)
        self._own_threads: set = set()      # idents of the scheduler and pool threads
        self._pool = (ThreadPoolExecutor(preprocess_workers, thread_name_prefix="keyreid-preprocess",
                                         initializer=self._register_thread)
                      if preprocess is not None else None)
        self._scheduler = threading.Thread(target=self._serve, name="keyreid-runner", daemon=True)
        self._scheduler.start()

    def _register_thread(self) -> None:
        self._own_threads.add(threading.get_ident())

    def _on_own_thread(self) -> bool:
        """True inside a done-callback run by the scheduler or a preprocessing thread."""
        return threading.get_ident() in self._own_threads

    @property
    def is_serving(self) -> bool:
        """False once the scheduler thread has ended (closed, or stopped by a bug)."""
        return self._scheduler.is_alive()

    @staticmethod
    def _resolve_max_batch_size(engine: Engine, requested: Optional[int]) -> int:
        limit = engine.max_batch
        if requested is None:
            return limit if limit is not None else DEFAULT_MAX_BATCH_SIZE
        if requested < 1:
            raise KeyreidError(f"max_batch_size must be at least 1, got {requested}")
        if limit is not None and requested > limit:
            raise KeyreidError(f"max_batch_size {requested} is above the engine's maximum batch of {limit}")
        return requested

    # --- submitting ---------------------------------------------------------------------
    def submit_clip(self, clip: Clip) -> "Future[Dict[str, np.ndarray]]":
        """Queue one clip: a dict with ``frames`` [4,256,128,3] uint8, ``keypoints`` [4,17,3],
        ``crop_size`` [4,2] and ``camera`` (int, -1 for the mean camera).

        The future's result is ``{"embedding": [E] float32, "part_weights": [128, 6] float32}``.
        Arrays are read when the clip is batched: do not modify them before the future is done.
        """
        return self._submit([clip], is_tracklet=False)

    def submit_tracklet(self, clips: Sequence[Clip]) -> "Future[np.ndarray]":
        """Queue a tracklet's clips (already split, docs/contract.md §4); the future's result is the
        mean of their embeddings, [E] float32. With a ``preprocess`` hook the clips may still
        be undecoded (for example frames as file paths)."""
        if isinstance(clips, Mapping):
            request = _Request(is_tracklet=True, num_clips=0)
            request.future.set_exception(KeyreidError("submit_tracklet takes a list of clips, got one clip"))
            return request.future
        return self._submit(list(clips), is_tracklet=True)

    def _submit(self, clips: List[Clip], is_tracklet: bool) -> Future:
        if self._closing:
            raise KeyreidError("the runner is closed")
        request = _Request(is_tracklet, len(clips))
        if not clips:
            self._settle(request, exception=KeyreidError("a tracklet needs at least one clip"))
            return request.future
        if self._pool is not None:
            with self._lock:
                self._admit(request)
                for index, clip in enumerate(clips):
                    self._pool.submit(self._prepare, request, index, clip)
            return request.future
        # No preprocessing: validate on the caller's thread, then queue all clips at once, so
        # close() never sees a request half queued.
        try:
            items = [_ClipItem(request, index, self._validate_clip(request, index, clip))
                     for index, clip in enumerate(clips)]
        except Exception as exc:
            self._settle(request, exception=exc)
            return request.future
        with self._lock:
            self._admit(request)
            self._queue(items)
        return request.future

    def _admit(self, request: _Request) -> None:
        """Take a queue slot for ``request`` (lock held): wait, or raise QueueFull / closed."""
        if self._closing:
            raise KeyreidError("the runner is closed")
        while self._slots_used >= self.max_queue_size:
            if not self.block_when_full:
                raise QueueFull(f"the runner's queue is full ({self.max_queue_size} requests waiting); "
                                "retry later or raise max_queue_size")
            if self._on_own_thread():
                raise QueueFull(f"the runner's queue is full ({self.max_queue_size} requests waiting) and "
                                "this submit comes from a done-callback on the runner's own thread, which "
                                "cannot wait for room; submit from another thread or raise max_queue_size")
            if not self._slot_free.wait(self.block_timeout_s):
                raise QueueFull(f"no room in the runner's queue for {self.block_timeout_s:g} s: the engine "
                                "is not finishing requests (hung?)")
            if self._closing:
                raise KeyreidError("the runner was closed while waiting for room in its queue")
        self._slots_used += 1
        request.holds_slot = True
        self._live.add(request)

    def _queue(self, items: List[_ClipItem]) -> None:
        """Append validated clips to the batch queue (lock held) and wake the scheduler."""
        now = time.monotonic()
        for item in items:
            item.enqueued_at = now
        self._pending.extend(items)
        self._work_ready.notify()

    def _prepare(self, request: _Request, index: int, clip: Clip) -> None:
        """Pool task: preprocess and validate one clip, then queue it; a failure fails its request."""
        if request.done:
            return
        try:
            item = _ClipItem(request, index, self._validate_clip(request, index, self._preprocess(clip)))
        except Exception as exc:
            self._fail(request, exc)
            return
        with self._lock:
            if not request.done:
                self._queue([item])

    def _validate_clip(self, request: _Request, index: int, clip: Clip) -> Dict[str, np.ndarray]:
        """``_validate``, naming the clip's position when it belongs to a tracklet."""
        try:
            return self._validate(clip)
        except KeyreidError as exc:
            if request.is_tracklet:
                raise KeyreidError(f"clip {index} of the tracklet: {exc}") from exc
            raise

    def _validate(self, clip: Clip) -> Dict[str, np.ndarray]:
        """Per-clip arrays in the engine's dtypes, or a KeyreidError saying what is wrong."""
        if not isinstance(clip, Mapping):
            raise KeyreidError(f"a clip is a dict with keys {', '.join(INPUT_NAMES)}; got {type(clip).__name__}")
        missing = [name for name in self._clip_shapes if name not in clip]
        if missing:
            raise KeyreidError(f"clip is missing {', '.join(missing)}")
        arrays = {}
        for name, shape in self._clip_shapes.items():
            value, dtype = clip[name], self._clip_dtypes[name]
            if name == "camera":
                arrays[name] = np.int64(checked_camera(value, self._num_cameras))
                continue
            array = np.asarray(value)
            if dtype.kind == "f" and array.dtype.kind in "fiu":
                array = array.astype(dtype, copy=False)     # a lossless-enough widening or narrowing
            elif array.dtype != dtype:
                raise KeyreidError(f"clip {name} has dtype {array.dtype}; expected {dtype.name}")
            if array.shape != shape:
                raise KeyreidError(f"clip {name} has shape {list(array.shape)}; expected {list(shape)}")
            arrays[name] = array
        return arrays

    # --- settling requests --------------------------------------------------------------
    def _fail(self, request: _Request, exception: BaseException) -> None:
        with self._lock:
            decided_here = self._fail_locked(request)
        if decided_here:
            self._settle(request, exception=exception)

    def _fail_locked(self, request: _Request) -> bool:
        """Mark ``request`` done, drop its queued clips, free its slot; True if it was not done."""
        if request.done:
            return False
        request.done = True
        self._live.discard(request)
        if request.undispatched:
            self._pending = deque(item for item in self._pending if item.request is not request)
        self._release_slot(request)
        return True

    def _release_slot(self, request: _Request) -> None:
        if request.holds_slot:
            request.holds_slot = False
            self._slots_used -= 1
            self._slot_free.notify()

    @staticmethod
    def _settle(request: _Request, result: Any = None, exception: Optional[BaseException] = None) -> None:
        """Resolve the future, outside the lock: done-callbacks may submit again."""
        request.embeddings = request.part_weights = None
        try:
            if exception is not None:
                request.future.set_exception(exception)
            else:
                request.future.set_result(result)
        except InvalidStateError:     # cancelled by the caller before it started
            pass

    # --- the scheduler ------------------------------------------------------------------
    def _serve(self) -> None:
        self._register_thread()
        while True:
            with self._lock:
                batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as exc:     # a bug here must fail the batch, not the scheduler
                for item in batch:
                    self._fail(item.request, exc)

    def _next_batch(self) -> Optional[List[_ClipItem]]:
        """Wait (lock held) until a batch is due and take it; None once stopped and drained."""
        while True:
            if not self._pending:
                if self._stopping:
                    return None
                self._work_ready.wait()
                continue
            due_at = self._pending[0].enqueued_at + self.max_queue_delay_s
            now = time.monotonic()
            if len(self._pending) >= self.max_batch_size or self._stopping or now >= due_at:
                batch = self._take(self.max_batch_size)
                if batch:
                    return batch
                continue
            self._work_ready.wait(due_at - now)

    def _take(self, count: int) -> List[_ClipItem]:
        """Pop up to ``count`` clips of live requests (lock held); drop cancelled requests."""
        batch = []
        while self._pending and len(batch) < count:
            item = self._pending.popleft()
            request = item.request
            if request.done:
                continue
            if not request.started:
                request.started = True
                if not request.future.set_running_or_notify_cancel():
                    self._fail_locked(request)      # cancelled by the caller
                    continue
            batch.append(item)
            request.undispatched -= 1
            if request.undispatched == 0:
                self._release_slot(request)
        return batch

    def _run(self, batch: List[_ClipItem]) -> None:
        """Run one batch; if it fails, retry its requests one by one (a single request too: the
        failure may be a one-off), so only a request that fails again on its own fails."""
        try:
            self._deliver(batch, self.engine.infer(stack_clips([item.arrays for item in batch])))
            return
        except BaseException:       # an engine may raise anything; the retry below decides
            pass
        by_request: Dict[int, List[_ClipItem]] = {}
        for item in batch:
            by_request.setdefault(id(item.request), []).append(item)
        for items in by_request.values():
            if items[0].request.done:
                continue
            try:
                self._deliver(items, self.engine.infer(stack_clips([item.arrays for item in items])))
            except BaseException as exc:
                self._fail(items[0].request, exc)

    def _deliver(self, items: List[_ClipItem], outputs: Dict[str, np.ndarray]) -> None:
        embeddings, part_weights = outputs["embedding"], outputs["part_weights"]
        finite = np.isfinite(embeddings).all(axis=1) & np.isfinite(part_weights).all(axis=(1, 2))
        finished, non_finite = [], []
        with self._lock:
            for row, item in enumerate(items):
                request = item.request
                if request.done:
                    continue
                if not finite[row]:
                    if self._fail_locked(request):
                        non_finite.append((request, item.index))
                    continue
                if request.is_tracklet:
                    if request.embeddings is None:
                        request.embeddings = np.empty((request.num_clips, embeddings.shape[1]), embeddings.dtype)
                    request.embeddings[item.index] = embeddings[row]
                else:
                    request.embeddings = embeddings[row].copy()
                    request.part_weights = part_weights[row].copy()
                item.arrays = None
                request.unfinished -= 1
                if request.unfinished == 0:
                    request.done = True
                    self._live.discard(request)
                    finished.append(request)
        for request, index in non_finite:
            where = f"clip {index} of the tracklet" if request.is_tracklet else "the clip"
            self._settle(request, exception=KeyreidError(
                f"the engine returned NaN or infinite values for {where}; check the engine with compare.py"))
        for request in finished:
            if request.is_tracklet:
                result = tracklet_feature(request.embeddings)
            else:
                result = {"embedding": request.embeddings, "part_weights": request.part_weights}
            self._settle(request, result=result)

    # --- shutting down ------------------------------------------------------------------
    def close(self, cancel: bool = False) -> None:
        """Stop taking requests and stop the threads. Later submits raise.

        Args:
            cancel: False finishes every admitted request first; True fails every request not
                yet finished with ``Cancelled`` (a batch already in the engine completes).

        Called from a done-callback (on the runner's own thread, which the shutdown has to wait
        for) it starts the shutdown on a helper thread and returns at once.
        """
        with self._lock:
            first = not self._closed
            self._closed = self._closing = True
            self._slot_free.notify_all()
            cancelled = self._cancel_locked() if cancel else []
        self._settle_cancelled(cancelled)
        if not first:
            return
        if self._on_own_thread():
            threading.Thread(target=self._finish_closing, args=(cancel,), name="keyreid-runner-close",
                             daemon=True).start()
        else:
            self._finish_closing(cancel)

    def _cancel_locked(self) -> List[_Request]:
        """Mark (lock held) every admitted, unfinished request failed; the caller settles them."""
        cancelled = [request for request in list(self._live) if self._fail_locked(request)]
        self._pending.clear()
        return cancelled

    @classmethod
    def _settle_cancelled(cls, requests: List[_Request]) -> None:
        for request in requests:
            cls._settle(request, exception=Cancelled("cancelled: the runner was closed before this request finished"))

    def _finish_closing(self, cancel: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)   # every clip is now queued or failed
        with self._lock:
            self._stopping = True
            cancelled = self._cancel_locked() if cancel else []
            self._work_ready.notify_all()
        self._settle_cancelled(cancelled)
        # A cancel does not wait forever on an engine call that never returns (a hung device);
        # the engine is then left active rather than freed under the running call.
        self._scheduler.join(CANCEL_JOIN_TIMEOUT_S if cancel else None)
        if self._owns_activation and not self._scheduler.is_alive():
            self.engine.deactivate()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.close(cancel=exc_type is not None)
