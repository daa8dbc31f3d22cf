"""The OpenVINO backend, on real OpenVINO and real exported models: it gives ONNX Runtime's
results on the same file (fp32), stays close in bf16 where the CPU has it (part weights exact), refuses what it
cannot run with one sentence, and is reachable from the CLIs through --backend."""
import threading

import numpy as np
import pytest

from keyreid.cli import run_main
from keyreid.comparator import Tolerance, compare_output
from keyreid.cpu_features import OVERRIDE_VARIABLE, cpu_isa
from keyreid.errors import KeyreidError
from keyreid.runtime import backend_names, compare, infer
from keyreid.runtime.backends.registry import BACKENDS, auto_backend
from keyreid.runtime.backends.openvino import OpenVinoEngine, resolve_inference_precision
from keyreid.runtime.backends.onnxruntime import OrtEngine
from keyreid.runtime.backends import open_engine
from keyreid.synthetic import synthetic_feed, write_synthetic_tracklet

from toy_engine_model import build_toy_model

pytest.importorskip("openvino")
onnx = pytest.importorskip("onnx")

EMBEDDING_REL = 1e-5         # of max |embedding|, OpenVINO f32 against ONNX Runtime
PART_WEIGHTS_ABS = 1e-6
BF16_MIN_COSINE = 0.9995


@pytest.fixture(scope="module")
def small_residual_files(small_residual_checkpoint, tmp_path_factory):
    """The small-residual checkpoint (seed 2, residual scale 1e-3) exported in heatmap mode mean:
    the fp32 file, and the int8 file ONNX Runtime's recipe makes of it. In memory, unverified
    (the export tests verify the exporter): a few seconds instead of the CLI's 25."""
    from keyreid.export.checkpoint import load_checkpoint
    from keyreid.export.pipeline import ExportPipeline

    pipeline = ExportPipeline(load_checkpoint(small_residual_checkpoint), "mean")    # traced once
    folder = tmp_path_factory.mktemp("openvino")
    files = {}
    for precision in ("fp32", "int8"):
        model = pipeline.model(precision, "vnni" if precision == "int8" else None)
        files[precision] = folder / f"small_residual_mean_{precision}.onnx"
        onnx.save(model, str(files[precision]))
    return files


@pytest.fixture(scope="module", params=["reduced_max", "small_residual_mean"])
def model_file(request):
    """Two checkpoints (seeds 1 and 2, residual scales 1 and 1e-3) in two heatmap modes."""
    if request.param == "reduced_max":
        return request.getfixturevalue("reduced_onnx")
    return request.getfixturevalue("small_residual_files")["fp32"]


@pytest.fixture(scope="module")
def feed():
    return synthetic_feed(6, num_cameras=6, seed=3)          # cameras -1, 0, ..., 4


@pytest.fixture(scope="module")
def ort_outputs(model_file, feed):
    with open_engine(model_file) as engine:
        return engine.infer(feed)


