"""Check and time the fused KeypointPartPool kernel on a CUDA GPU, and the models beside it.

    python benchmarks/gpu_check.py                   # random ViT-B checkpoint, within --budget-s
    python benchmarks/gpu_check.py --reduced         # narrow random model: quick
    python benchmarks/gpu_check.py --checkpoint ckpt.pth --heatmap-mode mean
    python benchmarks/gpu_check.py --no-models       # the kernel only

It runs in parts, each timed, in one call that fits --budget-s (a part that would not fit is
skipped with a line saying so):
1. versions: torch, NVRTC, nvcc, the driver and the CUDA version it supports, and which
   compiler's image the kernel was loaded from (an nvcc cubin when the driver refuses NVRTC's
   PTX as too new);
2. kernel check, per heatmap mode at N = 1, 8, 64, 256: launched through the CUDA driver API
   with the TensorRT plugin's grid, block, shared memory and argument order into an output
   poisoned with NaN; every element written, max abs error against the NumPy reference
   <= 1e-5, a second launch and the torch op (launch_config's geometry) equal bit for bit;
3. kernel speed: CUDA events, median, against the unfused torch op on the GPU and against its
   bound, max(bytes / bandwidth, arithmetic / FP32 rate) plus an empty kernel's launch;
4. compute-sanitizer memcheck of one launch per mode (a sanitizer that refuses the device, as
   on some virtual GPUs, is recorded, not failed);
5. models: the reference and the deploy model, fp32 and bf16 autocast, batch 1, 8, 64 in the
   --heatmap-mode and batch 8 in the other modes: clips/s, ratio, and agreement (deploy fp32
   vs reference fp32, bf16 vs fp32 cosine);
6. the deploy model replayed as a CUDA graph, and 7. compiled with torch.compile, against eager.
Failed kernel checks, memcheck errors and model disagreement fail the run (exit 1); speed
targets are reported, not enforced. Results are appended, dated, to benchmarks/RESULTS.md and,
when $OUT is set, written there too (RESULTS.md and gpu_check.json with every figure), after
every part, so a run cut short keeps what it measured. Without a GPU the GPU parts are skipped
with a line each, the models run on the CPU with --reduced, and the run exits 1.
"""
import argparse
import ctypes
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from keyreid.cli import run_main
from keyreid.export.quiet_logs import quiet_third_party_logs
from keyreid.contract import CLIP_FRAMES, HEATMAP_MODES, NUM_KEYPOINTS, NUM_PARTS, NUM_PATCHES
from keyreid.errors import KeyreidError
from keyreid.files import write_bytes, write_json
from keyreid.kernels.body_parts import KERNEL_SIZE, MIN_VISIBLE_CONFIDENCE_F32
from keyreid.lazy import require
from keyreid.tolerances import TOLERANCES

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
OUT_ENV = "OUT"                       # the device machine's folder for files to bring back
JSON_NAME = "gpu_check.json"
CHECK_CLIPS = (1, 8, 64, 256)
MODEL_BATCHES = (1, 8, 64)
MODE_BATCH = 8                        # the batch the other heatmap modes and the graphs run at
TOLERANCE = TOLERANCES["fp32"]["part_weights"].max_abs     # the fused kernel against the reference
SPEEDUP_CLIPS = 64
SPEEDUP_TARGET = 20.0          # fused kernel vs the unfused torch op at N = 64
BOUND_FACTOR = 2.0             # fused kernel within 2x of its bound
# Agreement that fails the run. fp32: the exporter's fp32 gate (embedding relative error).
# torch bf16 on the GPU: the embedding cosine every lowered file precision (fp16) meets at export.
FP32_MAX_RELATIVE = TOLERANCES["fp32"]["embedding"].max_rel
BF16_MIN_COSINE = TOLERANCES["fp16"]["embedding"].min_cosine
WIN_FACTOR = 1.05              # a graph or compiled model this much faster than eager is a win
MEMCHECK_TIMEOUT_S = 120
DEFAULT_BUDGET_S = 390         # inside docs/gpu.md's install line's `timeout 420`, with time to write

BYTES_PER_CLIP = 4 * (CLIP_FRAMES * NUM_KEYPOINTS * 3 + CLIP_FRAMES * 2 + NUM_PATCHES * NUM_PARTS)
# Arithmetic a kernel cannot avoid, counted with every joint visible (an upper bound): per
# joint and frame its 23x23 window pixels, each a product and a combine plus the pixel's sum,
# max and min; per frame, part and patch the loader transform (about 8 operations).
FLOPS_PER_CLIP = CLIP_FRAMES * (NUM_KEYPOINTS * KERNEL_SIZE ** 2 * 5 + NUM_PARTS * NUM_PATCHES * 8)
# FP32 lanes per SM: 64 on Turing (7.5) and A100 (8.0), 128 on every later architecture.
FP32_LANES_64 = {(7, 5), (8, 0)}
# The smallest kernel there is: its launch is the latency part of the bound.
EMPTY_PTX = ".version 7.0\n.target sm_75\n.address_size 64\n.visible .entry keyreid_empty()\n{\n\tret;\n}\n"


