"""The exported ONNX model computes what the checkpoint computes and honours docs/contract.md §6."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from keyreid.comparator import compare_outputs
from keyreid.contract import OP_DOMAIN, OP_NAME
from keyreid.export.checkpoint import load_checkpoint, load_reference_model
from keyreid.export.deploy_model import DeployKeyReID
from keyreid.export.precision import to_fp16, to_int8
from keyreid.export.reference_model import reference_outputs
from keyreid.export.to_onnx import main as to_onnx
from keyreid.export.verify import TOLERANCES
from keyreid.kernels.torch_op import KeypointPartPool
from keyreid.synthetic import realistic_keypoints, synthetic_frames

REPO = Path(__file__).resolve().parents[1]


def _clips(rng, count, cameras, crop_sizes=None):
    keypoints, crop_size = realistic_keypoints(rng, count, crop_sizes=crop_sizes)
    return {"frames": synthetic_frames(rng, count), "keypoints": keypoints, "crop_size": crop_size,
            "camera": np.asarray(cameras, dtype=np.int64)}


def _reference(model, feed, mode="max"):
    return reference_outputs(model, feed["frames"], feed["keypoints"], feed["crop_size"],
                             feed["camera"], mode)


def _session(model_or_path):
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _run(session, feed):
    embedding, part_weights = session.run(["embedding", "part_weights"], feed)
    return {"embedding": embedding, "part_weights": part_weights}


@pytest.mark.parametrize("clips", [1, 5])
def test_fp32_onnx_matches_reference_on_mars_sized_crops(reduced_onnx, reduced_model, rng, clips):
    feed = _clips(rng, clips, np.arange(clips) % 7 - 1, crop_sizes=[(128, 256)])
    report = compare_outputs(_run(_session(reduced_onnx), feed), _reference(reduced_model, feed),
                             TOLERANCES["fp32"])
    assert report.passed, report.table()
    assert report.outputs["embedding"].max_rel < 1e-5


def test_fp32_onnx_part_weights_match_reference_on_other_crop_sizes(reduced_onnx, reduced_model, rng):
    feed = _clips(rng, 4, [0, 1, 2, 3], crop_sizes=[(64, 128), (90, 300), (170, 411)])
    actual = _run(_session(reduced_onnx), feed)
    expected = _reference(reduced_model, feed)
    assert np.abs(actual["part_weights"] - expected["part_weights"]).max() <= 1e-5


def test_graph_honours_the_io_contract(reduced_onnx):
    session = _session(reduced_onnx)
    inputs = {value.name: (value.type, value.shape) for value in session.get_inputs()}
    assert inputs == {"frames": ("tensor(uint8)", ["N", 4, 256, 128, 3]),
                      "keypoints": ("tensor(float)", ["N", 4, 17, 3]),
                      "crop_size": ("tensor(float)", ["N", 4, 2]),
                      "camera": ("tensor(int64)", ["N"])}
    outputs = {value.name: (value.type, value.shape) for value in session.get_outputs()}
    assert outputs == {"embedding": ("tensor(float)", ["N", 25 * 128]),
                       "part_weights": ("tensor(float)", ["N", 128, 6])}


def test_op_is_one_custom_node_with_plugin_attributes_and_a_function_body(reduced_onnx):
    model = onnx.load(str(reduced_onnx))
    onnx.checker.check_model(model, full_check=True)
    nodes = [node for node in model.graph.node if node.domain == OP_DOMAIN]
    assert [node.op_type for node in nodes] == [OP_NAME]
    attributes = {attribute.name: attribute.s.decode() for attribute in nodes[0].attribute}
    assert attributes == {"mode": "max", "plugin_namespace": "keyreid", "plugin_version": "1"}
    assert [(function.domain, function.name) for function in model.functions] == [(OP_DOMAIN, OP_NAME)]
    assert all(node.domain in ("", "ai.onnx") for node in model.functions[0].node)


def test_metadata_records_provenance(reduced_onnx, reduced_checkpoint):
    metadata = {entry.key: entry.value for entry in onnx.load(str(reduced_onnx)).metadata_props}
    assert metadata["heatmap_mode"] == "max" and metadata["precision"] == "fp32"
    assert metadata["num_cameras"] == "6" and metadata["opset"] == "18"
    assert metadata["checkpoint_sha256"] == load_checkpoint(reduced_checkpoint).sha256
    assert metadata["keyreid_version"]


def test_mean_camera_works_and_out_of_range_cameras_fail(reduced_onnx, reduced_model, rng):
    session = _session(reduced_onnx)
    feed = _clips(rng, 1, [-1])
    assert compare_outputs(_run(session, feed), _reference(reduced_model, feed), TOLERANCES["fp32"]).passed
    ort_errors = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                  ort.capi.onnxruntime_pybind11_state.RuntimeException)
    for camera in (6, -2):      # the raw graph fails loudly (engines check first, see test_runtime_engines)
        with pytest.raises(ort_errors, match="out of|indices|invalid index"):
            _run(session, dict(feed, camera=np.array([camera], dtype=np.int64)))


def test_deploy_graph_matches_reference_where_part_weights_matter(small_residual_checkpoint, rng):
    """Tiny residual stream and near-zero positive weights: LayerNorm's epsilon is not negligible,
    so the exact rescaling t(w) of docs/contract.md §5 is what keeps the two equal."""
    checkpoint = load_checkpoint(small_residual_checkpoint)
    reference = load_reference_model(checkpoint)
    deploy = DeployKeyReID(checkpoint.state_dict, checkpoint.config, KeypointPartPool("max"))
    feed = _clips(rng, 3, [0, 3, -1])
    near_zero = rng.uniform(0.0, 0.01, (3, 128, 6)).astype(np.float32)
    expected_by_scale = {}
    with torch.no_grad():
        for scale in (1.0, -1.0, 100.0):
            weights = near_zero * scale
            features = deploy.backbone(torch.from_numpy(feed["frames"]), torch.from_numpy(feed["camera"]))
            embedding = torch.cat([deploy.global_feature(features),
                                   deploy.part_features(features, torch.from_numpy(weights))], dim=1)
            expected = reference_outputs(reference, feed["frames"], None, None, feed["camera"],
                                         part_weights=weights)["embedding"]
            error = np.abs(embedding.numpy() - expected).max() / np.abs(expected).max()
            assert error < 1e-5
            expected_by_scale[scale] = expected
    moved = expected_by_scale[100.0] - expected_by_scale[1.0]
    assert np.abs(moved[:, 128:]).max() > 1e-2   # the weights really matter on this checkpoint


def test_fp16_variant_types_matmuls_fp16_and_keeps_outputs_fp32(reduced_onnx, reduced_model, rng):
    model = to_fp16(onnx.load(str(reduced_onnx)))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {value.name: value.type.tensor_type.elem_type
             for value in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({init.name: init.data_type for init in inferred.graph.initializer})
    matmuls = [node for node in inferred.graph.node if node.op_type == "MatMul"]
    assert matmuls and all(types[name] == onnx.TensorProto.FLOAT16 for node in matmuls for name in node.input)
    for node in inferred.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.input[0]] == onnx.TensorProto.FLOAT
    feed = _clips(rng, 2, [0, -1])
    report = compare_outputs(_run(_session(model), feed), _reference(reduced_model, feed), TOLERANCES["fp16"])
    assert report.passed, report.table()


def test_int8_variant_keeps_the_op_and_meets_its_tolerance(reduced_onnx, reduced_model, rng):
    model = to_int8(onnx.load(str(reduced_onnx)))
    assert any(node.op_type == "DynamicQuantizeMatMul" or node.op_type == "MatMulInteger"
               for node in model.graph.node)
    assert [node.op_type for node in model.graph.node if node.domain == OP_DOMAIN] == [OP_NAME]
    assert [(function.domain, function.name) for function in model.functions] == [(OP_DOMAIN, OP_NAME)]
    feed = _clips(rng, 3, [0, 1, -1], crop_sizes=[(128, 256)])
    report = compare_outputs(_run(_session(model), feed), _reference(reduced_model, feed), TOLERANCES["int8"])
    assert report.passed, report.table()


def test_cli_mean_mode_int8_exports_verifies_and_runs(reduced_checkpoint, reduced_model, tmp_path, rng, capsys):
    output = tmp_path / "mean_int8.onnx"
    assert to_onnx([str(reduced_checkpoint), "-o", str(output), "--heatmap-mode", "mean",
                    "--precision", "int8"]) == 0
    printed, progress = capsys.readouterr()
    assert "cosine" in printed and "[ok]" in printed and "FAIL" not in printed
    # Every step is counted and shown, and nothing but progress reaches stderr (no quantiser hints).
    assert re.findall(r"^\[(\d)/(\d)\]", progress, re.M) == [(str(step), "5") for step in range(1, 6)]
    assert [line for line in progress.splitlines() if not line.startswith(("[", " "))] == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mean_int8.onnx"]
    metadata = {entry.key: entry.value for entry in onnx.load(str(output)).metadata_props}
    assert (metadata["heatmap_mode"], metadata["precision"]) == ("mean", "int8")
    feed = _clips(rng, 2, [1, 2])
    actual = _run(_session(output), feed)
    expected = _reference(reduced_model, feed, mode="mean")
    assert np.abs(actual["part_weights"] - expected["part_weights"]).max() <= 1e-5


def test_failed_verification_writes_nothing(reduced_checkpoint, tmp_path, monkeypatch, capsys):
    from keyreid.comparator import Tolerance
    monkeypatch.setitem(TOLERANCES, "fp32", {"embedding": Tolerance(max_abs=0.0)})  # injected fault
    assert _cli_exit([str(reduced_checkpoint), "-o", str(tmp_path / "m.onnx")], capsys) == 1
    assert list(tmp_path.iterdir()) == []


def _cli_exit(argv, capsys):
    from keyreid.cli import run_main
    code = run_main(to_onnx, argv + ["--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    if code:
        assert error and error[-1].startswith("error: ") and "Traceback" not in "\n".join(error)
    return code


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "architecture"])
def test_cli_bad_checkpoint_gives_one_line_and_leaves_nothing(case, reduced_checkpoint, tmp_path, capsys):
    source = tmp_path / f"{case}.pth"
    if case == "text":
        source.write_text("not weights")
    elif case == "truncated":
        source.write_bytes(reduced_checkpoint.read_bytes()[:100_000])
    elif case == "architecture":
        torch.save({"conv1.weight": torch.zeros(3)}, source)
    before = set(tmp_path.iterdir())
    assert _cli_exit([str(source)], capsys) == 1
    assert set(tmp_path.iterdir()) == before


@pytest.mark.parametrize("output", ["missing_dir/model.onnx", "."])
def test_cli_unwritable_output_fails_before_exporting(output, reduced_checkpoint, tmp_path, capsys):
    assert _cli_exit([str(reduced_checkpoint), "-o", str(tmp_path / output)], capsys) == 1


def test_cli_refuses_to_overwrite_the_checkpoint(reduced_checkpoint, capsys):
    assert _cli_exit([str(reduced_checkpoint), "-o", str(reduced_checkpoint)], capsys) == 1


def test_cli_unknown_mode_is_rejected_with_usage(reduced_checkpoint, capsys):
    with pytest.raises(SystemExit) as info:
        to_onnx([str(reduced_checkpoint), "--heatmap-mode", "median"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_script_help_explains_every_option_from_a_checkout():
    result = subprocess.run([sys.executable, "export/to_onnx.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for option in ("--output", "--heatmap-mode", "--precision", "--opset", "--no-verify", "blank", "int8"):
        assert option in result.stdout


def test_full_vit_b_export_verifies_and_runs_batches(full_checkpoint, tmp_path, rng, capsys):
    """The one test on the real 19200-d model: the CLI's own parity check (fp32 tolerances on
    256x128 crops) passes, and the file runs at batch 1 and 5. About two minutes."""
    output = tmp_path / "vit_b.onnx"
    assert to_onnx([str(full_checkpoint), "-o", str(output), "--quiet", "--verify-clips", "2"]) == 0
    assert "[ok]" in capsys.readouterr().out
    session = _session(output)
    for clips in (1, 5):
        result = _run(session, _clips(rng, clips, np.arange(clips) % 7 - 1))
        assert result["embedding"].shape == (clips, 19200) and np.isfinite(result["embedding"]).all()
        assert result["part_weights"].shape == (clips, 128, 6)
