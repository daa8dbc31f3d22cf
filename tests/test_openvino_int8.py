"""int8 for OpenVINO: NNCF quantises the fp32 file into an IR (.xml + .bin) that stays within the
int8 bar of the reference model, keeps the part weights exact, carries the file's metadata,
runs through open_engine, and is never left half-written. Real OpenVINO and NNCF throughout."""
import shutil

import numpy as np
import pytest

from keyreid.cli import run_main
from keyreid.errors import KeyreidError
from keyreid.runtime.backends.openvino import OpenVinoEngine
from keyreid.runtime.backends import open_engine
from keyreid.synthetic import MARS_CROP_SIZE, synthetic_feed

pytest.importorskip("openvino")
pytest.importorskip("nncf")
onnx = pytest.importorskip("onnx")

MIN_COSINE = 0.999
PART_WEIGHTS_ABS = 1e-5
CALIBRATION_CLIPS = 16          # the exporter's default


@pytest.fixture(scope="module")
def small_residual_fp32(small_residual_checkpoint, tmp_path_factory):
    """The small-residual checkpoint (seed 2, residual scale 1e-3), fp32, heatmap mode mean,
    exported in memory (the export tests verify the exporter)."""
    from keyreid.export.checkpoint import load_checkpoint
    from keyreid.export.pipeline import export_model

    model = export_model(load_checkpoint(small_residual_checkpoint), "mean", "fp32")
    path = tmp_path_factory.mktemp("openvino_int8") / "small_residual_mean.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module", params=["reduced_max", "small_residual_mean"])
def case(request, tmp_path_factory):
    """(checkpoint, heatmap mode, fp32 .onnx, int8 IR made by the exporter, verified)."""
    from keyreid.export.to_openvino import export_openvino_int8

    if request.param == "reduced_max":
        checkpoint, mode, fp32 = (request.getfixturevalue("reduced_checkpoint"), "max",
                                  request.getfixturevalue("reduced_onnx"))
    else:
        checkpoint, mode, fp32 = (request.getfixturevalue("small_residual_checkpoint"), "mean",
                                  request.getfixturevalue("small_residual_fp32"))
    output = tmp_path_factory.mktemp("ir") / f"{request.param}_int8.xml"
    result = export_openvino_int8(fp32, output, calibration_clips=CALIBRATION_CLIPS)
    assert result.report is not None and result.report.passed
    return checkpoint, mode, fp32, output


@pytest.fixture(scope="module")
def feed():
    return synthetic_feed(4, num_cameras=6, seed=5, crop_sizes=[MARS_CROP_SIZE])


def cosines(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    return (actual * expected).sum(1) / np.linalg.norm(actual, axis=1) / np.linalg.norm(expected, axis=1)


def test_int8_ir_holds_the_bar_against_the_reference_model(case, feed):
    from keyreid.export.checkpoint import load_reference_model
    from keyreid.export.verify import reference_results

    checkpoint, mode, _, ir = case
    reference = reference_results(load_reference_model(checkpoint), feed, mode)
    with open_engine(ir) as engine:
        outputs = engine.infer(feed)
    assert cosines(outputs["embedding"], reference["embedding"]).min() >= MIN_COSINE


def test_int8_ir_keeps_part_weights_of_fp32(case, feed):
    _, _, fp32, ir = case
    with open_engine(ir) as int8, open_engine(fp32, backend="openvino") as full:
        difference = np.abs(int8.infer(feed)["part_weights"] - full.infer(feed)["part_weights"]).max()
    assert difference <= PART_WEIGHTS_ABS


def test_ir_carries_the_files_metadata_and_runs_on_openvino(case):
    _, mode, fp32, ir = case
    assert ir.with_suffix(".bin").is_file()
    with open_engine(ir) as engine, open_engine(fp32) as source:
        assert isinstance(engine, OpenVinoEngine) and engine.compute_precision == "f32"
        assert engine.metadata.precision == "int8" and engine.metadata.int8_tool == "nncf"
        for key in ("heatmap_mode", "num_cameras", "embedding_dim", "checkpoint_sha256"):
            assert getattr(engine.metadata, key) == getattr(source.metadata, key)
        assert engine.metadata.heatmap_mode == mode and engine.num_cameras == 6
        assert engine.input_specs == source.input_specs and engine.output_specs == source.output_specs


def test_ir_is_refused_by_onnxruntime_with_one_sentence(case):
    with pytest.raises(KeyreidError, match="does not run"):
        open_engine(case[3], backend="onnxruntime")


def test_missing_weights_file_is_one_clear_error(case, tmp_path):
    lone_xml = tmp_path / "lonely.xml"
    shutil.copy(case[3], lone_xml)
    with pytest.raises(KeyreidError, match=r"lonely\.bin is missing"):
        open_engine(lone_xml).activate()


def test_failed_verification_writes_nothing(reduced_onnx, tmp_path, monkeypatch, capsys):
    from keyreid.comparator import Tolerance
    from keyreid.export import to_openvino
    from keyreid.export.verify import TOLERANCES

    monkeypatch.setitem(TOLERANCES, "int8", {"embedding": Tolerance(max_abs=0.0)})   # injected fault
    source = tmp_path / "model.onnx"
    shutil.copy(reduced_onnx, source)
    code = run_main(to_openvino.main, [str(source), "--calibration-clips", "2", "--verify-clips", "1", "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and error[-1].startswith("error: the int8 IR failed verification")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


def test_exporter_refuses_a_non_fp32_input_and_a_non_xml_output(reduced_onnx, tmp_path):
    from keyreid.export.to_openvino import export_openvino_int8

    with pytest.raises(KeyreidError, match="named .xml"):
        export_openvino_int8(reduced_onnx, tmp_path / "model.onnx")
    with pytest.raises(KeyreidError, match="fp32 .onnx"):
        export_openvino_int8(tmp_path / "model.xml", tmp_path / "out.xml")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cpu_class, warned", [("avx2", 1), ("vnni", 0), ("amx", 0)])
def test_int8_ir_on_a_cpu_without_vnni_says_once_that_it_loses_accuracy_there(case, monkeypatch, tmp_path,
                                                                               cpu_class, warned):
    import warnings

    from keyreid.errors import KeyreidWarning

    _, _, _, ir = case
    copy = tmp_path / f"{cpu_class}_{ir.name}"          # a process warns once per file and message
    shutil.copy(ir, copy)
    shutil.copy(ir.with_suffix(".bin"), copy.with_suffix(".bin"))
    monkeypatch.setenv("KEYREID_CPU_CLASS", cpu_class)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with open_engine(copy) as engine:
                assert engine.metadata.int8_target_cpu == "vnni"
    messages = [str(warning.message) for warning in caught if issubclass(warning.category, KeyreidWarning)]
    assert len(messages) == warned
    assert all("--target-cpu avx2" in message and "saturate" in message for message in messages)
