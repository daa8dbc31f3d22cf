"""Fixtures for the pytest-benchmark files: a random reduced checkpoint and its ONNX exports.

    python -m pytest benchmarks --benchmark-only

The reduced model keeps the suite quick; ``benchmarks/run.py`` measures the full ViT-B model.
"""
import pytest


@pytest.fixture(scope="session")
def bench_checkpoint(tmp_path_factory):
    from keyreid.export.checkpoint import load_checkpoint
    from keyreid.export.config import REDUCED
    from keyreid.export.random_checkpoint import write_random_checkpoint
    return load_checkpoint(write_random_checkpoint(tmp_path_factory.mktemp("bench") / "reduced.pth", REDUCED))


@pytest.fixture(scope="session")
def bench_onnx(bench_checkpoint, tmp_path_factory):
    from keyreid.export.quiet_logs import quiet_third_party_logs
    from keyreid.export.onnx_export import write_model_atomically
    from keyreid.export.pipeline import ExportPipeline
    quiet_third_party_logs()
    folder = tmp_path_factory.mktemp("bench_onnx")
    pipeline = ExportPipeline(bench_checkpoint, "max")
    return {precision: write_model_atomically(pipeline.model(precision), folder / f"{precision}.onnx")
            for precision in ("fp32", "int8")}
