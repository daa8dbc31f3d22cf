"""Runner: dynamic batching across requests, limits, failure isolation, draining, and a load
test, all on a real (tiny) ONNX model run by ONNX Runtime."""
import gc
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from keyreid.errors import KeyreidError
from keyreid.runtime.backends.onnxruntime import OrtEngine
from keyreid.runtime.serving.runner import Cancelled, QueueFull, Runner, tracklet_feature

from toy_engine_model import batch_feed, build_toy_model, random_clip


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("runner") / "toy.onnx")


@pytest.fixture(scope="module")
def clips():
    """A pool of distinct clips; requests reuse them (frames are 393 kB each)."""
    rng = np.random.default_rng(7)
    return [random_clip(rng, camera) for camera in (0, 1, 2, 3, 4, 5, -1, 0)]


class CountingEngine(OrtEngine):
    """Records the batch size of every engine call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_sizes = []

    def infer_impl(self, feed):
        self.batch_sizes.append(len(feed["camera"]))
        return super().infer_impl(feed)


class PoisonedEngine(CountingEngine):
    """Fails any batch holding a clip whose first keypoint x is negative (valid per contract)."""

    def infer_impl(self, feed):
        self.batch_sizes.append(len(feed["camera"]))
        if (feed["keypoints"][:, 0, 0, 0] < 0).any():
            raise RuntimeError("engine failure on a poisoned clip")
        return OrtEngine.infer_impl(self, feed)


class GatedEngine(CountingEngine):
    """Blocks every call until ``gate`` is set, so a test can hold requests in the queue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def infer_impl(self, feed):
        self.entered.set()
        assert self.gate.wait(10)
        return super().infer_impl(feed)


def load_frames_with(load_frame):
    """A preprocess hook for these tests: ``frames`` given as 'paths', decoded by ``load_frame``
    (which may also return the crop size, as images.load_frame does)."""
    def preprocess(clip):
        if isinstance(clip["frames"], np.ndarray):
            return clip
        loaded = [load_frame(path) for path in clip["frames"]]
        if isinstance(loaded[0], tuple):
            return dict(clip, frames=np.stack([frame for frame, _ in loaded]),
                        crop_size=np.array([size for _, size in loaded], np.float32))
        return dict(clip, frames=np.stack(loaded))
    return preprocess


def single(engine, clip):
    """The reference: one clip, alone, straight through the engine."""
    outputs = engine.infer(batch_feed([clip]))
    return outputs["embedding"][0], outputs["part_weights"][0]


def poisoned(clip):
    bad = dict(clip, keypoints=clip["keypoints"].copy())
    bad["keypoints"][0, 0, 0] = -1.0
    return bad


# --- batching ------------------------------------------------------------------------------
def test_clips_from_several_requests_share_one_engine_call(toy_model, clips):
    engine = CountingEngine(toy_model)
    with Runner(engine, max_batch_size=8, max_queue_delay_ms=5000) as runner:
        futures = [runner.submit_tracklet(clips[:3]), runner.submit_tracklet(clips[3:7]), runner.submit_clip(clips[7])]
        for future in futures:
            future.result(timeout=5)     # long before the 5 s delay: the batch was full
    assert engine.batch_sizes == [8]


def test_clip_result_holds_embedding_and_part_weights(toy_model, clips):
    engine = OrtEngine(toy_model)
    with Runner(engine) as runner:
        result = runner.submit_clip(clips[2]).result(timeout=5)
        embedding, part_weights = single(engine, clips[2])
    assert set(result) == {"embedding", "part_weights"}
    assert np.array_equal(result["embedding"], embedding)
    assert np.array_equal(result["part_weights"], part_weights)


def test_tracklet_feature_is_the_mean_of_its_clip_embeddings(toy_model, clips):
    engine = OrtEngine(toy_model)
    with Runner(engine) as runner:
        feature = runner.submit_tracklet(clips[:5]).result(timeout=5)
        expected = tracklet_feature(np.stack([single(engine, clip)[0] for clip in clips[:5]]))
    assert feature.shape == (100,) and feature.dtype == np.float32
    assert np.array_equal(feature, expected)


