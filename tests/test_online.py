"""Online encoder: frame-by-frame pushes give infer.py's tracklet features; limits, bad input,
idle tracks and many threads. The equivalence test runs the session's reduced ONNX model; the
rest use the toy model of ``toy_engine_model``, whose outputs are exact functions of the input."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from keyreid.comparator import Tolerance, compare_output
from keyreid.errors import KeyreidError
from keyreid.runtime import infer
from keyreid.runtime.backends.onnxruntime import OrtEngine
from keyreid.runtime.backends import open_engine
from keyreid.runtime.serving.online import EncoderBusy, OnlineEncoder
from keyreid.runtime.serving.runner import tracklet_feature
from keyreid.runtime.inputs.tracklets import split_into_clips
from keyreid.synthetic import realistic_keypoints

from toy_engine_model import batch_feed, build_toy_model, expected_outputs

cv2 = pytest.importorskip("cv2")

EQUIVALENCE_LENGTHS = (1, 3, 4, 5, 170, 200)
# (width, height) of each tracklet's crops: MARS's size, and tracker sizes that get resized.
EQUIVALENCE_CROPS = ((128, 256), (48, 96), (128, 256), (100, 220), (64, 128), (128, 256))


def person_crops(rng, num_frames, crop):
    """Noise frames at ``crop`` (width, height) and realistic keypoints in that crop's pixels."""
    frames = rng.integers(0, 256, (num_frames, crop[1], crop[0], 3), dtype=np.uint8)
    clips = -(-num_frames // 4)
    keypoints, _ = realistic_keypoints(rng, clips, crop_sizes=[crop], size_jitter_px=0)
    return frames, keypoints.reshape(-1, 17, 3)[:num_frames]


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("online") / "toy.onnx")


def toy_feature(frames, keypoints, camera):
    """What infer.py computes for a tracklet on the toy model, straight from the model's formula."""
    embeddings = []
    for order in split_into_clips(len(frames)):
        feed = batch_feed([{"frames": frames[order], "keypoints": keypoints[order],
                            "crop_size": np.tile(np.float32([128, 256]), (4, 1)), "camera": camera}])
        embeddings.append(expected_outputs(feed)["embedding"][0])
    return tracklet_feature(np.stack(embeddings))


# --- equivalence with infer.py --tracklets ----------------------------------------------------

def test_pushing_frames_one_by_one_gives_infer_tracklet_features(reduced_onnx, tmp_path):
    rng = np.random.default_rng(12)
    root = tmp_path / "tracklets"
    tracklets = {}
    for length, crop in zip(EQUIVALENCE_LENGTHS, EQUIVALENCE_CROPS):
        frames, keypoints = person_crops(rng, length, crop)
        folder = root / f"len{length:03d}"
        folder.mkdir(parents=True)
        for index in range(length):    # PNG: lossless, so infer.py decodes exactly these pixels
            assert cv2.imwrite(str(folder / f"{index:04d}.png"), frames[index][:, :, ::-1])
            (folder / f"{index:04d}.pose").write_text(str(keypoints[index].tolist()))
        tracklets[folder.name] = (frames, keypoints)
    output = tmp_path / "infer.npz"
    assert infer.main(["--engine", str(reduced_onnx), "--tracklets", str(root), "--output", str(output),
                       "--camera", "2", "--quiet"]) == 0
    expected = dict(zip(np.load(output)["tracklets"], np.load(output)["embeddings"]))

    with open_engine(reduced_onnx) as engine, OnlineEncoder(engine, color="bgr") as encoder:
        def push_track(name):       # one thread per track, all at once, BGR crops as OpenCV has them
            frames, keypoints = tracklets[name]
            for frame, joints in zip(frames, keypoints):
                encoder.push(name, frame[:, :, ::-1], joints, camera=2)
            return encoder.finish(name)
        with ThreadPoolExecutor(len(tracklets)) as pool:
            results = dict(zip(tracklets, pool.map(push_track, tracklets)))

    for name, result in results.items():
        comparison = compare_output(name, result.feature, expected[name], Tolerance(max_rel=1e-6))
        assert comparison.passed, (name, comparison.failures)
        assert result.num_clips == len(split_into_clips(len(tracklets[name][0])))


# --- the toy model: exact features ----------------------------------------------------------

