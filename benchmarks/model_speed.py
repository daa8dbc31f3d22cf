"""Clips per second of the reference model and the exported ONNX models, side by side.

Same machine, same thread count, same inputs, one run: the reference (torch, eager, SPEC
section 2 literally) against the fp32 and int8 ONNX files in ONNX Runtime's CPU provider.
Each measurement warms up once, then takes the median of ``repeats`` timed calls; export,
session creation and input generation are outside the timing.
"""
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Sequence


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: first-run allocations and lazy initialisation stay out of the numbers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sample_feed(batch: int, num_cameras: int, seed: int = 0) -> dict:
    from keyreid.synthetic import MARS_CROP_SIZE, synthetic_feed
    return synthetic_feed(batch, num_cameras, seed, crop_sizes=[MARS_CROP_SIZE])


def reference_runner(checkpoint, threads: int, heatmap_mode: str):
    import torch
    from keyreid.export.checkpoint import load_reference_model
    from keyreid.export.verify import reference_results

    torch.set_num_threads(threads)
    model = load_reference_model(checkpoint)
    return lambda feed: reference_results(model, feed, heatmap_mode)


def onnxruntime_runner(onnx_path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def measure(runners: Dict[str, Callable[[dict], object]], batch_sizes: Sequence[int],
            num_cameras: int, repeats: int, progress=print) -> Dict[str, Dict[int, float]]:
    """{engine name: {batch size: clips per second}}."""
    results: Dict[str, Dict[int, float]] = {name: {} for name in runners}
    for batch in batch_sizes:
        feed = sample_feed(batch, num_cameras)
        for name, run in runners.items():
            seconds = median_seconds(lambda: run(feed), repeats)
            results[name][batch] = batch / seconds
            progress(f"  {name:<12} batch {batch:>3}: {batch / seconds:8.3f} clips/s ({seconds:.3f} s per call)")
    return results


def ratio_table(results: Dict[str, Dict[int, float]], baseline: str = "reference") -> str:
    batches = sorted(next(iter(results.values())))
    header = f"{'engine':<12}" + "".join(f"{f'batch {b} clips/s':>20}{'vs ref':>8}" for b in batches)
    lines = [header, "-" * len(header)]
    for name, by_batch in results.items():
        cells = "".join(f"{by_batch[b]:>20.3f}{by_batch[b] / results[baseline][b]:>7.2f}x" for b in batches)
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines)