def test_tracklet_above_max_batch_is_split_across_engine_calls(toy_model, clips):
    engine = CountingEngine(toy_model)
    tracklet = [clips[index % len(clips)] for index in range(20)]
    with Runner(engine, max_batch_size=8, max_queue_delay_ms=50) as runner:
        feature = runner.submit_tracklet(tracklet).result(timeout=5)
        expected = tracklet_feature(np.stack([single(engine, clip)[0] for clip in tracklet]))
    runner_calls = engine.batch_sizes[:-20]          # the rest are the reference's single calls
    assert max(runner_calls) <= 8 and sum(runner_calls) == 20 and len(runner_calls) >= 3
    assert np.array_equal(feature, expected)


def test_engine_max_batch_bounds_the_runner(toy_model, clips):
    engine = CountingEngine(toy_model, max_batch=4)
    with Runner(engine, max_queue_delay_ms=50) as runner:
        assert runner.max_batch_size == 4
        runner.submit_tracklet(clips[:7]).result(timeout=5)
    assert max(engine.batch_sizes) <= 4 and sum(engine.batch_sizes) == 7


def test_max_batch_size_above_the_engines_is_refused(toy_model):
    engine = OrtEngine(toy_model, max_batch=4)
    with pytest.raises(KeyreidError, match="above the engine's maximum batch of 4"):
        Runner(engine, max_batch_size=8)
    assert not engine.is_active          # the runner activated it, so it cleaned up


def test_lone_clip_waits_for_the_queue_delay_then_goes_alone(toy_model, clips):
    engine = CountingEngine(toy_model)
    with Runner(engine, max_batch_size=8, max_queue_delay_ms=300) as runner:
        started = time.monotonic()
        runner.submit_clip(clips[0]).result(timeout=5)
        waited = time.monotonic() - started
    assert 0.29 <= waited < 2.0
    assert engine.batch_sizes == [1]


def test_full_batch_goes_without_waiting_for_the_delay(toy_model, clips):
    engine = CountingEngine(toy_model)
    with Runner(engine, max_batch_size=8, max_queue_delay_ms=10_000) as runner:
        started = time.monotonic()
        futures = [runner.submit_clip(clip) for clip in clips]
        for future in futures:
            future.result(timeout=5)
        assert time.monotonic() - started < 3.0
    assert engine.batch_sizes == [8]


# --- the bounded queue ---------------------------------------------------------------------
def hold_first_request(runner, engine, clip):
    """Submit one clip and wait until the engine is busy (and blocked) with it."""
    first = runner.submit_clip(clip)
    assert engine.entered.wait(5)
    return first


def test_full_queue_blocks_the_submitter_until_there_is_room(toy_model, clips):
    engine = GatedEngine(toy_model)
    with Runner(engine, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2) as runner:
        futures = [hold_first_request(runner, engine, clips[0])]
        futures += [runner.submit_clip(clips[1]), runner.submit_clip(clips[2])]   # fill the queue
        late = []
        submitter = threading.Thread(target=lambda: late.append(runner.submit_clip(clips[3])))
        submitter.start()
        submitter.join(0.3)
        assert submitter.is_alive()          # blocked: the queue is full
        engine.gate.set()
        submitter.join(5)
        assert not submitter.is_alive()
        for future in futures + late:
            future.result(timeout=5)


def test_full_queue_raises_when_told_not_to_block(toy_model, clips):
    engine = GatedEngine(toy_model)
    with Runner(engine, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2,
                block_when_full=False) as runner:
        futures = [hold_first_request(runner, engine, clips[0])]
        futures += [runner.submit_clip(clips[1]), runner.submit_tracklet(clips[2:4])]
        with pytest.raises(QueueFull, match="queue is full"):
            runner.submit_clip(clips[4])
        engine.gate.set()
        for future in futures:
            future.result(timeout=5)
        runner.submit_clip(clips[4]).result(timeout=5)     # room again


# --- failures stay with their request ------------------------------------------------------
def test_bad_requests_fail_only_their_own_futures(toy_model, clips):
    engine = CountingEngine(toy_model)
    bad_shape = dict(clips[1], frames=clips[1]["frames"][:3])
    bad_camera = dict(clips[2], camera=6)
    bad_dtype = dict(clips[3], frames=clips[3]["frames"].astype(np.float32))
    with Runner(engine, max_batch_size=8, max_queue_delay_ms=20) as runner:
        good = runner.submit_clip(clips[0])
        failed_shape = runner.submit_clip(bad_shape)
        failed_camera = runner.submit_tracklet([clips[4], bad_camera])
        failed_dtype = runner.submit_clip(bad_dtype)
        good_tracklet = runner.submit_tracklet(clips[4:6])
        assert good.result(timeout=5)["embedding"].shape == (100,)
        assert good_tracklet.result(timeout=5).shape == (100,)
        with pytest.raises(KeyreidError, match=r"frames has shape \[3, 256, 128, 3\]; expected \[4, 256, 128, 3\]"):
            failed_shape.result(timeout=5)
        with pytest.raises(KeyreidError, match="clip 1 of the tracklet: camera 6 is out of range"):
            failed_camera.result(timeout=5)
        with pytest.raises(KeyreidError, match="frames has dtype float32; expected uint8"):
            failed_dtype.result(timeout=5)


