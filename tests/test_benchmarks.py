"""The benchmark suite runs, and its FLOP counter agrees with an independent count.

Speed itself is never asserted here: benchmarks/ measures, tests only check that it can.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from keyreid.benchmarks.flops import count_model, count_torch
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
from keyreid.export.checkpoint import load_checkpoint
from keyreid.export.onnx_export import build_deploy_model
from keyreid.export.precision import to_int8
from keyreid.synthetic import MARS_CROP_SIZE, synthetic_feed


@pytest.fixture(scope="module")
def reduced_fp32_model(reduced_onnx):
    return onnx.load(str(reduced_onnx))


@pytest.mark.parametrize("clips", [1, 3])
def test_onnx_flop_count_matches_torch_count_of_the_deploy_model(reduced_checkpoint, reduced_fp32_model, clips):
    """Walking the exported graph and torch's FlopCounterMode on the model it came from agree."""
    feed = synthetic_feed(clips, 6, crop_sizes=[MARS_CROP_SIZE])
    model = build_deploy_model(load_checkpoint(reduced_checkpoint), "max")
    expected = count_torch(model, *(torch.from_numpy(feed[name]) for name in
                                    ("frames", "keypoints", "crop_size", "camera")))
    counted = count_model(reduced_fp32_model, clips)
    assert counted["int8_macs"] == 0
    assert counted["fp32_flops"] == expected


def test_int8_count_moves_products_to_int8_without_changing_them(reduced_fp32_model):
    fp32 = count_model(reduced_fp32_model)
    int8 = count_model(to_int8(reduced_fp32_model))
    assert int8["int8_macs"] > 0
    assert int8["fp32_flops"] + 2 * int8["int8_macs"] == fp32["fp32_flops"]


def test_run_script_measures_every_engine_and_writes_json_and_figure(reduced_checkpoint, tmp_path, capsys):
    import cv2
    from keyreid.benchmarks.run import main

    json_path, plot_path = tmp_path / "out" / "speed.json", tmp_path / "out" / "speed.png"
    assert main(["--checkpoint", str(reduced_checkpoint), "--batch-sizes", "1", "2", "--repeats", "1",
                 "--budget", "0", "--workdir", str(tmp_path / "work"), "--json", str(json_path),
                 "--plot", str(plot_path)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(json_path.read_text())
    engines = payload["engines"]
    from keyreid.cpu_features import cpu_isa
    from keyreid.export.precision import resolve_int8_target

    other_recipe = ["onnx int8-avx2"] if resolve_int8_target() != "avx2" else []     # its cost on this CPU
    bf16 = ["openvino bf16"] if cpu_isa().bf16 else []
    assert list(engines) == ["reference", "torch deploy", "onnx fp32", "onnx int8", *other_recipe, "openvino f32",
                             *bf16, "openvino int8", "runner (fp32)", "runner (int8)"]
    assert engines["openvino int8"]["limit_clips_per_s"] is None       # an IR: speed, no counted limit
    assert payload["accuracy"]["openvino int8"]["min_cosine_vs_reference"] >= 0.999
    assert engines["openvino f32"]["graph"] == "onnx fp32"
    assert payload["accuracy"]["openvino f32"]["min_cosine_vs_reference"] > 0.9999
    assert "fp32 GEMM rate (the fastest here)" in printed      # the targets summary
    for name, result in engines.items():
        assert name in printed
        for entry in result["batches"].values():
            assert entry["clips_per_s"] > 0 and (name == "openvino int8" or 0 < entry["fraction_of_limit"])
    assert set(engines["onnx fp32"]["batches"]) == {"1", "2"}
    assert engines["onnx fp32"]["arithmetic_per_clip"]["fp32_flops"] == \
        engines["torch deploy"]["arithmetic_per_clip"]["fp32_flops"]
    assert payload["limits"]["fp32_ops_per_s"] > 0 and payload["limits"]["int8_ops_per_s"] > 0
    assert payload["accuracy"]["onnx fp32"]["min_cosine_vs_reference"] > 0.9999
    assert set(payload["part_weight_op"]) == {"numpy reference", "torch (vectorised)", "onnx function (ORT)"}
    figure = cv2.imread(str(plot_path))
    assert figure is not None and figure.shape[2] == 3 and np.ptp(figure) > 0


def test_int8_accuracy_script_measures_a_checkpoint(tmp_path):
    from keyreid.benchmarks.int8_accuracy import MAX_PART_WEIGHT_DIFF, MIN_COSINE, measure_case

    rows = measure_case("reduced", 0, 1.0, tmp_path, clips=2, threads=1)
    assert [row["target"] for row in rows] == ["avx2", "vnni"]
    for row in rows:
        assert row["int8_min_cosine"] >= MIN_COSINE and row["int8_part_weights_max_diff"] <= MAX_PART_WEIGHT_DIFF
        assert row["fp32_max_rel_error"] < 1e-5
    assert list(tmp_path.iterdir()) == []       # checkpoint and models are removed once measured


def test_pytest_benchmark_suite_runs_once_through():
    """Every bench_*.py runs one round on the reduced model: a benchmark that rots fails here."""
    result = subprocess.run([sys.executable, "-m", "pytest", str(BENCHMARKS), "-q", "--benchmark-only",
                             "--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off",
                             "-p", "no:cacheprovider"], cwd=BENCHMARKS.parent, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_run_writes_to_the_current_folder_not_to_the_committed_results(tmp_path):
    """benchmarks/run.py's default output is ./keyreid-bench/; benchmarks/results/ changes only
    when asked for (--output-dir). A bad checkpoint stops it after it checked where it writes."""
    committed = {path.name: path.read_bytes() for path in (BENCHMARKS / "results").iterdir()}
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--checkpoint", "bad.pth", "--no-runner"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith("error: bad.pth"), result.stderr
    assert (tmp_path / "keyreid-bench").is_dir()
    assert {path.name: path.read_bytes() for path in (BENCHMARKS / "results").iterdir()} == committed
