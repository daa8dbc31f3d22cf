"""Engines: the docs/contract.md §6 contract check on load, the feed check, bad files, dispatch by
suffix, and imports that stay free of torch and of the optional backends."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keyreid.errors import KeyreidError
from keyreid.runtime.backends.onnxruntime import CPU_CLIPS_PER_RUN, OrtEngine, choose_providers
from keyreid.contract import INPUTS
from keyreid.runtime.backends import open_engine
from keyreid.runtime.backends.base import check_feed

from toy_engine_model import batch_feed, build_toy_model, expected_outputs, random_clip


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("engines") / "toy.onnx")


@pytest.fixture
def feed():
    rng = np.random.default_rng(1)
    return batch_feed([random_clip(rng, camera) for camera in (0, 3, -1)])


def load_error(path, **options) -> str:
    with pytest.raises(KeyreidError) as caught:
        open_engine(path, **options).activate()
    return str(caught.value)


# --- a model that honours the contract ------------------------------------------------------
def test_onnx_engine_reports_contract_specs_and_reads_embedding_length(toy_model):
    with open_engine(toy_model) as engine:
        assert isinstance(engine, OrtEngine)
        assert [spec.name for spec in engine.input_specs] == ["frames", "keypoints", "crop_size", "camera"]
        assert engine.embedding_dim == 100             # 25 * width 4, read from the model
        assert engine.output_specs[1].shape == ("N", 128, 6)
        assert engine.max_batch is None
        assert engine.num_cameras == 6                 # from metadata_props


def test_onnx_engine_computes_the_model_outputs(toy_model, feed):
    with open_engine(toy_model) as engine:
        outputs = engine.infer(feed)
    expected = expected_outputs(feed)
    assert set(outputs) == {"embedding", "part_weights"}
    np.testing.assert_array_equal(outputs["embedding"], expected["embedding"])
    np.testing.assert_array_equal(outputs["part_weights"], expected["part_weights"])


def test_cpu_engine_runs_a_batch_in_pieces_with_each_clips_own_result(toy_model):
    rng = np.random.default_rng(2)
    feed = batch_feed([random_clip(rng, camera) for camera in (0, 3, -1, 5, 1)])
    with open_engine(toy_model, providers=["CPUExecutionProvider"]) as default, \
            open_engine(toy_model, clips_per_run=2) as in_pairs, open_engine(toy_model, clips_per_run=64) as whole:
        assert (default.clips_per_run, in_pairs.clips_per_run) == (CPU_CLIPS_PER_RUN, 2)
        results = [engine.infer(feed) for engine in (default, in_pairs, whole)]
    expected = expected_outputs(feed)
    for outputs in results:
        np.testing.assert_array_equal(outputs["embedding"], expected["embedding"])
        np.testing.assert_array_equal(outputs["part_weights"], expected["part_weights"])


def test_clips_per_run_below_one_is_refused(toy_model):
    with pytest.raises(KeyreidError, match="clips_per_run must be at least 1"):
        OrtEngine(toy_model, clips_per_run=0)


def test_engine_is_inactive_until_activated_and_after_the_with_block(toy_model, feed):
    engine = open_engine(toy_model)
    with pytest.raises(KeyreidError, match="not active"):
        engine.infer(feed)
    with engine:
        assert engine.is_active
    assert not engine.is_active
    with pytest.raises(KeyreidError, match="not active"):
        engine.max_batch


def test_a_file_without_a_metadata_key_is_refused_naming_the_file_and_the_key(tmp_path):
    path = build_toy_model(tmp_path / "no_meta.onnx", num_cameras=None)
    message = load_error(path)
    assert str(path) in message and "missing key 'num_cameras'" in message


def test_num_cameras_option_overrides_the_files_metadata(tmp_path, feed):
    path = build_toy_model(tmp_path / "six.onnx", num_cameras=6)
    with open_engine(path) as engine:
        assert engine.num_cameras == 6
    with open_engine(path, num_cameras=2) as engine:
        assert engine.num_cameras == 2
        with pytest.raises(KeyreidError, match="camera 3 is out of range: this model takes 0..1"):
            engine.infer(feed)


def test_a_feed_for_a_model_that_does_not_know_its_cameras_only_takes_the_mean_camera(feed):
    # only a Triton model configured without keyreid's parameters has no camera count
    check_feed(dict(feed, camera=np.full(3, -1, np.int64)), INPUTS, num_cameras=None)
    with pytest.raises(KeyreidError, match="camera 99 cannot be checked.*--num-cameras"):
        check_feed(dict(feed, camera=np.array([99, 0, -1], np.int64)), INPUTS, num_cameras=None)


def test_bad_num_cameras_metadata_is_reported(tmp_path):
    path = build_toy_model(tmp_path / "bad_meta.onnx", num_cameras=0)
    assert "num_cameras" in load_error(path)


# --- contract mismatches on load -----------------------------------------------------------
def test_renamed_input_is_reported_as_missing_and_unexpected(tmp_path):
    path = build_toy_model(tmp_path / "renamed.onnx", inputs={"frames": {"name": "images"}})
    message = load_error(path)
    assert str(path) in message
    assert "missing input 'frames'" in message
    assert "unexpected input 'images'" in message


def test_wrong_input_dtype_is_reported(tmp_path):
    path = build_toy_model(tmp_path / "float_frames.onnx", inputs={"frames": {"dtype": np.float32}})
    assert "input 'frames' has float32; the contract needs uint8" in load_error(path)


def test_camera_as_int32_is_reported(tmp_path):
    path = build_toy_model(tmp_path / "int32_camera.onnx", inputs={"camera": {"dtype": np.int32}})
    assert "input 'camera' has int32; the contract needs int64" in load_error(path)


def test_static_batch_is_reported(tmp_path):
    path = build_toy_model(tmp_path / "static.onnx", inputs={"keypoints": {"shape": (1, 4, 17, 3)}})
    assert "batch axis of input 'keypoints' is fixed at 1" in load_error(path)


def test_wrong_fixed_dimension_is_reported(tmp_path):
    path = build_toy_model(tmp_path / "small_frames.onnx", inputs={"frames": {"shape": ("N", 4, 128, 64, 3)}})
    message = load_error(path)
    assert "axis 2 of input 'frames' is 128; the contract needs 256" in message
    assert "axis 3 of input 'frames' is 64; the contract needs 128" in message


def test_wrong_rank_is_reported(tmp_path):
    path = build_toy_model(tmp_path / "rank.onnx", inputs={"crop_size": {"shape": ("N", 4, 2, 1)}})
    assert "input 'crop_size' has shape [?, 4, 2, 1]; the contract needs [N, 4, 2]" in load_error(path)


def test_missing_output_is_reported(tmp_path):
    path = build_toy_model(tmp_path / "no_weights.onnx", drop_outputs=["part_weights"])
    assert "missing output 'part_weights'" in load_error(path)


def test_extra_output_is_reported(tmp_path):
    path = build_toy_model(tmp_path / "debug.onnx", extra_output=True)
    assert "unexpected output 'debug'" in load_error(path)


def test_dynamic_embedding_length_is_reported(tmp_path):
    path = build_toy_model(tmp_path / "dynamic_e.onnx", dynamic_embedding_length=True)
    assert "dynamic length" in load_error(path)


def test_embedding_length_other_than_the_metadatas_is_reported(tmp_path):
    path = build_toy_model(tmp_path / "odd_e.onnx", embedding_length=99)
    assert "'embedding' has length 99; the file's metadata says 100" in load_error(path)


# --- files that are not models -------------------------------------------------------------
def test_truncated_onnx_file_is_reported_with_its_name(tmp_path, toy_model):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(toy_model.read_bytes()[:5000])
    message = load_error(path)
    assert str(path) in message and "cannot be loaded as an ONNX model" in message


def test_garbage_onnx_file_is_reported_with_its_name(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(bytes(range(256)) * 40)
    message = load_error(path)
    assert str(path) in message and "cannot be loaded as an ONNX model" in message


def test_empty_file_is_reported(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(KeyreidError, match="empty"):
        open_engine(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(KeyreidError, match="does not exist"):
        open_engine(tmp_path / "absent.onnx")


def test_unknown_suffix_is_reported(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"x")
    with pytest.raises(KeyreidError, match="unknown engine file type '.pt'"):
        open_engine(path)


def test_plan_without_tensorrt_names_the_gpu_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)    # import tensorrt -> ImportError
    path = tmp_path / "model.plan"
    path.write_bytes(b"not really an engine")
    engine = open_engine(path)                           # cheap: nothing imported yet
    with pytest.raises(KeyreidError, match=r'pip install "keyreid\[gpu\]"'):
        engine.activate()


@pytest.mark.parametrize("suffix", [".engine", ".trt"])
def test_other_tensorrt_suffixes_open_the_tensorrt_engine(tmp_path, suffix):
    from keyreid.runtime.backends.tensorrt import TrtEngine
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"x")
    assert isinstance(open_engine(path), TrtEngine)


# --- feeds checked before the backend ------------------------------------------------------
def infer_error(toy_model, feed, **options) -> str:
    with open_engine(toy_model, **options) as engine, pytest.raises(KeyreidError) as caught:
        engine.infer(feed)
    return str(caught.value)


def test_feed_missing_an_input_is_rejected(toy_model, feed):
    del feed["crop_size"]
    assert "missing input 'crop_size'" in infer_error(toy_model, feed)


def test_feed_with_unknown_input_is_rejected(toy_model, feed):
    feed["extra"] = np.zeros(3, np.float32)
    assert "unexpected input 'extra'" in infer_error(toy_model, feed)


def test_feed_with_wrong_dtype_is_rejected_not_cast(toy_model, feed):
    feed["frames"] = feed["frames"].astype(np.float32)
    assert "input 'frames' has dtype float32; the engine needs uint8" in infer_error(toy_model, feed)


def test_feed_with_wrong_shape_is_rejected(toy_model, feed):
    feed["keypoints"] = feed["keypoints"][:, :, :16]
    assert "input 'keypoints' has shape [3, 4, 16, 3]" in infer_error(toy_model, feed)


def test_feed_with_inconsistent_batch_is_rejected(toy_model, feed):
    feed["camera"] = feed["camera"][:2]
    assert "disagree on the batch size" in infer_error(toy_model, feed)


def test_feed_with_camera_out_of_range_is_rejected(toy_model, feed):
    feed["camera"] = np.array([0, 6, -1], np.int64)
    assert "camera 6 is out of range" in infer_error(toy_model, feed)


def test_feed_with_camera_below_mean_camera_is_rejected(toy_model, feed):
    feed["camera"] = np.array([0, -2, 1], np.int64)
    assert "camera -2 is out of range" in infer_error(toy_model, feed)


def test_feed_above_max_batch_is_rejected(toy_model, feed):
    assert "above this engine's maximum of 2" in infer_error(toy_model, feed, max_batch=2)


def test_feed_that_is_not_a_dict_is_rejected(toy_model, feed):
    assert "dict of input name" in infer_error(toy_model, list(feed.values()))


# --- providers and session options ---------------------------------------------------------
def test_providers_prefer_tensorrt_then_cuda_then_cpu():
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "AzureExecutionProvider"]
    assert choose_providers(available) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_requested_provider_that_is_not_available_is_reported(toy_model):
    assert "CUDAExecutionProvider not available" in load_error(toy_model, providers=["CUDAExecutionProvider"])


def test_explicit_provider_and_thread_count_are_used(toy_model, feed):
    with open_engine(toy_model, providers=["CPUExecutionProvider"], threads=1) as engine:
        assert engine.providers == ["CPUExecutionProvider"]
        np.testing.assert_array_equal(engine.infer(feed)["embedding"], expected_outputs(feed)["embedding"])


# --- imports -------------------------------------------------------------------------------
def test_runtime_modules_import_without_torch_or_backends():
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None          # any import of torch now fails
        import keyreid.runtime.backends.base, keyreid.runtime.serving.runner
        import keyreid.runtime.backends.onnxruntime, keyreid.runtime.backends.tensorrt
        heavy = [name for name in ("onnxruntime", "tensorrt", "cuda", "onnx") if name in sys.modules]
        assert not heavy, heavy
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- TensorRT helpers, on a stand-in for cuda.bindings.runtime (no GPU here) ------------------
class FakeCudart:
    """Just enough of cuda-python's runtime module: tuples of (error, *values)."""

    class cudaError_t:
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    def __init__(self):
        self.next_ptr = 4096
        self.live = set()
        self.fail_next_malloc = False

    def cudaGetErrorName(self, err):
        return (0, b"cudaErrorMemoryAllocation")

    def cudaMalloc(self, nbytes):
        if self.fail_next_malloc:
            return (self.cudaError_t.cudaErrorMemoryAllocation, None)
        self.next_ptr += 4096
        self.live.add(self.next_ptr)
        return (0, self.next_ptr)

    def cudaFree(self, ptr):
        assert ptr in self.live, "double free"
        self.live.remove(ptr)
        return (0,)


