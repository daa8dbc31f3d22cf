"""Fixtures for the pytest-benchmark files: a random reduced checkpoint and its ONNX exports.

    python -m pytest benchmarks --benchmark-only

The reduced model keeps the suite quick; ``benchmarks/run.py`` measures the full ViT-B model.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def bench_checkpoint(tmp_path_factory):
    from keyreid.export.checkpoint import load_checkpoint
    from keyreid.export.config import REDUCED
    from keyreid.export.random_checkpoint import write_random_checkpoint
    return load_checkpoint(write_random_checkpoint(tmp_path_factory.mktemp("bench") / "reduced.pth", REDUCED))


@pytest.fixture(scope="session")
def bench_onnx(bench_checkpoint, tmp_path_factory):
    from keyreid.export.quiet_logs import quiet_third_party_logs
    from keyreid.export.onnx_export import export_model, write_model_atomically
    quiet_third_party_logs()
    folder = tmp_path_factory.mktemp("bench_onnx")
    return {precision: write_model_atomically(export_model(bench_checkpoint, "max", precision),
                                              folder / f"{precision}.onnx")
            for precision in ("fp32", "int8")}
