"""Reference model vs exported ONNX (fp32, int8) on the reduced model, grouped by batch size so
pytest-benchmark prints them side by side. Two threads each."""
import pytest

from model_speed import onnxruntime_runner, reference_runner, sample_feed

THREADS = 2


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine", ["reference", "onnx fp32", "onnx int8"])
def test_clips_per_call(benchmark, bench_checkpoint, bench_onnx, engine, batch):
    benchmark.group = f"batch {batch}"
    if engine == "reference":
        run = reference_runner(bench_checkpoint, THREADS, "max")
    else:
        run = onnxruntime_runner(bench_onnx[engine.split()[1]], THREADS)
    feed = sample_feed(batch, bench_checkpoint.config.num_cameras)
    run(feed)
    benchmark.extra_info.update(batch=batch, engine=engine)
    benchmark(run, feed)