def batch_list(text: str):
    try:
        batches = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,8,64, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return batches


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint for the model timings (default: a random one)")
    parser.add_argument("--reduced", action="store_true", help="random narrow model instead of ViT-B (quick)")
    parser.add_argument("--no-models", action="store_true", help="check and time the kernel only")
    parser.add_argument("--heatmap-mode", default="max", choices=HEATMAP_MODES,
                        help="mode timed at every batch; the others run at --mode-batch (default: max)")
    parser.add_argument("--model-batches", type=batch_list, default=MODEL_BATCHES,
                        help="batches of the model timings (default: 1,8,64)")
    parser.add_argument("--mode-batch", type=int, default=MODE_BATCH,
                        help=f"batch of the other heatmap modes, the agreement and the graphs (default: {MODE_BATCH})")
    parser.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default: 0)")
    parser.add_argument("--kernel-repeats", type=int, default=200, help="timed launches per kernel figure (median)")
    parser.add_argument("--model-repeats", type=int, default=10, help="timed calls per model figure (median)")
    parser.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the bound, GB/s (default: from the driver)")
    parser.add_argument("--fp32-tflops", type=float, help="FP32 rate for the bound, TFLOP/s (default: from the driver)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"wall seconds for the whole run; parts that would not fit are skipped (default: {DEFAULT_BUDGET_S})")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"Markdown file to append to (default: {RESULTS})")
    parser.add_argument("--no-results", action="store_true", help="print only; append nothing (still writes to $OUT)")
    parser.add_argument("--launch-once", action="store_true", help=argparse.SUPPRESS)   # memcheck's child
    return parser


# --- versions and the device ----------------------------------------------------------------------

def display_driver_version() -> str:
    """The display driver (nvidia-smi), else 'unknown'."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no nvidia-smi)"


def _or_why(read: Callable[[], str]) -> str:
    """``read()``, or why it could not be read: a version line must never stop the run."""
    try:
        return read()
    except KeyreidError as exc:
        return f"unavailable ({exc})"


def versions(torch) -> Dict[str, str]:
    """The software the kernel and the models run on: what a CUDA_ERROR_UNSUPPORTED_PTX_VERSION
    comes down to is NVRTC (or nvcc) against the driver's CUDA version."""
    from keyreid.kernels.cuda_build import source_hash
    from keyreid.kernels.cuda_compilers import find_nvcc, nvcc_version, nvrtc_version
    from keyreid.kernels.cuda_driver import driver_cuda_version

    nvrtc = nvrtc_version()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda or "none",
            "nvrtc": f"{nvrtc[0]}.{nvrtc[1]}" if nvrtc else "not installed",
            "nvcc": _or_why(nvcc_version) if find_nvcc() else "not found",
            "driver": display_driver_version(), "driver_cuda": _or_why(driver_cuda_version),
            "kernel_source": source_hash()}


def describe_device(torch, kernel, args) -> dict:
    from keyreid.kernels.cuda_driver import cuda_call
    driver = require("cuda.bindings.driver")

    def attribute(name):
        try:
            return cuda_call(driver.cuDeviceGetAttribute(getattr(driver.CUdevice_attribute, name), kernel.device))
        except (AttributeError, KeyreidError):       # attribute unknown to this driver
            return None

    sms = attribute("CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT")
    clock_khz = attribute("CU_DEVICE_ATTRIBUTE_CLOCK_RATE")
    memory_clock_khz = attribute("CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE")
    bus_bits = attribute("CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH")
    lanes = 64 if kernel.compute_capability in FP32_LANES_64 else 128
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else \
        (2 * memory_clock_khz * 1e3 * bus_bits / 8 if memory_clock_khz and bus_bits else None)
    fp32_rate = args.fp32_tflops * 1e12 if args.fp32_tflops else \
        (2 * sms * clock_khz * 1e3 * lanes if sms and clock_khz else None)
    major, minor = kernel.compute_capability
    return {"name": torch.cuda.get_device_name(args.device), "capability": f"sm_{major}{minor}",
            "bandwidth": bandwidth, "fp32_rate": fp32_rate,
            "kernel_image": f"{kernel.image.compiler} {kernel.image.kind}"}


def banner(found: Dict[str, str], device: Optional[dict]) -> str:
    where = (f"{device['name']} ({device['capability']}), kernel loaded from {device['kernel_image']}"
             if device else "no CUDA GPU")
    return (f"device: {where}; driver {found['driver']} ({found['driver_cuda']}); NVRTC {found['nvrtc']}; "
            f"nvcc {found['nvcc']}; torch {found['torch']} (CUDA {found['torch_cuda']}); "
            f"Python {found['python']}; kernel source {found['kernel_source']}")


# --- timing ---------------------------------------------------------------------------------------

def gpu_seconds(torch, call, repeats: int, spin_cycles: int) -> float:
    """Median GPU time of ``call`` between two CUDA events. The stream first spins for
    ``spin_cycles`` so the host queues the events and the launches before the GPU reaches
    them: the figure is the GPU's time, not Python's time to issue the launch."""
    spin = getattr(torch.cuda, "_sleep", None)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if spin is not None:
            spin(spin_cycles)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def wall_seconds(torch, call, repeats: int, device) -> float:
    """Median wall time of ``call`` to its last kernel, after two warm-up calls."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        call()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- 2. correctness -------------------------------------------------------------------------------

def check_poses(num_clips: int):
    """Realistic poses (clustered, occluded, outside the crop, missing groups, other crop
    sizes) plus one clip each of NaN and inf joints, the float32 0.1 boundary and a zero-width
    crop."""
    from keyreid.synthetic import realistic_keypoints
    keypoints, crop_size = realistic_keypoints(np.random.default_rng(2024), num_clips)
    keypoints[1, 0, 0, 0] = np.nan
    keypoints[1, 1, 5, 1] = np.inf
    keypoints[2, :, 0:5, 2] = MIN_VISIBLE_CONFIDENCE_F32
    keypoints[2, :, 7:11, 2] = np.nextafter(MIN_VISIBLE_CONFIDENCE_F32, np.float32(0))
    crop_size[3, 2] = (0.0, 300.0)
    return keypoints, crop_size


def plugin_geometry(clips: int):
    """The TensorRT plugin's launch (trt_plugin.launch_geometry) as FusedKernel.launch takes it."""
    from keyreid.kernels.trt_plugin import launch_geometry
    launch = launch_geometry(clips)
    return ((launch["grid_x"], launch["grid_y"], launch["grid_z"]),
            (launch["block_x"], launch["block_y"], launch["block_z"]), launch["shared_mem"])


