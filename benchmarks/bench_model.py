"""The measurements of ``run.py`` under pytest-benchmark, on the reduced model (quick):

    python -m pytest benchmarks --benchmark-only

Every engine at batch 1 and 8 (grouped by batch, so they print side by side), the part-weight op
alone in its three forms, and the GEMM rates that set the limits. Two threads each.
"""
import pytest

from keyreid.benchmarks.machine import gemm_session
from keyreid.benchmarks.model_speed import deploy_runner, onnxruntime_runner, part_weight_runners, reference_runner, sample_feed

THREADS = 2
ROUNDS = 5          # fixed rounds: calibration would spend minutes on the slow engines
ENGINES = ("reference", "torch deploy", "onnx fp32", "onnx int8")
PART_WEIGHT_IMPLEMENTATIONS = ("numpy reference", "torch (vectorised)", "onnx function (ORT)")


def _engine(name, checkpoint, onnx_paths):
    if name == "reference":
        return reference_runner(checkpoint, THREADS, "max")
    if name == "torch deploy":
        return deploy_runner(checkpoint, THREADS, "max")
    return onnxruntime_runner(onnx_paths[name.split()[1]], THREADS)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine", ENGINES)
def test_clips_per_call(benchmark, bench_checkpoint, bench_onnx, engine, batch):
    benchmark.group = f"model, batch {batch}"
    run = _engine(engine, bench_checkpoint, bench_onnx)
    feed = sample_feed(batch, bench_checkpoint.config.num_cameras)
    run(feed)
    benchmark.extra_info.update(batch=batch, engine=engine)
    benchmark.pedantic(run, args=(feed,), rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("implementation", PART_WEIGHT_IMPLEMENTATIONS)
def test_part_weight_op(benchmark, implementation, batch):
    benchmark.group = f"part-weight op, batch {batch}"
    run = part_weight_runners(THREADS, "max")[implementation]
    feed = sample_feed(batch, num_cameras=6)
    run(feed)
    benchmark.extra_info.update(batch=batch, implementation=implementation)
    benchmark.pedantic(run, args=(feed,), rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_gemm_rate(benchmark, precision):
    """The limit: ONNX Runtime MatMul / MatMulInteger on square matrices."""
    size = 1024
    session, feed = gemm_session(precision, THREADS, size)
    benchmark.group = "GEMM rate (limit)"
    benchmark.extra_info.update(size=size, ops_per_call=2 * size ** 3)
    benchmark(session.run, None, feed)