def test_mean_camera_is_accepted(toy_model, clips):
    with Runner(OrtEngine(toy_model)) as runner:
        assert runner.submit_clip(dict(clips[0], camera=-1)).result(timeout=5)["embedding"].shape == (100,)


def test_malformed_requests_fail_their_futures(toy_model, clips):
    with Runner(OrtEngine(toy_model)) as runner:
        with pytest.raises(KeyreidError, match="missing camera"):
            runner.submit_clip({k: v for k, v in clips[0].items() if k != "camera"}).result(timeout=5)
        with pytest.raises(KeyreidError, match="camera must be one integer"):
            runner.submit_clip(dict(clips[0], camera=1.5)).result(timeout=5)
        with pytest.raises(KeyreidError, match="at least one clip"):
            runner.submit_tracklet([]).result(timeout=5)
        with pytest.raises(KeyreidError, match="list of clips, got one clip"):
            runner.submit_tracklet(clips[0]).result(timeout=5)


def test_engine_failure_on_a_batch_fails_only_the_offending_request(toy_model, clips):
    engine = PoisonedEngine(toy_model)
    with Runner(engine, max_batch_size=8, max_queue_delay_ms=5000) as runner:
        goods = [runner.submit_clip(clip) for clip in clips[:5]]
        bad = runner.submit_tracklet([clips[5], poisoned(clips[6])])
        last_good = runner.submit_clip(clips[7])                # 8 clips: one full batch
        for future in goods + [last_good]:
            assert future.result(timeout=5)["embedding"].shape == (100,)
        with pytest.raises(RuntimeError, match="poisoned clip"):
            bad.result(timeout=5)
        # The batch of 8 failed, then each of its 7 requests ran alone.
        assert engine.batch_sizes == [8, 1, 1, 1, 1, 1, 2, 1]
        # ...and the runner keeps serving (8 clips: a full batch, no 5 s wait).
        assert runner.submit_tracklet(clips).result(timeout=5).shape == (100,)


def test_failing_preprocess_fails_only_its_tracklet(toy_model, clips):
    def load_frame(path):
        if path == "missing.jpg":
            raise KeyreidError("missing.jpg: no such image")
        return clips[int(path)]["frames"][0]

    undecoded = [dict(clips[0], frames=["0", "1", "2", "3"]), dict(clips[1], frames=["4", "missing.jpg", "5", "6"])]
    with Runner(OrtEngine(toy_model), preprocess=load_frames_with(load_frame), max_queue_delay_ms=5) as runner:
        bad = runner.submit_tracklet(undecoded)
        good = runner.submit_tracklet(undecoded[:1])
        with pytest.raises(KeyreidError, match="missing.jpg"):
            bad.result(timeout=5)
        assert good.result(timeout=5).shape == (100,)


# --- preprocessing -------------------------------------------------------------------------
def test_undecoded_tracklets_are_loaded_on_the_pool_and_match_decoded_ones(toy_model, clips):
    """Frames given as 'paths' are decoded by ``load_frame`` on worker threads."""
    frames_by_path = {f"{clip_index}/{frame}.jpg": clips[clip_index]["frames"][frame]
                      for clip_index in range(len(clips)) for frame in range(4)}
    loader_threads = set()

    def load_frame(path):
        loader_threads.add(threading.current_thread().name)
        return frames_by_path[path]

    def undecoded(clip_index):
        return dict(clips[clip_index], frames=[f"{clip_index}/{frame}.jpg" for frame in range(4)])

    engine = OrtEngine(toy_model)
    with Runner(engine, preprocess=load_frames_with(load_frame), preprocess_workers=3) as runner:
        tracklet = runner.submit_tracklet([undecoded(index) for index in range(6)])
        decoded_clip = runner.submit_clip(clips[7])              # arrays pass through unchanged
        expected = tracklet_feature(np.stack([single(engine, clips[index])[0] for index in range(6)]))
        assert np.array_equal(tracklet.result(timeout=5), expected)
        assert np.array_equal(decoded_clip.result(timeout=5)["embedding"], single(engine, clips[7])[0])
    assert loader_threads and all(name.startswith("keyreid-preprocess") for name in loader_threads)