def plugin_argument_order(kernel) -> str:
    """'' when each entry point's PTX parameters are the plugin's (inputs, num_clips, output),
    else why not (trt_plugin.check_kernel_arguments reads them from the PTX TensorRT gets)."""
    from keyreid.kernels.cuda_build import compile_ptx, kernel_name
    from keyreid.kernels.trt_plugin import check_kernel_arguments
    ptx = compile_ptx(kernel.compute_capability)          # cached: what the plugin hands TensorRT
    try:
        for mode in HEATMAP_MODES:
            check_kernel_arguments(ptx, kernel_name(mode))
    except KeyreidError as exc:
        return str(exc)
    return ""


def launch_with_plugin_geometry(torch, kernel, mode, keypoints, crop_size, weights) -> None:
    kernel.launch(mode, keypoints.data_ptr(), crop_size.data_ptr(), weights.data_ptr(), keypoints.shape[0],
                  torch.cuda.current_stream(weights.device).cuda_stream,
                  geometry=plugin_geometry(keypoints.shape[0]))


def check_kernel(torch, kernel, device) -> list:
    """One row per (mode, N): unwritten elements, max abs error, bit-identical relaunch and
    torch op."""
    from keyreid.kernels.cuda_op import fused_kernel_unavailable
    from keyreid.kernels.reference import part_weights_reference
    import keyreid.kernels.graph_op  # noqa: F401  (registers torch.ops.keyreid.keypoint_part_pool)

    keypoints, crop_size = check_poses(max(CHECK_CLIPS))
    keypoints_gpu, crop_size_gpu = torch.from_numpy(keypoints).to(device), torch.from_numpy(crop_size).to(device)
    rows = []
    for mode in HEATMAP_MODES:
        reference = part_weights_reference(keypoints, crop_size, mode)
        for clips in CHECK_CLIPS:
            outputs = []
            for _ in range(2):
                poisoned = torch.full((clips, NUM_PATCHES, NUM_PARTS), float("nan"), device=device)
                launch_with_plugin_geometry(torch, kernel, mode, keypoints_gpu[:clips], crop_size_gpu[:clips], poisoned)
                outputs.append(poisoned)
            via_op = torch.ops.keyreid.keypoint_part_pool(keypoints_gpu[:clips], crop_size_gpu[:clips], mode)
            torch.cuda.synchronize(device)
            weights = outputs[0].cpu().numpy()
            unwritten = int(np.isnan(weights).sum())
            error = float(np.abs(np.nan_to_num(weights, nan=np.inf) - reference[:clips]).max())
            row = {"mode": mode, "clips": clips, "unwritten": unwritten, "error": error,
                   "relaunch_identical": bool(torch.equal(outputs[0], outputs[1])),
                   "op_identical": bool(torch.equal(outputs[0], via_op))
                   and fused_kernel_unavailable(device.index) == ""}
            row["passed"] = (unwritten == 0 and error <= TOLERANCE and row["relaunch_identical"]
                             and row["op_identical"])
            rows.append(row)
    return rows


# --- 3. kernel speed ------------------------------------------------------------------------------

def empty_launch_seconds(torch, kernel, repeats: int) -> float:
    from keyreid.kernels.cuda_driver import cuda_call
    driver = require("cuda.bindings.driver")
    image = ctypes.create_string_buffer(EMPTY_PTX.encode())
    with kernel.current():
        module = cuda_call(driver.cuModuleLoadData(ctypes.addressof(image)))
        function = cuda_call(driver.cuModuleGetFunction(module, b"keyreid_empty"))

    def call():
        stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
        with kernel.current():
            cuda_call(driver.cuLaunchKernel(function, 1, 1, 1, 32, 1, 1, 0, stream, 0, 0))

    try:
        return gpu_seconds(torch, call, repeats, spin_cycles=2_000_000)
    finally:
        cuda_call(driver.cuModuleUnload(module))