def test_feature_is_none_before_four_frames_then_the_mean_of_complete_clips(toy_model):
    rng = np.random.default_rng(1)
    frames, keypoints = person_crops(rng, 10, (128, 256))
    with OnlineEncoder(open_engine(toy_model)) as encoder:
        for index in range(3):
            encoder.push("a", frames[index], keypoints[index], camera=1)
        assert encoder.feature("a") is None
        for index in range(3, 10):
            encoder.push("a", frames[index], keypoints[index], camera=1)
        np.testing.assert_array_equal(encoder.feature("a"), toy_feature(frames[:8], keypoints[:8], 1))
        result = encoder.finish("a")
    np.testing.assert_array_equal(result.feature, toy_feature(frames, keypoints, 1))
    assert (result.num_frames, result.num_clips) == (10, 3)


def test_frames_after_the_41st_clip_are_counted_but_not_used(toy_model):
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (171, 256, 128, 3), dtype=np.uint8)
    with OnlineEncoder(open_engine(toy_model)) as encoder:
        for frame in frames:
            encoder.push(7, frame, None, camera=0)
        result = encoder.finish(7)
    assert (result.num_frames, result.num_clips) == (171, 41)
    np.testing.assert_array_equal(result.feature, toy_feature(frames[:164], np.zeros((164, 17, 3), np.float32), 0))


def test_rgb_and_bgr_encoders_agree_on_the_same_crops(toy_model):
    rng = np.random.default_rng(3)
    frames, _ = person_crops(rng, 5, (128, 256))
    features = []
    for color, view in (("rgb", frames), ("bgr", frames[..., ::-1])):
        with OnlineEncoder(open_engine(toy_model), color=color) as encoder:
            for frame in view:
                encoder.push("t", frame, None, camera=0)
            features.append(encoder.finish("t").feature)
    np.testing.assert_array_equal(features[0], features[1])


def test_many_threads_pushing_many_tracks_get_their_own_features(toy_model):
    rng = np.random.default_rng(4)
    tracks = {f"cam{index % 3}-{index}": rng.integers(0, 256, (int(rng.integers(1, 23)), 256, 128, 3), np.uint8)
              for index in range(24)}
    no_joints = np.zeros((25, 17, 3), np.float32)

    with OnlineEncoder(open_engine(toy_model), max_tracks=24, max_buffered_frames=3 * 24 + 8) as encoder:
        def push_track(track_id):
            for frame in tracks[track_id]:
                encoder.push(track_id, frame, None, camera=int(track_id[3]))
            return encoder.finish(track_id).feature
        with ThreadPoolExecutor(8) as pool:
            features = dict(zip(tracks, pool.map(push_track, tracks)))
        assert encoder.track_ids == [] and encoder.buffered_frames == 0
    for track_id, frames in tracks.items():
        np.testing.assert_array_equal(features[track_id],
                                      toy_feature(frames, no_joints[:len(frames)], int(track_id[3])))


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("frame, keypoints, camera, message", [
    (np.zeros((0, 64, 3), np.uint8), None, 0, "zero size"),
    (np.zeros((64, 32), np.uint8), None, 0, "uint8 [height, width, 3]"),
    (np.zeros((64, 32, 3), np.float32), None, 0, "uint8 [height, width, 3]"),
    (np.zeros((64, 32, 3), np.uint8), np.zeros((17, 2)), 0, "[17, 3]"),
    (np.zeros((64, 32, 3), np.uint8), np.full((17, 3), np.nan), 0, "NaN"),
    (np.zeros((64, 32, 3), np.uint8), None, 6, "camera"),
    (np.zeros((64, 32, 3), np.uint8), None, 1, "camera 0, not 1"),
], ids=["zero-size-crop", "grey-crop", "float-crop", "keypoint-shape", "nan-keypoints",
        "camera-out-of-range", "camera-changes"])
def test_bad_push_raises_one_clear_error_and_leaves_every_track_intact(toy_model, frame, keypoints, camera, message):
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (6, 256, 128, 3), dtype=np.uint8)
    with OnlineEncoder(open_engine(toy_model)) as encoder:
        for index in range(3):
            encoder.push("victim", frames[index], None, camera=0)
            encoder.push("bystander", frames[index], None, camera=0)
        with pytest.raises(KeyreidError, match=message.replace("[", r"\[").replace("]", r"\]")):
            encoder.push("victim", frame, keypoints, camera)
        for index in range(3, 6):
            encoder.push("victim", frames[index], None, camera=0)
            encoder.push("bystander", frames[index], None, camera=0)
        expected = toy_feature(frames, np.zeros((6, 17, 3), np.float32), 0)
        for track_id in ("victim", "bystander"):
            result = encoder.finish(track_id)
            assert result.num_frames == 6
            np.testing.assert_array_equal(result.feature, expected)


