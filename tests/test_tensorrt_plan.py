"""TensorRT plans without TensorRT: the sidecar, the engine's batching and freeing, and the
command lines on a machine with no TensorRT and no GPU (this one, and CI)."""
import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from keyreid.cli import run_main
from keyreid.contract import INPUTS
from keyreid.errors import KeyreidError
from keyreid.runtime import compare
from keyreid.runtime.backends.tensorrt import free_all, pad_feed, split_batch
from keyreid.plan_sidecar import (DeviceFacts, PlanSidecar, check_built_from, check_device, file_sha256,
                                          read_sidecar, sidecar_path, write_sidecar)
from keyreid.synthetic import realistic_keypoints, synthetic_frames
from toy_engine_model import toy_metadata

REPO = Path(__file__).resolve().parents[1]
ORIN = DeviceFacts("Orin", (8, 7), "10.16.1.11")


def make_sidecar(onnx_sha256="ab" * 32, **changes) -> PlanSidecar:
    sidecar = PlanSidecar(tensorrt_version=ORIN.tensorrt_version, cuda_version="12.8", device_name=ORIN.device_name,
                          compute_capability=ORIN.compute_capability, onnx_sha256=onnx_sha256,
                          onnx_metadata=dict(toy_metadata(768, 6), heatmap_mode="mean", precision="fp16"),
                          plugin="aot", build={"min_batch": 1, "opt_batch": 8, "max_batch": 32,
                                               "workspace_mib": 4096, "strongly_typed": True})
    return replace(sidecar, **changes)


@pytest.fixture
def plan(tmp_path):
    """A plan file (its bytes are never read without TensorRT) with a valid sidecar."""
    path = tmp_path / "model.plan"
    path.write_bytes(b"serialized engine")
    write_sidecar(path, make_sidecar())
    return path


# --- the sidecar ----------------------------------------------------------------------------
def test_sidecar_sits_beside_the_plan_with_json_appended(plan):
    assert sidecar_path(plan) == plan.parent / "model.plan.json"
    assert sorted(path.name for path in plan.parent.iterdir()) == ["model.plan", "model.plan.json"]


def test_sidecar_round_trips(plan):
    sidecar = read_sidecar(plan)
    assert sidecar == make_sidecar(created_utc=sidecar.created_utc)
    assert (sidecar.metadata.num_cameras, sidecar.metadata.heatmap_mode) == (6, "mean")


def test_sidecar_has_exactly_the_agreed_keys(plan):
    content = json.loads(sidecar_path(plan).read_text())
    assert set(content) == {"format", "format_version", "tensorrt_version", "cuda_version", "device_name",
                            "compute_capability", "onnx_sha256", "onnx_metadata", "plugin", "build", "created_utc"}
    assert (content["format"], content["format_version"], content["compute_capability"]) == \
        ("keyreid-plan-sidecar", 1, [8, 7])


def test_plan_on_the_device_that_built_it_is_accepted(plan):
    check_device(plan, read_sidecar(plan), ORIN)


@pytest.mark.parametrize("here, named", [
    (replace(ORIN, device_name="NVIDIA H100 80GB HBM3"), "built for Orin"),
    (replace(ORIN, compute_capability=(9, 0)), "compute capability 8.7"),
    (replace(ORIN, tensorrt_version="11.4.0.106"), "TensorRT 10.16.1.11"),
])
def test_plan_built_for_another_gpu_or_tensorrt_is_refused_with_the_rebuild_sentence(plan, here, named):
    with pytest.raises(KeyreidError, match="rebuild this engine on this device") as caught:
        check_device(plan, read_sidecar(plan), here)
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_plan_built_from_another_onnx_file_is_refused(tmp_path, plan):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"some other model")
    with pytest.raises(KeyreidError, match="rebuild this engine on this device: it was built from an ONNX file"):
        check_built_from(plan, read_sidecar(plan), onnx_file)
    write_sidecar(plan, make_sidecar(onnx_sha256=file_sha256(onnx_file)))
    check_built_from(plan, read_sidecar(plan), onnx_file)


def test_missing_sidecar_says_how_to_get_one(tmp_path):
    path = tmp_path / "trtexec.plan"
    path.write_bytes(b"x")
    with pytest.raises(KeyreidError, match="sidecar trtexec.plan.json is missing.*to_tensorrt.py"):
        read_sidecar(path)


def test_sidecar_that_is_not_json_is_refused(plan):
    sidecar_path(plan).write_text("{not json")
    with pytest.raises(KeyreidError, match="not a plan sidecar"):
        read_sidecar(plan)


def test_every_problem_of_a_bad_sidecar_is_listed_at_once(plan):
    content = json.loads(sidecar_path(plan).read_text())
    content.update(format_version=2, plugin="jit", compute_capability="8.7")
    content["onnx_metadata"].update(num_cameras="0", heatmap_mode="gaussian")
    sidecar_path(plan).write_text(json.dumps(content))
    with pytest.raises(KeyreidError) as caught:
        read_sidecar(plan)
    for problem in ("format_version is 2", "'plugin' must be one of aot, none", "'compute_capability' must be",
                    "num_cameras='0'", "heatmap_mode 'gaussian'"):
        assert problem in str(caught.value)