def time_kernel(torch, kernel, device, info, repeats: int) -> dict:
    from keyreid.kernels.cuda_op import launch
    from keyreid.kernels.torch_op import part_weights_torch

    keypoints, crop_size = check_poses(max(CHECK_CLIPS))
    latency = empty_launch_seconds(torch, kernel, repeats)
    rows = []
    for clips in CHECK_CLIPS:
        points = torch.from_numpy(keypoints[:clips]).to(device)
        sizes = torch.from_numpy(crop_size[:clips]).to(device)
        weights = torch.empty((clips, NUM_PATCHES, NUM_PARTS), device=device)
        for mode in ("max", "mean"):
            fused = gpu_seconds(torch, lambda: launch(kernel, mode, points, sizes, weights), repeats, 2_000_000)
            with torch.no_grad():
                unfused = gpu_seconds(torch, lambda: part_weights_torch(points, sizes, mode),
                                      max(10, repeats // 10), 50_000_000)
            # A rate the driver does not report (and no option gives) drops out of the bound.
            terms = [clips * BYTES_PER_CLIP / info["bandwidth"] if info["bandwidth"] else 0.0,
                     clips * FLOPS_PER_CLIP / info["fp32_rate"] if info["fp32_rate"] else 0.0]
            bound = max(terms) + latency
            rows.append({"mode": mode, "clips": clips, "fused_us": fused * 1e6, "unfused_us": unfused * 1e6,
                         "speedup": unfused / fused, "bound_us": bound * 1e6, "vs_bound": fused / bound})
    return {"latency_us": latency * 1e6, "rows": rows, "bandwidth": info["bandwidth"], "fp32_rate": info["fp32_rate"]}


# --- 4. memcheck ----------------------------------------------------------------------------------

def find_compute_sanitizer() -> Optional[str]:
    from keyreid.kernels.cuda_compilers import find_nvcc
    nvcc = find_nvcc()
    candidates = [shutil.which("compute-sanitizer"), "/usr/local/cuda/compute-sanitizer/compute-sanitizer"]
    if nvcc:       # the toolkit keeps it beside bin/ (compute-sanitizer/) and links it into bin/
        toolkit = Path(nvcc).resolve().parent.parent
        candidates += [str(toolkit / "bin" / "compute-sanitizer"),
                       str(toolkit / "compute-sanitizer" / "compute-sanitizer")]
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def read_memcheck(returncode: Optional[int], output: str) -> dict:
    """What compute-sanitizer said: status 'clean', 'errors' (fails the run), 'refused' (the
    sanitizer does not support this device, e.g. a virtual GPU: recorded, not failed) or
    'not run' (it did not get as far as a summary)."""
    summary = re.search(r"ERROR SUMMARY: (\d+) error", output)
    last_lines = " | ".join(output.strip().splitlines()[-3:])
    if summary and int(summary.group(1)) == 0 and returncode == 0:
        return {"status": "clean", "errors": 0, "detail": summary.group(0)}
    if summary and int(summary.group(1)) > 0:
        return {"status": "errors", "errors": int(summary.group(1)), "detail": last_lines}
    if re.search(r"not supported|unsupported", output, re.I):
        return {"status": "refused", "errors": None, "detail": last_lines}
    return {"status": "not run", "errors": None, "detail": f"exit {returncode}: {last_lines}"}


def run_memcheck(ordinal: int) -> dict:
    sanitizer = find_compute_sanitizer()
    if sanitizer is None:
        return {"status": "not run", "errors": None, "detail": "compute-sanitizer was not found"}
    command = [sanitizer, "--tool", "memcheck", sys.executable,
               str(Path(__file__).resolve()), "--launch-once", "--device", str(ordinal)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=MEMCHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "not run", "errors": None, "detail": f"timed out after {MEMCHECK_TIMEOUT_S} s"}
    return read_memcheck(result.returncode, result.stdout + result.stderr)


def launch_once(ordinal: int) -> int:
    """memcheck's child: each mode launched once on 8 clips, through the driver API alone (no
    torch, whose start-up would take most of the sanitizer's time), into buffers of exactly the
    tensors' sizes so that any access past them is reported. Frees what it allocates."""
    from keyreid.kernels.cuda_driver import cuda_call, fused_kernel
    driver = require("cuda.bindings.driver")
    kernel = fused_kernel(ordinal)
    keypoints, crop_size = check_poses(8)
    arrays = {"keypoints": np.ascontiguousarray(keypoints, np.float32),
              "crop_size": np.ascontiguousarray(crop_size, np.float32),
              "weights": np.empty((8, NUM_PATCHES, NUM_PARTS), np.float32)}
    with kernel.current():
        pointers = {name: cuda_call(driver.cuMemAlloc(array.nbytes)) for name, array in arrays.items()}
        try:
            for name in ("keypoints", "crop_size"):
                cuda_call(driver.cuMemcpyHtoD(pointers[name], arrays[name].ctypes.data, arrays[name].nbytes))
            for mode in HEATMAP_MODES:
                kernel.launch(mode, int(pointers["keypoints"]), int(pointers["crop_size"]),
                              int(pointers["weights"]), 8)
            cuda_call(driver.cuCtxSynchronize())
        finally:
            for pointer in pointers.values():
                cuda_call(driver.cuMemFree(pointer))
    print("launched each mode once")
    return 0


# --- 5. models ------------------------------------------------------------------------------------

def load_checkpoint_for_models(args, scratch: Path):
    from keyreid.export.checkpoint import load_checkpoint
    from keyreid.export.config import REDUCED, VIT_B
    from keyreid.export.random_checkpoint import write_random_checkpoint

    path = args.checkpoint
    if path is None:
        path = scratch / ("random_reduced.pth" if args.reduced else "random_vit_b.pth")
        print(f"writing a random {'reduced' if args.reduced else 'ViT-B'} checkpoint", flush=True)
        write_random_checkpoint(path, REDUCED if args.reduced else VIT_B)
    return load_checkpoint(path)


def model_feed(torch, checkpoint, batch: int, device) -> dict:
    from keyreid.synthetic import MARS_CROP_SIZE, synthetic_feed
    inputs = synthetic_feed(batch, checkpoint.config.num_cameras, crop_sizes=[MARS_CROP_SIZE])
    return {name: torch.from_numpy(value).to(device) for name, value in inputs.items()}


def model_runners(torch, reference, deploy, mode: str) -> dict:
    """name -> feed -> embedding, for the reference and the deploy model in ``mode``."""
    from keyreid.export.reference_model import normalize_frames
    from keyreid.kernels.torch_op import part_weights_torch

    def run_reference(feed):
        # Upstream renders heatmaps on the CPU; here the unfused op renders them on the device.
        weights = part_weights_torch(feed["keypoints"], feed["crop_size"], mode)
        return reference(normalize_frames(feed["frames"]), weights, feed["camera"])

    def run_deploy(feed):
        return deploy(feed["frames"], feed["keypoints"], feed["crop_size"], feed["camera"])[0]

    return {"reference": run_reference, "deploy": run_deploy}


def in_precision(torch, run, feed, precision: str, device):
    """A no-argument call of ``run(feed)`` without autograd, in fp32 or bf16 autocast."""
    def call():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return run(feed)
    return call


def agreement(torch, embedding, truth) -> dict:
    embedding, truth = embedding.float(), truth.float()
    cosine = torch.nn.functional.cosine_similarity(embedding, truth, dim=1).min().item()
    relative = ((embedding - truth).abs().max() / truth.abs().max()).item()
    return {"min_cosine": cosine, "max_relative": relative}


def agreement_failures(mode: str, found: dict) -> List[str]:
    """The model disagreements that fail the run, for one heatmap mode's embeddings."""
    failures = []
    deploy = found["deploy fp32 vs reference fp32"]
    if not deploy["max_relative"] <= FP32_MAX_RELATIVE:
        failures.append(f"mode {mode}: deploy fp32 differs from the reference by {deploy['max_relative']:.2e} "
                        f"(relative, allowed {FP32_MAX_RELATIVE:.0e})")
    for name in ("reference", "deploy"):
        bf16 = found[f"{name} bf16 vs {name} fp32"]
        if not bf16["min_cosine"] >= BF16_MIN_COSINE:
            failures.append(f"mode {mode}: {name} bf16 has cosine {bf16['min_cosine']:.5f} to its fp32 "
                            f"(allowed >= {BF16_MIN_COSINE})")
    return failures


def time_and_compare_models(torch, models: dict, feeds: dict, batches, parity_batch: int, device, repeats: int):
    """clips/s per (model, precision, batch), and at ``parity_batch`` the agreement of the deploy
    model with the reference and of bf16 with fp32."""
    clips_per_second, embeddings = {}, {}
    for batch in batches:
        for precision in ("fp32", "bf16"):
            for name, run in models.items():
                call = in_precision(torch, run, feeds[batch], precision, device)
                seconds = wall_seconds(torch, call, repeats, device)
                clips_per_second.setdefault(f"{name} {precision}", {})[batch] = batch / seconds
                print(f"  {name:<9} {precision} batch {batch:>3}: {batch / seconds:10.1f} clips/s", flush=True)
                if batch == parity_batch:
                    embeddings[f"{name} {precision}"] = call()
    found = {"deploy fp32 vs reference fp32": agreement(torch, embeddings["deploy fp32"], embeddings["reference fp32"])}
    for name in models:
        found[f"{name} bf16 vs {name} fp32"] = agreement(torch, embeddings[f"{name} bf16"], embeddings[f"{name} fp32"])
    return clips_per_second, found


def time_models(torch, checkpoint, args, device) -> dict:
    """Every heatmap mode: --heatmap-mode at every batch, the others at --mode-batch."""
    from keyreid.export.checkpoint import load_reference_model
    from keyreid.export.onnx_export import build_deploy_model

    reference = load_reference_model(checkpoint).to(device).eval()
    batches = sorted(set(args.model_batches) | {args.mode_batch})
    feeds = {batch: model_feed(torch, checkpoint, batch, device) for batch in batches}
    by_mode = {}
    for mode in [args.heatmap_mode] + [mode for mode in HEATMAP_MODES if mode != args.heatmap_mode]:
        print(f" heatmap mode {mode}:", flush=True)
        deploy = build_deploy_model(checkpoint, mode).to(device).eval()
        mode_batches = batches if mode == args.heatmap_mode else [args.mode_batch]
        speed, found = time_and_compare_models(torch, model_runners(torch, reference, deploy, mode), feeds,
                                               mode_batches, args.mode_batch, device, args.model_repeats)
        by_mode[mode] = {"clips_per_second": speed, "agreement": found, "failures": agreement_failures(mode, found)}
        del deploy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"embed_dim": checkpoint.config.embed_dim, "batches": batches, "modes": by_mode}


# --- 6, 7. the deploy model as a CUDA graph and compiled ------------------------------------------

def graph_call(torch, call):
    """``call`` captured once as a CUDA graph: a no-argument replay that returns the captured
    output tensor (overwritten by each replay). Warmed up on a side stream, as capture needs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = call()

    def replay():
        graph.replay()
        return output
    return replay


def compare_faster_variant(torch, name: str, make_variant, eager, batch: int, device, repeats: int) -> dict:
    """One row: ``make_variant()`` (its build timed) against ``eager``, interleaved, and whether
    it agrees with eager (a disagreement fails the run) and is a plain win."""
    started = time.perf_counter()
    try:
        variant = make_variant()
        output = variant()
    except Exception as exc:       # capture or compilation refused: a finding, not a crash
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return {"name": name, "batch": batch, "status": f"failed: {type(exc).__name__}: {first_line}"}
    build_s = time.perf_counter() - started
    found = agreement(torch, output.clone(), eager())
    eager_s = wall_seconds(torch, eager, repeats, device)
    variant_s = wall_seconds(torch, variant, repeats, device)
    speedup = eager_s / variant_s
    agrees = found["max_relative"] <= FP32_MAX_RELATIVE
    return {"name": name, "batch": batch, "status": "ran", "build_s": build_s,
            "eager_clips_s": batch / eager_s, "variant_clips_s": batch / variant_s, "speedup": speedup,
            **found, "agrees": agrees, "plain_win": agrees and speedup >= WIN_FACTOR}


def faster_deploy_rows(torch, context, kind: str, batches) -> list:
    """``kind`` ("CUDA graph" or "torch.compile") of the deploy model in --heatmap-mode, fp32,
    against eager at each of ``batches``."""
    from keyreid.export.onnx_export import build_deploy_model
    args, device = context.args, context.device
    deploy = build_deploy_model(context.checkpoint, args.heatmap_mode).to(device).eval()
    eager_run = model_runners(torch, None, deploy, args.heatmap_mode)["deploy"]
    compiled_run = None
    if kind == "torch.compile":
        compiled_run = model_runners(torch, None, torch.compile(deploy, dynamic=False), args.heatmap_mode)["deploy"]
    rows = []
    for batch in batches:
        feed = model_feed(torch, context.checkpoint, batch, device)
        eager = in_precision(torch, eager_run, feed, "fp32", device)
        if compiled_run is None:
            make = lambda: graph_call(torch, eager)                                     # noqa: E731
        else:
            make = lambda: in_precision(torch, compiled_run, feed, "fp32", device)      # noqa: E731
        row = compare_faster_variant(torch, kind, make, eager, batch, device, args.model_repeats)
        print(f"  {variant_summary(row)}", flush=True)
        rows.append(row)
    return rows


def variant_summary(row: dict) -> str:
    if row["status"] != "ran":
        return f"{row['name']} at batch {row['batch']}: {row['status']}"
    verdict = "a plain win" if row["plain_win"] else ("DISAGREES with eager" if not row["agrees"] else "no win")
    return (f"{row['name']} at batch {row['batch']}: {row['speedup']:.2f}x eager fp32 "
            f"({row['variant_clips_s']:.1f} vs {row['eager_clips_s']:.1f} clips/s, built in {row['build_s']:.1f} s, "
            f"max rel. error {row['max_relative']:.1e}): {verdict}")


# --- report ---------------------------------------------------------------------------------------

def check_table(rows) -> list:
    lines = ["| mode | N | unwritten | max abs error | relaunch identical | torch op identical | result |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['clips']} | {row['unwritten']} | {row['error']:.2e} | "
                     f"{row['relaunch_identical']} | {row['op_identical']} | {'pass' if row['passed'] else 'FAIL'} |")
    return lines


def speed_table(timing) -> list:
    bandwidth = f"{timing['bandwidth'] / 1e9:.0f} GB/s" if timing["bandwidth"] else "unknown bandwidth"
    fp32_rate = f"{timing['fp32_rate'] / 1e12:.1f} TFLOP/s FP32" if timing["fp32_rate"] else "unknown FP32 rate"
    lines = [f"Device: {bandwidth}, {fp32_rate}; {BYTES_PER_CLIP} bytes and at most {FLOPS_PER_CLIP} "
             f"operations per clip. Empty kernel launch (latency term of the bound): {timing['latency_us']:.2f} us. "
             f"Bound = max(bytes / bandwidth, arithmetic / FP32 rate) + latency; "
             f"targets: >= {SPEEDUP_TARGET:.0f}x the unfused op at N = {SPEEDUP_CLIPS}, <= {BOUND_FACTOR:.0f}x the bound.",
             "",
             "| mode | N | fused us | unfused torch us | speed-up | bound us | fused / bound |",
             "|---|---|---|---|---|---|---|"]
    for row in timing["rows"]:
        lines.append(f"| {row['mode']} | {row['clips']} | {row['fused_us']:.2f} | {row['unfused_us']:.1f} | "
                     f"{row['speedup']:.1f}x | {row['bound_us']:.2f} | {row['vs_bound']:.2f} |")
    return lines


def target_summary(timing) -> list:
    at_target = [row for row in timing["rows"] if row["clips"] == SPEEDUP_CLIPS]
    return [f"- {row['mode']}, N = {SPEEDUP_CLIPS}: {row['speedup']:.1f}x the unfused op "
            f"({'meets' if row['speedup'] >= SPEEDUP_TARGET else 'MISSES'} {SPEEDUP_TARGET:.0f}x), "
            f"{row['vs_bound']:.2f}x its bound ({'meets' if row['vs_bound'] <= BOUND_FACTOR else 'MISSES'} "
            f"{BOUND_FACTOR:.0f}x)" for row in at_target]


def model_table(models) -> list:
    lines = [f"Model width {models['embed_dim']}; clips/s, wall time to the last kernel, median; TF32 off. "
             f"Fails the run: deploy fp32 vs reference fp32 relative error > {FP32_MAX_RELATIVE:.0e}, "
             f"bf16 vs fp32 cosine < {BF16_MIN_COSINE}.", "",
             "| mode | model | precision | " + " | ".join(f"batch {b}" for b in models["batches"])
             + " | vs reference (same precision, largest batch) |",
             "|---|---|---|" + "---|" * len(models["batches"]) + "---|"]
    for mode, found in models["modes"].items():
        speed = found["clips_per_second"]
        for key, by_batch in speed.items():
            name, precision = key.split()
            largest = max(by_batch)
            ratio = by_batch[largest] / speed[f"reference {precision}"][largest]
            lines.append(f"| {mode} | {name} | {precision} | "
                         + " | ".join(f"{by_batch[b]:.1f}" if b in by_batch else "" for b in models["batches"])
                         + f" | {ratio:.2f}x |")
    lines += ["", "| mode | comparison | min cosine | max rel. error |", "|---|---|---|---|"]
    for mode, found in models["modes"].items():
        for comparison, figures in found["agreement"].items():
            lines.append(f"| {mode} | {comparison} | {figures['min_cosine']:.6f} | {figures['max_relative']:.1e} |")
    return lines


def memcheck_lines(found: dict) -> list:
    note = {"clean": "", "errors": " (fails the run)",
            "refused": " (the sanitizer refused this device: recorded, not failed)",
            "not run": " (recorded, not failed)"}[found["status"]]
    return [f"compute-sanitizer memcheck, one launch per mode on 8 clips: {found['status']}{note}; {found['detail']}"]


# --- the run: parts, budget, results ----------------------------------------------------------------

@dataclass
class Context:
    """What the parts share: set up by main and by the parts before them."""
    torch: object
    args: argparse.Namespace
    device: object = None            # torch.device: the GPU, or the CPU without one
    kernel: object = None            # FusedKernel, None without a GPU
    info: dict = field(default_factory=dict)
    checkpoint: object = None


@dataclass
class Report:
    """Everything found so far, rewritten whole after every part: the Markdown section (under
    a dated heading, after what the results file held before the run) and a JSON of the figures."""
    heading: str
    previous: str
    targets: List[Path]              # Markdown files to write
    json_path: Optional[Path]
    sections: List[tuple] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    failures: List[str] = field(default_factory=list)
    part_seconds: Dict[str, float] = field(default_factory=dict)

    def add(self, title: str, lines: list) -> None:
        self.sections.append((title, lines))
        print("\n".join([title, *lines]), flush=True)

    def skip(self, part: str, reason: str) -> None:
        self.skipped[part] = reason
        print(f"skipped {part}: {reason}", flush=True)

    def markdown(self) -> str:
        body = "".join(f"\n{title}\n\n" + "\n".join(lines) + "\n" for title, lines in self.sections)
        tail = [f"- skipped {part}: {reason}" for part, reason in self.skipped.items()]
        tail += [f"- FAILED: {failure}" for failure in self.failures]
        tail.append("- part seconds: " + ", ".join(f"{part} {seconds:.1f}" for part, seconds in self.part_seconds.items()))
        return self.previous.rstrip("\n") + f"\n\n## {self.heading}\n{body}\n" + "\n".join(tail) + "\n"

    def write(self) -> None:
        text = self.markdown().encode()
        for path in self.targets:
            write_bytes(path, text)
        if self.json_path is not None:
            write_json(self.json_path, json_safe({"heading": self.heading, "figures": self.figures,
                                                  "skipped": self.skipped, "failures": self.failures,
                                                  "part_seconds": self.part_seconds}))


def json_safe(value):
    """``value`` with non-finite floats as strings ('inf': a failed check's error) and NumPy
    scalars as Python numbers, so that writing the figures can never end the run."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


@dataclass
class Part:
    name: str
    estimate_s: float                # on an H100 with ViT-B; parts that would not fit are skipped
    needs_gpu: bool
    run: Callable[[Context, Report], None]


def part_kernel_check(context: Context, report: Report) -> None:
    rows = check_kernel(context.torch, context.kernel, context.device)
    argument_problem = plugin_argument_order(context.kernel)
    report.figures["kernel_check"] = {"rows": rows, "plugin_argument_order": argument_problem or "as TensorRT passes"}
    report.add("### Fused kernel against the NumPy reference (driver API launch with the TensorRT plugin's "
               "geometry, output poisoned with NaN)", check_table(rows) + [
                   "", f"PTX parameters against the plugin's argument order: {argument_problem or 'equal'}"])
    report.failures += [f"kernel check {row['mode']} N={row['clips']}" for row in rows if not row["passed"]]
    if argument_problem:
        report.failures.append(f"kernel arguments: {argument_problem}")


def part_kernel_speed(context: Context, report: Report) -> None:
    timing = time_kernel(context.torch, context.kernel, context.device, context.info, context.args.kernel_repeats)
    report.figures["kernel_speed"] = timing
    report.add("### Fused kernel against the unfused torch op on the GPU (CUDA events, median)",
               speed_table(timing) + [""] + target_summary(timing)
               + ["", "Speed targets are reported, not enforced: a miss does not fail the run."])


def part_memcheck(context: Context, report: Report) -> None:
    found = run_memcheck(context.args.device)
    report.figures["memcheck"] = found
    report.add("### compute-sanitizer", memcheck_lines(found))
    if found["status"] == "errors":
        report.failures.append(f"memcheck found {found['errors']} errors")


def part_models(context: Context, report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="keyreid-gpu-check-") as scratch:
        context.checkpoint = load_checkpoint_for_models(context.args, Path(scratch))
    models = time_models(context.torch, context.checkpoint, context.args, context.device)
    report.figures["models"] = models
    report.add(f"### Models on {context.device.type.upper()}, every heatmap mode", model_table(models))
    for found in models["modes"].values():
        report.failures += found["failures"]


def faster_deploy_part(kind: str, key: str, all_batches: bool):
    def run(context: Context, report: Report) -> None:
        if context.checkpoint is None:
            report.skip(kind, "the model part did not run")
            return
        batches = sorted({context.args.mode_batch, max(context.args.model_batches)}) if all_batches \
            else [context.args.mode_batch]
        rows = faster_deploy_rows(context.torch, context, kind, batches)
        report.figures[key] = rows
        report.add(f"### Deploy model ({context.args.heatmap_mode}, fp32) as {kind} against eager",
                   [f"- {variant_summary(row)}" for row in rows])
        report.failures += [f"{kind} at batch {row['batch']} disagrees with eager ({row['max_relative']:.1e})"
                            for row in rows if row["status"] == "ran" and not row["agrees"]]
    return run


PARTS = (
    Part("kernel check", 30, True, part_kernel_check),
    Part("kernel speed", 40, True, part_kernel_speed),
    Part("memcheck", MEMCHECK_TIMEOUT_S, True, part_memcheck),
    Part("models", 120, False, part_models),
    Part("CUDA graph", 20, True, faster_deploy_part("CUDA graph", "cuda_graph", all_batches=True)),
    Part("torch.compile", 120, True, faster_deploy_part("torch.compile", "torch_compile", all_batches=False)),
)


def run_parts(context: Context, report: Report, gpu: bool, deadline: float) -> None:
    """Each part in turn, timed, unless it needs the GPU there is not, or would not finish in
    the time left; the results are rewritten after each."""
    for part in PARTS:
        left = deadline - time.perf_counter()
        if part.needs_gpu and not gpu:
            report.skip(part.name, "needs a CUDA GPU")
        elif part.name == "models" and (context.args.no_models or (not gpu and not context.args.reduced)):
            report.skip(part.name, "--no-models" if context.args.no_models else
                        "ViT-B takes minutes on a CPU; --reduced runs the model part here")
        elif left < part.estimate_s:
            report.skip(part.name, f"{left:.0f} s of --budget-s left, it takes about {part.estimate_s:.0f} s")
        else:
            started = time.perf_counter()
            part.run(context, report)
            report.part_seconds[part.name] = time.perf_counter() - started
            print(f"[{part.name}: {report.part_seconds[part.name]:.1f} s]", flush=True)
        report.write()


def open_report(args, found: Dict[str, str], device: Optional[dict], gpu: bool) -> Report:
    """Where the results go: the results file (only when a GPU ran: without one nothing was
    measured to keep) and $OUT, the device machine's folder of files that come back."""
    out = os.environ.get(OUT_ENV)
    previous = args.results.read_text() if args.results.is_file() else "# GPU results (appended by benchmarks/gpu_check.py)\n"
    targets = [args.results] if gpu and not args.no_results else []
    if out:
        if not Path(out).is_dir():
            raise KeyreidError(f"${OUT_ENV} is {out}, which is not a folder")
        targets.append(Path(out) / args.results.name)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = Report(f"{stamp}: {banner(found, device)}", previous, targets,
                    Path(out) / JSON_NAME if out else None)
    report.figures.update(versions=found, device=device or {})
    return report


def set_up_gpu(torch, args, context: Context) -> Optional[dict]:
    """The GPU's kernel and description, or None without a GPU."""
    if not torch.cuda.is_available():
        context.device = torch.device("cpu")
        return None
    require("cuda.bindings.driver")
    from keyreid.kernels.cuda_driver import fused_kernel
    context.device = torch.device("cuda", args.device)
    torch.cuda.set_device(context.device)
    # fp32 means fp32: no TF32 in cuBLAS or cuDNN, so the agreement figures measure the models.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    context.kernel = fused_kernel(args.device)
    context.info = describe_device(torch, context.kernel, args)
    return context.info


def main(argv=None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    if args.launch_once:
        return launch_once(args.device)
    torch = require("torch")
    quiet_third_party_logs()
    context = Context(torch, args)
    found = versions(torch)
    device = set_up_gpu(torch, args, context)
    gpu = device is not None
    print(banner(found, device) + f" [set-up {time.perf_counter() - started:.1f} s]", flush=True)
    report = open_report(args, found, device, gpu)
    run_parts(context, report, gpu, started + args.budget_s)
    print(f"wrote {', '.join(str(path) for path in report.targets + [report.json_path] if path) or 'nothing'}; "
          f"{time.perf_counter() - started:.0f} s in all", flush=True)
    if report.failures:
        raise KeyreidError(f"{len(report.failures)} checks failed: {'; '.join(report.failures)}")
    if not gpu:
        raise KeyreidError(f"no CUDA GPU is visible to torch {torch.__version__} (CUDA build: "
                           f"{torch.version.cuda or 'none'}), so the GPU parts were skipped; on a machine "
                           f"without a GPU, pytest tests/test_cuda_kernel.py checks the kernel's arithmetic")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