def test_unknown_track_id_is_a_clear_error(toy_model):
    with OnlineEncoder(open_engine(toy_model)) as encoder:
        for call in (encoder.feature, encoder.finish):
            with pytest.raises(KeyreidError, match="unknown track id 'nobody'"):
                call("nobody")
        encoder.push("once", np.zeros((8, 4, 3), np.uint8), None, camera=0)
        encoder.finish("once")
        with pytest.raises(KeyreidError, match="already finished"):
            encoder.finish("once")


# --- limits ---------------------------------------------------------------------------------

def test_live_tracks_are_limited(toy_model):
    frame = np.zeros((8, 4, 3), np.uint8)
    with OnlineEncoder(open_engine(toy_model), max_tracks=2, max_buffered_frames=10) as encoder:
        encoder.push(1, frame, None, camera=0)
        encoder.push(2, frame, None, camera=0)
        with pytest.raises(KeyreidError, match="already 2 live tracks"):
            encoder.push(3, frame, None, camera=0)
        encoder.push(1, frame, None, camera=0)      # known tracks go on
        encoder.finish(2)
        encoder.push(3, frame, None, camera=0)


def test_limits_below_what_one_clip_needs_are_refused(toy_model):
    with pytest.raises(KeyreidError, match="max_buffered_frames must be at least 3 \\* max_tracks \\+ 4 = 10"):
        OnlineEncoder(open_engine(toy_model), max_tracks=2, max_buffered_frames=9)