@pytest.fixture
def fake_cudart(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return cudart


def test_cuda_call_unpacks_values_and_raises_with_the_error_name(fake_cudart):
    from keyreid.runtime.backends.tensorrt import cuda_call
    assert cuda_call((0, 123)) == 123
    assert cuda_call((0, 1, 2)) == (1, 2)
    assert cuda_call((0,)) is None
    with pytest.raises(KeyreidError, match="CUDA error cudaErrorMemoryAllocation"):
        cuda_call((2, None))


def test_device_buffer_grows_only_when_needed_and_frees_once(fake_cudart):
    from keyreid.runtime.backends.tensorrt import DeviceBuffer
    buffer = DeviceBuffer()
    first = buffer.reserve(1000)
    assert buffer.reserve(500) == first          # smaller request: same memory
    grown = buffer.reserve(2000)
    assert grown != first and fake_cudart.live == {grown}
    buffer.free()
    buffer.free()                                # second free is a no-op
    assert fake_cudart.live == set()


def test_device_buffer_reports_allocation_failure(fake_cudart):
    from keyreid.runtime.backends.tensorrt import DeviceBuffer
    fake_cudart.fail_next_malloc = True
    with pytest.raises(KeyreidError, match="cudaErrorMemoryAllocation"):
        DeviceBuffer().reserve(1 << 40)
