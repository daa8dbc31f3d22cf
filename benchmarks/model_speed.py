"""The engines and the timing rules shared by ``run.py`` and the pytest-benchmark files.

Engines (each a callable feed -> {"embedding", "part_weights"} on the same contract inputs):
the reference (torch, eager, docs/contract.md §2 literally), the torch deploy model (the restructured
graph before export), and ONNX files in ONNX Runtime. Part-weight op implementations (feed ->
W): the NumPy reference, the vectorised torch op and the ONNX function in ONNX Runtime.

Timing: one warm-up call, then timed calls until ``repeats`` are done or ``budget_s`` has passed
(at least one). A call slower than the whole budget is measured once, its warm-up counted: on
a reference pass of a minute, first-call set-up is noise. Building, exporting, session creation
and input generation are never timed.
"""
import ctypes
import gc
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

Feed = Dict[str, np.ndarray]


def sample_feed(batch: int, num_cameras: int, seed: int = 0) -> Feed:
    from keyreid.synthetic import MARS_CROP_SIZE, synthetic_feed
    return synthetic_feed(batch, num_cameras, seed, crop_sizes=[MARS_CROP_SIZE])


def timed_calls(call: Callable[[], object], repeats: int, budget_s: float) -> List[float]:
    """Seconds of each timed call (see the module docstring for the rule)."""
    start = time.perf_counter()
    call()
    warm_up = time.perf_counter() - start
    if warm_up > budget_s:
        return [warm_up]
    times: List[float] = []
    began = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - began < budget_s):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def summarise(batch: int, times: Sequence[float]) -> dict:
    seconds = np.asarray(times)
    return {"clips_per_s": batch / float(np.median(seconds)), "p50_ms": float(np.percentile(seconds, 50) * 1e3),
            "p95_ms": float(np.percentile(seconds, 95) * 1e3), "calls": len(times)}


# ----------------------------------------------------------------------------- model engines

def reference_runner(checkpoint, threads: int, heatmap_mode: str):
    import torch
    from keyreid.export.checkpoint import load_reference_model
    from keyreid.export.verify import reference_results

    torch.set_num_threads(threads)
    model = load_reference_model(checkpoint)
    return lambda feed: reference_results(model, feed, heatmap_mode)


def deploy_runner(checkpoint, threads: int, heatmap_mode: str):
    """The restructured torch graph that the ONNX file is exported from, run eagerly."""
    import torch
    from keyreid.export.onnx_export import build_deploy_model

    torch.set_num_threads(threads)
    model = build_deploy_model(checkpoint, heatmap_mode)

    def run(feed: Feed) -> Feed:
        with torch.no_grad():
            embedding, part_weights = model(*(torch.from_numpy(feed[name]) for name in
                                              ("frames", "keypoints", "crop_size", "camera")))
        return {"embedding": embedding.numpy(), "part_weights": part_weights.numpy()}
    return run


def onnxruntime_session(model, threads: int, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """``model``: a path or serialised bytes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=list(providers))


def onnxruntime_runner(onnx_path: Path, threads: int, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """The runtime's ONNX Runtime engine as a user gets it: contract checks on every feed, and on
    the CPU provider a batch run in pieces of ``CPU_CLIPS_PER_RUN`` clips."""
    from keyreid.runtime.backends.onnxruntime import OrtEngine

    engine = OrtEngine(onnx_path, providers=list(providers), threads=threads, inter_op_threads=1)
    return engine.activate().infer


def openvino_runner(onnx_path: Path, threads: int, inference_precision: str = "f32"):
    """The runtime's OpenVINO engine as a user gets it (whole batches per request)."""
    from keyreid.runtime.backends.openvino import OpenVinoEngine

    engine = OpenVinoEngine(onnx_path, threads=threads, inference_precision=inference_precision)
    return engine.activate().infer


# ----------------------------------------------------------------------------- the part-weight op

def part_weight_runners(threads: int, heatmap_mode: str) -> Dict[str, Callable[[Feed], np.ndarray]]:
    """The op alone: NumPy reference, vectorised torch (whole batch) and the ONNX function."""
    import torch
    from keyreid.kernels.onnx_function import make_part_pool_model
    from keyreid.kernels.reference import part_weights_reference
    from keyreid.kernels.torch_op import part_weights_torch

    torch.set_num_threads(threads)
    session = onnxruntime_session(make_part_pool_model(heatmap_mode).SerializeToString(), threads)

    def torch_op(feed: Feed) -> np.ndarray:
        with torch.no_grad():
            return part_weights_torch(torch.from_numpy(feed["keypoints"]), torch.from_numpy(feed["crop_size"]),
                                      heatmap_mode).numpy()
    return {"numpy reference": lambda feed: part_weights_reference(feed["keypoints"], feed["crop_size"], heatmap_mode),
            "torch (vectorised)": torch_op,
            "onnx function (ORT)": lambda feed: session.run(None, {"keypoints": feed["keypoints"],
                                                                  "crop_size": feed["crop_size"]})[0]}


# ----------------------------------------------------------------------------- memory

class PeakMemory:
    """Peak resident memory added while the block runs (Linux: VmHWM, reset through clear_refs).

    ``added_mib`` is the process's peak during the block minus its resident size at the start,
    so an engine built and measured inside the block is charged for its weights and buffers.
    Freed heap is first handed back to the system (glibc ``malloc_trim``): otherwise an engine
    reuses pages the export left resident and shows next to nothing (run 5, RESULTS.md).
    None where /proc does not allow it.
    """

    def __init__(self):
        self.added_mib: Optional[float] = None

    @staticmethod
    def _status_mib(field: str) -> Optional[float]:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    @staticmethod
    def _release_free_heap() -> None:
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):      # not glibc: nothing to release this way
            pass

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self._release_free_heap()
        self.start = self._status_mib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")     # resets VmHWM to the current resident size
            self.can_reset = True
        except OSError:
            self.can_reset = False
        return self

    def __exit__(self, *exc_info) -> None:
        peak = self._status_mib("VmHWM")
        if self.can_reset and peak is not None and self.start is not None:
            self.added_mib = peak - self.start