class GatedEngine(OrtEngine):
    """Holds every engine call until ``gate`` is set: an engine that cannot keep up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def infer_impl(self, feed):
        assert self.gate.wait(10)
        return super().infer_impl(feed)


def test_slow_engine_makes_push_wait_then_raise_busy_without_taking_the_frame(toy_model):
    rng = np.random.default_rng(6)
    frames = rng.integers(0, 256, (12, 256, 128, 3), dtype=np.uint8)
    engine = GatedEngine(toy_model)
    with OnlineEncoder(engine, max_tracks=1, max_buffered_frames=7, busy_timeout_s=0.2) as encoder:
        for frame in frames[:7]:            # one clip in the engine, three frames waiting
            encoder.push("t", frame, None, camera=0)
        started = time.monotonic()
        with pytest.raises(EncoderBusy, match="the frame was not taken"):
            encoder.push("t", frames[7], None, camera=0)
        assert time.monotonic() - started >= 0.2
        engine.gate.set()
        for frame in frames[7:]:            # room again once the engine catches up
            encoder.push("t", frame, None, camera=0)
        result = encoder.finish("t")
    assert result.num_frames == 12
    np.testing.assert_array_equal(result.feature, toy_feature(frames, np.zeros((12, 17, 3), np.float32), 0))


def test_idle_tracks_are_finished_in_the_background(toy_model):
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, (5, 256, 128, 3), dtype=np.uint8)
    finished = []
    done = threading.Event()

    def collect(result):
        finished.append(result)
        done.set()

    with OnlineEncoder(open_engine(toy_model), idle_timeout_s=0.2, on_finished=collect) as encoder:
        for index, frame in enumerate(frames):
            encoder.push("gone", frame, None, camera=3, timestamp=100.0 + index)
        assert done.wait(5)
        assert encoder.track_ids == []
    (result,) = finished
    assert (result.track_id, result.camera, result.num_frames) == ("gone", 3, 5)
    assert (result.first_timestamp, result.last_timestamp) == (100.0, 104.0)
    np.testing.assert_array_equal(result.feature, toy_feature(frames, np.zeros((5, 17, 3), np.float32), 3))


def test_a_failing_on_finished_does_not_stop_other_idle_tracks_being_finished(toy_model):
    rng = np.random.default_rng(8)
    frames = rng.integers(0, 256, (2, 256, 128, 3), dtype=np.uint8)
    finished, done = [], threading.Event()

    def fussy(result):
        finished.append(result.track_id)
        if len(finished) == 2:
            done.set()
        raise RuntimeError("the caller's bug")

    with OnlineEncoder(open_engine(toy_model), idle_timeout_s=0.2, on_finished=fussy) as encoder:
        encoder.push("a", frames[0], None, camera=1)
        encoder.push("b", frames[1], None, camera=1)
        assert done.wait(5)
        encoder.push("c", frames[0], None, camera=1)           # the reaper is still alive
        deadline = time.monotonic() + 5
        while "c" not in finished and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sorted(finished) == ["a", "b", "c"]


def test_finish_after_close_is_a_clear_error(toy_model):
    encoder = OnlineEncoder(open_engine(toy_model), idle_timeout_s=None)
    encoder.push("late", np.zeros((256, 128, 3), np.uint8), None, camera=0)
    encoder.close()
    with pytest.raises(KeyreidError, match="the online encoder is closed"):
        encoder.finish("late")


def test_idle_tracks_without_a_callback_wait_in_drain_finished(toy_model):
    with OnlineEncoder(open_engine(toy_model), idle_timeout_s=60) as encoder:
        encoder.push("first", np.zeros((8, 4, 3), np.uint8), None, camera=0)
        encoder.push("second", np.zeros((8, 4, 3), np.uint8), None, camera=0)
        results = encoder.finish_idle(now=time.monotonic() + 61)
        assert [result.track_id for result in results] == ["first", "second"]
        assert [result.track_id for result in encoder.drain_finished()] == ["first", "second"]
        assert encoder.drain_finished() == []


class PoisonedEngine(OrtEngine):
    """Fails any batch holding a clip whose first joint has x = 13 (valid input otherwise)."""

    def infer_impl(self, feed):
        if (feed["keypoints"][:, :, 0, 0] == 13).any():
            raise RuntimeError("engine failure on a poisoned clip")
        return super().infer_impl(feed)


def test_engine_failure_on_one_track_fails_only_that_track(toy_model):
    rng = np.random.default_rng(8)
    frames = rng.integers(0, 256, (5, 256, 128, 3), dtype=np.uint8)
    poisoned = np.zeros((17, 3), np.float32)
    poisoned[0] = (13, 20, 0.9)
    with OnlineEncoder(PoisonedEngine(toy_model)) as encoder:
        for frame in frames:
            encoder.push("sick", frame, poisoned, camera=0)
            encoder.push("healthy", frame, None, camera=0)
        with pytest.raises(KeyreidError, match="track 'sick': RuntimeError: engine failure on a poisoned clip"):
            encoder.finish("sick")
        result = encoder.finish("healthy")
    np.testing.assert_array_equal(result.feature, toy_feature(frames, np.zeros((5, 17, 3), np.float32), 0))


def test_many_one_frame_tracks_finishing_at_once_fit_while_the_engine_is_stalled(toy_model):
    """Each last partial clip may hold a single frame: the frame limit, not the clip count, rules."""
    engine = GatedEngine(toy_model)
    frames = np.random.default_rng(9).integers(0, 256, (16, 256, 128, 3), dtype=np.uint8)
    with OnlineEncoder(engine, max_tracks=16, max_buffered_frames=3 * 16 + 4, max_batch_size=1) as encoder:
        for track, frame in enumerate(frames):
            encoder.push(track, frame, None, camera=0)
        with ThreadPoolExecutor(16) as pool:
            results = [pool.submit(encoder.finish, track) for track in range(16)]
            time.sleep(0.2)
            engine.gate.set()
            features = [future.result().feature for future in results]
    for frame, feature in zip(frames, features):
        np.testing.assert_array_equal(feature, toy_feature(frame[None], np.zeros((1, 17, 3), np.float32), 0))


def test_feature_waits_at_most_its_timeout_for_a_stalled_engine(toy_model):
    engine = GatedEngine(toy_model)
    with OnlineEncoder(engine) as encoder:
        for _ in range(4):
            encoder.push("t", np.zeros((8, 4, 3), np.uint8), None, camera=0)
        with pytest.raises(KeyreidError, match="did not finish its clips within 0.1 s"):
            encoder.feature("t", timeout=0.1)
        engine.gate.set()
        assert encoder.feature("t").shape == (engine.embedding_dim,)