@pytest.fixture(scope="module")
def openvino_f32(model_file):
    with open_engine(model_file, backend="openvino") as engine:
        yield engine


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def cosines(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return (actual * expected).sum(1) / np.linalg.norm(actual, axis=1) / np.linalg.norm(expected, axis=1)


# --- OpenVINO f32 is ONNX Runtime's answer ---------------------------------------------------
def test_openvino_f32_gives_onnxruntimes_embeddings(openvino_f32, ort_outputs, feed):
    outputs = openvino_f32.infer(feed)
    assert outputs["embedding"].dtype == np.float32
    assert relative_error(outputs["embedding"], ort_outputs["embedding"]) <= EMBEDDING_REL


def test_openvino_f32_gives_onnxruntimes_part_weights(openvino_f32, ort_outputs, feed):
    part_weights = openvino_f32.infer(feed)["part_weights"]
    assert part_weights.shape == (6, 128, 6) and part_weights.dtype == np.float32
    assert np.abs(part_weights - ort_outputs["part_weights"]).max() <= PART_WEIGHTS_ABS


def test_batch_axis_is_dynamic_and_pieces_give_the_whole_batchs_result(openvino_f32, model_file, feed):
    whole = openvino_f32.infer(feed)
    single = openvino_f32.infer({name: value[2:3] for name, value in feed.items()})
    np.testing.assert_allclose(single["embedding"][0], whole["embedding"][2], rtol=0, atol=1e-5)
    with open_engine(model_file, backend="openvino", clips_per_run=4, threads=1) as in_pieces:
        pieces = in_pieces.infer(feed)
    assert relative_error(pieces["embedding"], whole["embedding"]) <= EMBEDDING_REL


def test_engine_reads_the_files_contract_and_metadata_like_onnxruntime(openvino_f32, model_file):
    assert isinstance(openvino_f32, OpenVinoEngine) and openvino_f32.backend == "openvino"
    assert openvino_f32.compute_precision == "f32"
    with open_engine(model_file) as reference:
        assert isinstance(reference, OrtEngine)
        assert openvino_f32.input_specs == reference.input_specs
        assert openvino_f32.output_specs == reference.output_specs
        assert openvino_f32.metadata == reference.metadata
        assert openvino_f32.num_cameras == reference.num_cameras == 6


def test_outputs_are_copies_the_next_call_does_not_overwrite(openvino_f32, feed):
    first = openvino_f32.infer(feed)
    kept = {name: value.copy() for name, value in first.items()}
    openvino_f32.infer({name: value[::-1].copy() for name, value in feed.items()})
    for name in kept:
        np.testing.assert_array_equal(first[name], kept[name])


def test_concurrent_callers_each_get_their_own_clips_result(openvino_f32, feed):
    expected = openvino_f32.infer(feed)["embedding"]
    results = {}

    def call(index):
        results[index] = openvino_f32.infer({name: value[index:index + 1] for name, value in feed.items()})

    threads = [threading.Thread(target=call, args=(index,)) for index in range(len(feed["camera"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, outputs in results.items():
        np.testing.assert_allclose(outputs["embedding"][0], expected[index], rtol=0, atol=1e-5)
    assert len(results) == len(threads)


# --- precision -------------------------------------------------------------------------------
def test_bf16_stays_close_to_f32_and_leaves_part_weights_exact(model_file, openvino_f32, feed):
    """Where the CPU has bf16 arithmetic; elsewhere asking for it is refused (next test). Both
    checkpoints and heatmap modes: mode mean's keypoint op has matrix products bf16 would lower."""
    if not cpu_isa().bf16:
        with pytest.raises(KeyreidError, match="bf16 needs a CPU with AMX or AVX-512 BF16"):
            open_engine(model_file, backend="openvino", inference_precision="bf16")
        return
    with open_engine(model_file, backend="openvino", inference_precision="bf16") as bf16:
        assert bf16.compute_precision == "bf16"
        low, exact = bf16.infer(feed), openvino_f32.infer(feed)
    assert cosines(low["embedding"], exact["embedding"]).min() >= BF16_MIN_COSINE
    assert np.abs(low["part_weights"] - exact["part_weights"]).max() <= PART_WEIGHTS_ABS


def test_bf16_on_a_cpu_without_it_is_refused_naming_the_cpu_class(reduced_onnx, monkeypatch):
    monkeypatch.setenv(OVERRIDE_VARIABLE, "avx2")
    with pytest.raises(KeyreidError, match="bf16 needs a CPU with AMX or AVX-512 BF16.*CPU class avx2"):
        open_engine(reduced_onnx, backend="openvino", inference_precision="bf16")


@pytest.mark.parametrize("cpu_class, expected", [("amx", "bf16"), ("vnni", "f32"), ("avx2", "f32")])
def test_auto_precision_is_bf16_on_amx_cpus_only(monkeypatch, cpu_class, expected):
    monkeypatch.setenv(OVERRIDE_VARIABLE, cpu_class)
    assert resolve_inference_precision("auto") == expected
    assert resolve_inference_precision("f32") == "f32"


def test_unknown_precision_is_refused():
    with pytest.raises(KeyreidError, match="inference_precision must be one of f32, bf16, auto"):
        resolve_inference_precision("fp16")


# --- files OpenVINO cannot run --------------------------------------------------------------
def test_int8_file_is_refused_in_one_sentence_pointing_to_onnxruntime(small_residual_files):
    path = small_residual_files["int8"]
    with pytest.raises(KeyreidError) as caught:
        open_engine(path, backend="openvino").activate()
    message = str(caught.value)
    assert message == (f"{path}: its metadata says precision int8, which OpenVINO cannot run (its quantised "
                       "attention (com.microsoft.QAttention) is an ONNX Runtime contrib op); use the ONNX "
                       "Runtime backend (--backend onnxruntime) or the fp32 file")
    with open_engine(path) as engine:            # and ONNX Runtime does run it
        assert engine.metadata.precision == "int8"


def test_static_batch_is_reported_by_the_contract_check(tmp_path):
    path = build_toy_model(tmp_path / "static.onnx", inputs={"frames": {"shape": [1, 4, 256, 128, 3]}})
    with pytest.raises(KeyreidError, match="the batch axis of input 'frames' is fixed at 1"):
        open_engine(path, backend="openvino").activate()


def test_garbage_file_is_reported_with_its_name(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x08\x07not a model" * 10)
    with pytest.raises(KeyreidError, match="garbage.onnx: cannot be loaded as an ONNX model"):
        open_engine(path, backend="openvino").activate()


# --- the backend table ----------------------------------------------------------------------
def test_every_backend_row_names_its_engine_class_and_auto_keeps_onnxruntime():
    assert backend_names() == tuple(backend.name for backend in BACKENDS)
    assert "openvino" in backend_names() and "onnxruntime" in backend_names()
    for backend in BACKENDS:
        if backend.name in ("onnxruntime", "openvino"):     # the others import optional GPU/server libs
            assert backend.engine_class.backend == backend.name
    assert auto_backend("onnx").name == "onnxruntime"


def test_auto_takes_openvino_only_when_an_openvino_option_is_asked_for(reduced_onnx):
    assert auto_backend("onnx", ["threads", "providers"]).name == "onnxruntime"
    assert auto_backend("onnx", ["inference_precision", "threads"]).name == "openvino"
    assert auto_backend("onnx", ["inference_precision", "providers"]).name == "onnxruntime"   # refused by flag
    assert isinstance(open_engine(reduced_onnx, inference_precision="f32"), OpenVinoEngine)


def test_a_backend_that_cannot_run_the_file_is_refused(reduced_onnx):
    with pytest.raises(KeyreidError, match="is an ONNX model, which the tensorrt backend does not run"):
        open_engine(reduced_onnx, backend="tensorrt")


# --- command line ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tracklets(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvino_tracklets")
    for seed, (name, num_frames) in enumerate((("a", 4), ("b", 6))):
        write_synthetic_tracklet(root / name, num_frames, np.random.default_rng(seed))
    return root


def run_tool(module, *argv) -> int:
    return run_main(module.main, [str(arg) for arg in argv])


def test_infer_with_openvino_writes_the_default_backends_embeddings(reduced_onnx, tiny_tracklets, tmp_path, capsys):
    outputs = {}
    for backend in ("auto", "openvino"):
        outputs[backend] = tmp_path / f"{backend}.npz"
        assert run_tool(infer, "--engine", reduced_onnx, "--tracklets", tiny_tracklets, "--output",
                        outputs[backend], "--backend", backend, "--camera", 1) == 0
    assert "openvino backend, computing in f32; cpu: " in capsys.readouterr().err
    default, openvino = np.load(outputs["auto"]), np.load(outputs["openvino"])
    assert default["tracklets"].tolist() == openvino["tracklets"].tolist() == ["a", "b"]
    comparison = compare_output("embedding", openvino["embeddings"], default["embeddings"],
                                Tolerance(max_rel=EMBEDDING_REL))
    assert comparison.passed, comparison.failures


def test_compare_runs_openvino_against_onnxruntime_on_one_file(reduced_onnx, capsys):
    assert run_tool(compare, "--engine", reduced_onnx, "--engine", reduced_onnx, "--backend", "openvino",
                    "--backend", "onnxruntime", "--clips", 3, "--tolerance-rel", 1e-5,
                    "--part-weights-abs", 1e-6) == 0
    printed = capsys.readouterr().out
    assert "openvino backend, computing in f32" in printed and "onnxruntime backend" in printed
    assert printed.startswith("cpu: ") and printed.rstrip().endswith("PASS")


@pytest.mark.parametrize("flags, named", [
    (["--backend", "onnxruntime", "--inference-precision", "bf16"], "--inference-precision is for the openvino backend"),
    (["--providers", "cpu", "--inference-precision", "f32"], "--inference-precision is for the openvino backend"),
    (["--backend", "openvino", "--providers", "cpu"], "--providers is for the onnxruntime backend"),
    (["--backend", "tensorrt"], "--backend tensorrt: "),
])
def test_a_flag_the_chosen_backend_does_not_take_is_a_usage_error(reduced_onnx, tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as exited:
        run_tool(infer, "--engine", reduced_onnx, "--tracklets", tmp_path, "--output", tmp_path / "o.npz", *flags)
    assert exited.value.code == 2
    assert named in capsys.readouterr().err