# --- batching and freeing in the TensorRT engine ---------------------------------------------
@pytest.mark.parametrize("batch, low, high, chunks", [
    (5, 1, 32, [(0, 5, 5)]),
    (70, 1, 32, [(0, 32, 32), (32, 64, 32), (64, 70, 6)]),
    (3, 4, 8, [(0, 3, 4)]),                     # padded up to the profile's minimum
    (9, 4, 8, [(0, 8, 8), (8, 9, 4)]),
])
def test_batches_split_at_the_profile_maximum_and_pad_to_its_minimum(batch, low, high, chunks):
    assert list(split_batch(batch, low, high)) == chunks


def test_padding_repeats_the_chunks_last_clip():
    rng = np.random.default_rng(0)
    keypoints, crop_size = realistic_keypoints(rng, 5)
    feed = {"frames": synthetic_frames(rng, 5), "keypoints": keypoints, "crop_size": crop_size,
            "camera": np.arange(5, dtype=np.int64)}
    padded = pad_feed(feed, 3, 5, 4)
    assert padded["camera"].tolist() == [3, 4, 4, 4]
    np.testing.assert_array_equal(padded["frames"][3], feed["frames"][4])
    assert all(padded[spec.name].dtype == spec.dtype and padded[spec.name].flags.c_contiguous for spec in INPUTS)


def test_a_failing_free_does_not_leak_the_others():
    freed = []

    def failing_free():
        raise KeyreidError("CUDA error cudaErrorIllegalAddress")

    with pytest.raises(KeyreidError, match="cudaErrorIllegalAddress"):
        free_all([lambda: freed.append("input"), failing_free, lambda: freed.append("stream")])
    assert freed == ["input", "stream"]


# --- command lines without TensorRT ----------------------------------------------------------
def run_script(script: str, *args, cwd=REPO):
    """Run one of our scripts with ``import tensorrt`` failing, as on a machine without it."""
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["tensorrt"] = None
        sys.argv = {[script, *map(str, args)]!r}
        runpy.run_path({str(REPO / script)!r}, run_name="__main__")
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_to_tensorrt_help_works_without_tensorrt():
    result = run_script("export/to_tensorrt.py", "--help")
    assert result.returncode == 0, result.stderr
    for text in ("--min-batch", "--opt-batch", "--max-batch", "--workspace", "--timing-cache", "--plugin",
                 "MODEL.plan.json", "compare.py --engine MODEL.plan --engine MODEL.onnx"):
        assert text in result.stdout


def toy_onnx_of_precision(path: Path, precision: str) -> Path:
    """The toy contract model, its metadata saying ``precision`` (all to_tensorrt.py reads first)."""
    import onnx
    from toy_engine_model import build_toy_model

    model = onnx.load(str(build_toy_model(path)))
    model.metadata_props.add(key="precision", value=precision)
    onnx.save(model, str(path))
    return path


def test_to_tensorrt_without_tensorrt_says_so_in_one_line_and_writes_nothing(tmp_path):
    onnx_file = toy_onnx_of_precision(tmp_path / "model.onnx", "fp16")
    result = run_script("export/to_tensorrt.py", onnx_file, "-q")
    assert result.returncode == 1
    # Building needs onnx as well as TensorRT: the message and docs/gpu.md name the same extras.
    install = 'pip install "keyreid[gpu,export]"'
    assert result.stderr.splitlines() == [f"error: tensorrt is not installed (needed for building "
                                          f"TensorRT engines): {install}"]
    assert install in (REPO / "docs" / "gpu.md").read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


def test_to_tensorrt_says_an_int8_file_cannot_become_an_engine_before_asking_for_tensorrt(tmp_path):
    onnx_file = toy_onnx_of_precision(tmp_path / "model.onnx", "int8")
    result = run_script("export/to_tensorrt.py", onnx_file, "-q")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {onnx_file} is an int8 file") and "cannot become a TensorRT engine" in line
    assert "--precision fp16" in line and "not installed" not in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


def test_to_tensorrt_refuses_to_overwrite_its_input(tmp_path):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"any")
    result = run_script("export/to_tensorrt.py", onnx_file, "--output", onnx_file)
    assert result.returncode == 1 and "would overwrite an input" in result.stderr
    assert onnx_file.read_bytes() == b"any"


def test_to_tensorrt_checks_the_profile_before_anything_else(tmp_path):
    from keyreid.export.trt_builder import BuildOptions
    assert BuildOptions(min_batch=8, opt_batch=4, max_batch=2, workspace_mib=0, plugin="jit").problems() == [
        "batch sizes must satisfy min <= opt <= max, got 8, 4, 2", "--workspace must be at least 1 MiB, got 0",
        "--plugin must be one of aot, none, got 'jit'"]


def test_infer_with_a_plan_on_a_machine_without_tensorrt_is_one_sentence_and_exit_1(plan, tmp_path):
    cv2 = pytest.importorskip("cv2")
    (tmp_path / "tracklets" / "t1").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "tracklets" / "t1" / "0001.png"), np.zeros((256, 128, 3), np.uint8))
    result = run_script("runtime/infer.py", "--engine", plan, "--tracklets", tmp_path / "tracklets",
                        "--output", tmp_path / "out.npz")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if not line.startswith(("[", " "))]
    assert errors == ['error: tensorrt is not installed (needed for building and running '
                      'TensorRT engines): pip install "keyreid[gpu]"']
    assert not (tmp_path / "out.npz").exists()


def test_compare_refuses_a_plan_and_an_onnx_file_it_was_not_built_from(plan, tmp_path, capsys):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"another model")
    assert run_main(compare.main, ["--engine", str(plan), "--engine", str(onnx_file)]) == 1
    assert "rebuild this engine on this device: it was built from an ONNX file" in capsys.readouterr().err