def test_loader_returning_crop_size_fills_the_clips_crop_size(toy_model, clips):
    """``images.load_frame`` returns (frame, (width, height)); the hook takes crop_size from it."""
    def load_frame(path):
        return clips[0]["frames"][int(path)], (64, 128)

    undecoded = {key: value for key, value in clips[0].items() if key != "crop_size"}
    undecoded["frames"] = ["0", "1", "2", "3"]
    engine = OrtEngine(toy_model)
    with Runner(engine, preprocess=load_frames_with(load_frame), max_queue_delay_ms=1) as runner:
        result = runner.submit_clip(undecoded).result(timeout=5)
        expected = single(engine, dict(clips[0], crop_size=np.tile(np.float32([64, 128]), (4, 1))))
    assert np.array_equal(result["part_weights"], expected[1])


# --- shutting down -------------------------------------------------------------------------
def test_close_drains_pending_requests_without_waiting_for_the_delay(toy_model, clips):
    engine = OrtEngine(toy_model)
    runner = Runner(engine, max_batch_size=16, max_queue_delay_ms=10_000)
    futures = [runner.submit_clip(clip) for clip in clips[:3]] + [runner.submit_tracklet(clips[3:6])]
    started = time.monotonic()
    runner.close()
    assert time.monotonic() - started < 3.0
    assert all(future.done() and future.exception() is None for future in futures)
    assert not engine.is_active                  # the runner activated it, the runner closed it
    with pytest.raises(KeyreidError, match="closed"):
        runner.submit_clip(clips[0])
    runner.close()                               # twice is fine


def test_close_drains_requests_still_in_preprocessing(toy_model, clips):
    def slow_load(path):
        time.sleep(0.05)
        return clips[0]["frames"][0]

    runner = Runner(OrtEngine(toy_model), preprocess=load_frames_with(slow_load), max_queue_delay_ms=10_000)
    futures = [runner.submit_tracklet([dict(clips[0], frames=["a"] * 4)] * 2) for _ in range(3)]
    runner.close()
    assert all(future.done() and future.exception() is None for future in futures)


def test_runner_leaves_an_engine_it_did_not_activate_active(toy_model, clips):
    with OrtEngine(toy_model) as engine:
        with Runner(engine) as runner:
            runner.submit_clip(clips[0]).result(timeout=5)
        assert engine.is_active


def test_cancelled_request_is_skipped(toy_model, clips):
    engine = GatedEngine(toy_model)
    with Runner(engine, max_batch_size=1, max_queue_delay_ms=0) as runner:
        first = hold_first_request(runner, engine, clips[0])
        cancelled = runner.submit_clip(clips[1])
        assert cancelled.cancel()
        last = runner.submit_clip(clips[2])
        engine.gate.set()
        first.result(timeout=5)
        last.result(timeout=5)
    assert engine.batch_sizes == [1, 1]


