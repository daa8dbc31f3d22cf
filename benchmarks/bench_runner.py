"""Tracklets -> features: the batched Runner vs the engine clip by clip vs batched without it.

    python -m pytest benchmarks/bench_runner.py --benchmark-only
    python benchmarks/bench_runner.py [--engine model.onnx --tracklets DIR] [--max-batch 8] [--json out.json]

All three read the same folder of tracklets (JPEG frames and .pose files, as ``infer.py`` does),
decode with the same code (``images.load_frame``, ``poses.load_pose``) and run the same engine:

- ``runner``: ``pipeline.run_tracklets`` through a Runner: decoding on worker threads overlaps
  the engine, clips of several tracklets share a batch;
- ``clip_by_clip``: decode one clip, run it alone (batch 1), repeat;
- ``batched``: decode ``max_batch`` clips, run them as one batch, repeat (no overlap).

Also reported, for context: ``decode_only`` (the decoding alone, one thread) and ``engine_only``
(pre-decoded batches, the engine's ceiling). Each is timed after one warm-up pass: median of
``repeats`` passes, the methods taking turns so that a change in the machine's load hits all
alike. Making the model and the tracklets, and creating the session, are not timed.
Without ``--engine`` the engine is the reduced-width ONNX exported from a random checkpoint by
the export CLIs (``export/random_checkpoint.py --reduced``, ``export/to_onnx.py``).
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

from keyreid.benchmarks.machine import banner, describe

from keyreid.contract import stack_clips
from keyreid.files import write_json
from keyreid.runtime.backends import open_engine
from keyreid.runtime.serving.pipeline import (clip_loader, clip_requests, load_tracklet_clips, run_tracklets,
                                      total_clips)
from keyreid.runtime.inputs.poses import PoseTally
from keyreid.runtime.serving.runner import Runner
from keyreid.runtime.inputs.tracklets import discover_tracklets
from keyreid.tolerances import TOLERANCES

METHODS = ("runner", "clip_by_clip", "batched")
CONTEXT = ("decode_only", "engine_only")
DEFAULT_MAX_BATCH = 8
DEFAULT_WORKERS = 2
# (width, height): MARS crops, and two other sizes a tracker produces (resized on decode).
CROP_SIZES = ((128, 256), (128, 256), (64, 128), (90, 300))


# ----------------------------------------------------------------------------- inputs

def export_reduced_engine(workdir: Path) -> Path:
    """A random reduced checkpoint and its fp32 ONNX, made by the export command-line tools."""
    checkpoint, engine = workdir / "random_reduced.pth", workdir / "random_reduced.onnx"
    if not engine.exists():
        for command in (["export/random_checkpoint.py", str(checkpoint), "--reduced"],
                        ["export/to_onnx.py", str(checkpoint), "--output", str(engine), "--quiet"]):
            subprocess.run([sys.executable, *command], cwd=REPO, check=True, capture_output=True, text=True)
    return engine


def make_tracklet_folder(root: Path, num_tracklets: int = 12, frames_per_tracklet: int = 24, seed: int = 0) -> Path:
    """``num_tracklets`` folders of JPEG frames (crops of several sizes) with realistic .pose files."""
    from keyreid.synthetic import write_synthetic_tracklet

    rng = np.random.default_rng(seed)
    for index in range(num_tracklets):
        write_synthetic_tracklet(root / f"tracklet_{index:03d}", frames_per_tracklet, rng,
                                 crop_size=CROP_SIZES[index % len(CROP_SIZES)])
    return root


# ----------------------------------------------------------------------------- the measured work

class RunnerBench:
    """One active engine and one Runner over one tracklet folder; each method embeds every
    tracklet once and returns the features [M, E]."""

    def __init__(self, engine_path: Path, tracklet_dir: Path, *, max_batch: int = DEFAULT_MAX_BATCH,
                 workers: int = DEFAULT_WORKERS, threads: Optional[int] = None, queue_delay_ms: float = 5.0,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.engine_path, self.tracklet_dir = Path(engine_path), Path(tracklet_dir)
        self.max_batch, self.workers, self.threads = max_batch, workers, threads
        self.queue_delay_ms = queue_delay_ms
        self.tracklets = discover_tracklets(tracklet_dir).tracklets
        self.num_clips = total_clips(self.tracklets)
        self.engine = open_engine(engine_path, providers=list(providers), threads=threads)
        self.runner: Optional[Runner] = None
        self._decoded: Optional[List[dict]] = None

    def __enter__(self) -> "RunnerBench":
        self.engine.activate()
        self.tally = PoseTally()
        self.runner = Runner(self.engine, max_batch_size=self.max_batch, max_queue_delay_ms=self.queue_delay_ms,
                             max_queue_size=8, preprocess=clip_loader(self.tally), preprocess_workers=self.workers)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.runner is not None:
            self.runner.close()
        self.engine.deactivate()

    def methods(self) -> Dict[str, Callable[[], np.ndarray]]:
        return {"runner": self.run_runner, "clip_by_clip": self.run_clip_by_clip, "batched": self.run_batched,
                "decode_only": self.run_decode_only, "engine_only": self.run_engine_only}

    def run_runner(self) -> np.ndarray:
        run = run_tracklets(self.runner, self.tracklets, self.tally)
        if run.failures:
            raise RuntimeError(f"tracklets failed: {run.failures[:3]}")
        return run.features

    def run_clip_by_clip(self) -> np.ndarray:
        load = clip_loader()
        features = []
        for tracklet in self.tracklets:
            embeddings = [self.engine.infer(stack_clips([load(request)]))["embedding"][0]
                          for request in clip_requests(tracklet)]
            features.append(np.mean(embeddings, axis=0, dtype=np.float64))
        return np.asarray(features, np.float32)

    def _all_requests(self):
        return [(position, request) for position, tracklet in enumerate(self.tracklets)
                for request in clip_requests(tracklet)]

    def _batches_to_features(self, batches) -> np.ndarray:
        """Sum embeddings per tracklet over (positions, outputs) batches, then divide."""
        sums = np.zeros((len(self.tracklets), self.engine.embedding_dim), np.float64)
        counts = np.zeros(len(self.tracklets))
        for positions, embeddings in batches:
            np.add.at(sums, positions, embeddings)
            np.add.at(counts, positions, 1)
        return (sums / counts[:, None]).astype(np.float32)

    def run_batched(self) -> np.ndarray:
        load, requests = clip_loader(), self._all_requests()

        def batches():
            for start in range(0, len(requests), self.max_batch):
                chunk = requests[start:start + self.max_batch]
                feed = stack_clips([load(request) for _, request in chunk])
                yield [position for position, _ in chunk], self.engine.infer(feed)["embedding"]
        return self._batches_to_features(batches())

    def run_decode_only(self) -> np.ndarray:
        return np.array(len(load_tracklet_clips(self.tracklets)))

    def run_engine_only(self) -> np.ndarray:
        if self._decoded is None:      # decoded once, outside the timing of later passes
            load = clip_loader()
            self._decoded = [(position, load(request)) for position, request in self._all_requests()]
        decoded = self._decoded

        def batches():
            for start in range(0, len(decoded), self.max_batch):
                chunk = decoded[start:start + self.max_batch]
                yield [p for p, _ in chunk], self.engine.infer(stack_clips([c for _, c in chunk]))["embedding"]
        return self._batches_to_features(batches())


def interleaved_median_seconds(calls: Dict[str, Callable[[], object]], repeats: int,
                               progress: Callable[[str], None] = print) -> Dict[str, float]:
    """Median seconds per call of each entry. Each is warmed up once (first-run allocations,
    thread start-up, file caches), then the calls take turns, so a change in the machine's load
    during the run shifts every method alike instead of skewing one."""
    for call in calls.values():
        call()
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for repeat in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
        progress(f"  pass {repeat + 1}/{repeats}: " + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in calls))
    return {name: statistics.median(values) for name, values in times.items()}


def measure_runner(engine_path, tracklet_dir, *, max_batch: int = DEFAULT_MAX_BATCH, workers: int = DEFAULT_WORKERS,
                   threads: Optional[int] = None, queue_delay_ms: float = 5.0, repeats: int = 5,
                   methods: Sequence[str] = METHODS + CONTEXT, progress: Callable[[str], None] = print) -> dict:
    """Clips per second of each method on one tracklet folder and engine.

    Returns {"machine": ..., "engine", "tracklets", "clips", "max_batch", "workers", "threads",
    "repeats", "clips_per_second": {method: value}, "seconds": {method: median seconds per pass}}.
    """
    results: Dict[str, object] = {"machine": describe(threads or "onnxruntime default"), "engine": str(engine_path),
                                  "tracklet_dir": str(tracklet_dir)}
    with RunnerBench(engine_path, tracklet_dir, max_batch=max_batch, workers=workers, threads=threads,
                     queue_delay_ms=queue_delay_ms) as bench:
        results.update(tracklets=len(bench.tracklets), clips=bench.num_clips, embedding_dim=bench.engine.embedding_dim,
                       max_batch=max_batch, workers=workers, threads=threads, repeats=repeats)
        available = bench.methods()
        seconds = interleaved_median_seconds({method: available[method] for method in methods}, repeats, progress)
    results["clips_per_second"] = {method: results["clips"] / value for method, value in seconds.items()}
    results["seconds"] = seconds
    return results


def table(results: dict) -> str:
    speeds = results["clips_per_second"]
    baseline = speeds.get("clip_by_clip")
    lines = [f"{'method':<14}{'clips/s':>10}{'vs clip-by-clip':>17}", "-" * 41]
    for method, value in speeds.items():
        ratio = f"{value / baseline:>16.2f}x" if baseline else ""
        lines.append(f"{method:<14}{value:>10.2f}{ratio}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pytest-benchmark

@pytest.fixture(scope="module")
def runner_inputs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench_runner")
    return export_reduced_engine(workdir), make_tracklet_folder(workdir / "tracklets")


@pytest.mark.parametrize("method", METHODS)
def test_tracklets_to_features(benchmark, runner_inputs, method):
    engine_path, tracklet_dir = runner_inputs
    benchmark.group = "tracklet folder -> features (reduced model)"
    with RunnerBench(engine_path, tracklet_dir, threads=None) as bench:
        run = bench.methods()[method]
        reference = bench.run_clip_by_clip()       # also the warm-up
        features = run()
        exact = TOLERANCES["fp32"]      # batching must not change a clip's result
        np.testing.assert_allclose(features, reference, rtol=exact["embedding"].max_rel,
                                   atol=exact["part_weights"].max_abs)
        benchmark.extra_info.update(method=method, clips=bench.num_clips, max_batch=bench.max_batch,
                                    workers=bench.workers, machine=describe("onnxruntime default"))
        benchmark.pedantic(run, rounds=3, iterations=1)
        benchmark.extra_info["clips_per_second"] = bench.num_clips / benchmark.stats.stats.median


# ----------------------------------------------------------------------------- script

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, help="engine to run (default: a random reduced ONNX, exported here)")
    parser.add_argument("--tracklets", type=Path, help="tracklet folder (default: 12 synthetic tracklets of 24 frames)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="largest batch, in clips: the runner's most clips per engine call (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="runner decoding threads")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads: ONNX Runtime's, inside one operator (default: its own)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        if args.engine is None:
            print("exporting a random reduced model (not timed)")
        engine = args.engine or export_reduced_engine(workdir)
        tracklets = args.tracklets or make_tracklet_folder(workdir / "tracklets")
        print(banner(describe(args.threads or "onnxruntime default")))
        print(f"engine {engine}; tracklets {tracklets}; max batch {args.max_batch}, {args.workers} decoding "
              f"workers; median of {args.repeats} interleaved passes after one warm-up")
        results = measure_runner(engine, tracklets, max_batch=args.max_batch, workers=args.workers,
                                 threads=args.threads, repeats=args.repeats)
    print(f"{results['tracklets']} tracklets, {results['clips']} clips, {results['embedding_dim']}-d embeddings")
    print(table(results))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