# --- load ----------------------------------------------------------------------------------
def make_requests(clips, count, seed):
    """A mix of clip and tracklet requests with per-request keypoints and cameras."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        picked = [dict(clips[index], keypoints=rng.uniform(0, 128, (4, 17, 3)).astype(np.float32),
                       camera=int(rng.integers(-1, 6)))
                  for index in rng.integers(0, len(clips), int(rng.integers(1, 4)))]
        requests.append(("clip", picked[0]) if len(picked) == 1 else ("tracklet", picked))
    return requests


def submit_all(runner, requests, threads=6):
    """Submit ``requests`` from several threads; return futures in request order."""
    futures = [None] * len(requests)

    def worker(start):
        for index in range(start, len(requests), threads):
            kind, payload = requests[index]
            futures[index] = runner.submit_clip(payload) if kind == "clip" else runner.submit_tracklet(payload)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return futures


def test_many_threads_many_requests_match_single_request_results(toy_model, clips):
    engine = CountingEngine(toy_model)
    requests = make_requests(clips, 300, seed=11)
    with Runner(engine, max_batch_size=16, max_queue_delay_ms=2, max_queue_size=32) as runner:
        futures = submit_all(runner, requests)
        results = [future.result(timeout=30) for future in futures]
        runner_calls = len(engine.batch_sizes)
        for (kind, payload), result in zip(requests, results):
            if kind == "clip":
                embedding, part_weights = single(engine, payload)
                assert np.array_equal(result["embedding"], embedding)
                assert np.array_equal(result["part_weights"], part_weights)
            else:
                expected = tracklet_feature(np.stack([single(engine, clip)[0] for clip in payload]))
                assert np.array_equal(result, expected)
    total_clips = sum(1 if kind == "clip" else len(payload) for kind, payload in requests)
    assert sum(engine.batch_sizes[:runner_calls]) == total_clips
    assert runner_calls < total_clips / 2          # clips really were batched together


def test_memory_does_not_grow_across_repeated_runs(toy_model, clips):
    requests = make_requests(clips, 60, seed=3)
    with Runner(OrtEngine(toy_model), max_batch_size=16, max_queue_delay_ms=1) as runner:
        def run_round():
            for future in submit_all(runner, requests, threads=4):
                future.result(timeout=30)

        run_round()                                   # warm up: pools, caches, first allocations
        tracemalloc.start()
        try:
            run_round()
            gc.collect()
            baseline = tracemalloc.get_traced_memory()[0]
            for _ in range(3):
                run_round()
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
    assert grown < 256 * 1024, f"traced memory grew by {grown} bytes over 3 rounds"


# --- nothing waits on itself; faults fail futures, not the runner --------------------------
def test_done_callback_submitting_to_a_full_queue_gets_queue_full_instead_of_deadlocking(toy_model, clips):
    engine = GatedEngine(toy_model)
    outcome = []

    def resubmit(done):
        try:
            outcome.append(runner.submit_clip(clips[5]))
        except QueueFull as exc:
            outcome.append(exc)

    with Runner(engine, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2) as runner:
        first = hold_first_request(runner, engine, clips[0])
        first.add_done_callback(resubmit)           # runs on the scheduler thread
        rest = [runner.submit_clip(clips[1]), runner.submit_clip(clips[2])]   # queue full
        engine.gate.set()
        for future in [first] + rest:
            future.result(timeout=5)
    assert len(outcome) == 1 and isinstance(outcome[0], QueueFull) and "done-callback" in str(outcome[0])


def test_close_called_from_a_done_callback_on_a_worker_thread_returns(toy_model, clips):
    def load_frame(path):
        raise KeyreidError("unreadable")

    closed = threading.Event()
    runner = Runner(OrtEngine(toy_model), preprocess=load_frames_with(load_frame), max_queue_delay_ms=0)
    other = runner.submit_clip(clips[1])
    bad = runner.submit_clip(dict(clips[0], frames=["x"] * 4))
    bad.add_done_callback(lambda done: (runner.close(), closed.set()))
    assert closed.wait(5)
    other.result(timeout=5)
    runner.close()


class ExplodingEngine(CountingEngine):
    """Raises a BaseException (not an Exception) the first ``failures`` times it is called."""

    def __init__(self, *args, failures=1, exception=SystemExit, **kwargs):
        super().__init__(*args, **kwargs)
        self.failures, self.exception = failures, exception

    def infer_impl(self, feed):
        self.batch_sizes.append(len(feed["camera"]))
        if self.failures:
            self.failures -= 1
            raise self.exception("engine fault")
        return OrtEngine.infer_impl(self, feed)


def test_base_exception_from_the_engine_fails_the_request_and_the_runner_keeps_serving(toy_model, clips):
    engine = ExplodingEngine(toy_model, failures=2, exception=KeyboardInterrupt)
    with Runner(engine, max_queue_delay_ms=0) as runner:
        failed = runner.submit_clip(clips[0])
        assert isinstance(failed.exception(timeout=5), KeyboardInterrupt)
        assert runner.submit_clip(clips[1]).result(timeout=5)["embedding"].shape == (100,)
        assert runner.is_serving


def test_one_off_engine_failure_on_a_single_request_batch_is_retried(toy_model, clips):
    engine = ExplodingEngine(toy_model, failures=1, exception=RuntimeError)
    with Runner(engine, max_queue_delay_ms=0) as runner:
        result = runner.submit_tracklet(clips[:3]).result(timeout=5)
        expected = tracklet_feature(np.stack([single(engine, clip)[0] for clip in clips[:3]]))
    assert engine.batch_sizes[:2] == [3, 3]
    assert np.array_equal(result, expected)


class NanEngine(CountingEngine):
    """Returns NaN in the embedding of clips whose camera is 5."""

    def infer_impl(self, feed):
        outputs = OrtEngine.infer_impl(self, feed)
        outputs["embedding"][feed["camera"] == 5, 3] = np.nan
        return outputs


def test_non_finite_outputs_fail_only_the_affected_requests(toy_model, clips):
    with Runner(NanEngine(toy_model), max_batch_size=8, max_queue_delay_ms=20) as runner:
        good = runner.submit_tracklet([clips[0], clips[1]])
        bad = runner.submit_tracklet([clips[0], clips[5]])      # clips[5] has camera 5
        bad_clip = runner.submit_clip(clips[5])
        assert np.isfinite(good.result(timeout=5)).all()
        with pytest.raises(KeyreidError, match="NaN or infinite values for clip 1 of the tracklet"):
            bad.result(timeout=5)
        with pytest.raises(KeyreidError, match="NaN or infinite values for the clip"):
            bad_clip.result(timeout=5)


def test_leaving_the_block_on_an_exception_cancels_what_is_queued(toy_model, clips):
    engine = GatedEngine(toy_model)
    with pytest.raises(KeyboardInterrupt):
        with Runner(engine, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=64) as runner:
            running = hold_first_request(runner, engine, clips[0])
            queued = [runner.submit_clip(clips[index % 8]) for index in range(40)]
            threading.Timer(0.2, engine.gate.set).start()
            raise KeyboardInterrupt
    assert running.exception(timeout=0) is None or running.done()
    assert all(isinstance(future.exception(timeout=0), Cancelled) for future in queued)
    assert len(engine.batch_sizes) <= 2


def test_run_tracklets_fails_what_waits_on_a_hung_engine_instead_of_waiting_forever(toy_model, tmp_path):
    from keyreid.runtime.serving.pipeline import run_tracklets
    from keyreid.runtime.inputs.poses import PoseTally
    from keyreid.runtime.serving.pipeline import clip_loader
    from keyreid.runtime.inputs.tracklets import discover_tracklets
    import cv2
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "0.png"), np.zeros((256, 128, 3), np.uint8))
    engine = GatedEngine(toy_model)
    tally = PoseTally()
    started = time.monotonic()
    with Runner(engine, preprocess=clip_loader(tally), max_batch_size=1, max_queue_delay_ms=0) as runner:
        threading.Timer(3.0, engine.gate.set).start()
        run = run_tracklets(runner, discover_tracklets(tmp_path).tracklets, tally, stall_timeout_s=0.5)
    assert time.monotonic() - started < 8
    assert [failure.name for failure in run.failures] == ["a", "b"]
    assert "appears hung" in run.failures[0].reason


def test_after_a_hung_engine_fills_the_queue_later_tracklets_fail_without_waiting_each(toy_model, tmp_path):
    from keyreid.runtime.serving.pipeline import clip_loader, run_tracklets
    from keyreid.runtime.inputs.poses import PoseTally
    from keyreid.runtime.inputs.tracklets import discover_tracklets
    import cv2
    names = [f"t{index}" for index in range(6)]
    for name in names:
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "0.png"), np.zeros((256, 128, 3), np.uint8))
    engine = GatedEngine(toy_model)
    tally = PoseTally()
    with Runner(engine, preprocess=clip_loader(tally), max_batch_size=1, max_queue_delay_ms=0,
                max_queue_size=1, block_timeout_s=0.3) as runner:
        threading.Timer(5.0, engine.gate.set).start()
        run = run_tracklets(runner, discover_tracklets(tmp_path).tracklets, tally, stall_timeout_s=0.5)
    reasons = {failure.name: failure.reason for failure in run.failures}
    assert sorted(reasons) == names
    # One tracklet met the full queue and waited block_timeout_s; the ones after it did not wait.
    full = [name for name, reason in reasons.items() if reason.startswith("no room in the runner's queue")]
    not_run = [name for name, reason in reasons.items() if reason.startswith("not run: no room in the runner's queue")]
    assert len(full) == 1 and len(not_run) >= 3, reasons
