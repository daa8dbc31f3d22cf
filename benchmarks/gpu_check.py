"""Check and time the fused KeypointPartPool kernel on a CUDA GPU, and the models beside it.

    python benchmarks/gpu_check.py                   # random ViT-B checkpoint (about 2 minutes)
    python benchmarks/gpu_check.py --reduced         # narrow random model: quick
    python benchmarks/gpu_check.py --checkpoint ckpt.pth --heatmap-mode mean
    python benchmarks/gpu_check.py --no-models       # the kernel only

On a machine with a CUDA GPU it:
1. builds the kernel for the device (NVRTC or nvcc, cached per device and source hash);
2. per heatmap mode, on realistic poses at N = 1, 8, 64, 256, launches it through the CUDA
   driver API as the TensorRT plugin does (grid, block, shared memory, argument order) into an
   output poisoned with NaN; every element must be written, the max abs error against the
   NumPy reference must be <= 1e-5, a second launch must agree bit for bit, and the torch op
   on CUDA tensors must return the same bits;
3. times the kernel (CUDA events, median of many launches) against the unfused torch op on the
   GPU and against its bound, max(bytes in + out / bandwidth, arithmetic / FP32 rate) plus an
   empty kernel's launch;
4. times the reference model and the deploy model, fp32 and bf16 autocast, batch 1, 8, 64.
It prints the tables and appends them, dated, with the GPU and its driver, to
benchmarks/RESULTS.md. Without a GPU it exits 1 with one sentence; so does a failed check.
"""
import argparse
import ctypes
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from keyreid.cli import run_main
from keyreid.export.quiet_logs import quiet_third_party_logs
from keyreid.contract import CLIP_FRAMES, HEATMAP_MODES, NUM_KEYPOINTS, NUM_PARTS, NUM_PATCHES
from keyreid.errors import KeyreidError
from keyreid.files import write_bytes
from keyreid.kernels.body_parts import KERNEL_SIZE, MIN_VISIBLE_CONFIDENCE_F32
from keyreid.lazy import require

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CHECK_CLIPS = (1, 8, 64, 256)
MODEL_BATCHES = (1, 8, 64)
TOLERANCE = 1e-5
SPEEDUP_CLIPS = 64
SPEEDUP_TARGET = 20.0          # fused kernel vs the unfused torch op at N = 64
BOUND_FACTOR = 2.0             # fused kernel within 2x of its bound

BYTES_PER_CLIP = 4 * (CLIP_FRAMES * NUM_KEYPOINTS * 3 + CLIP_FRAMES * 2 + NUM_PATCHES * NUM_PARTS)
# Arithmetic a kernel cannot avoid, counted with every joint visible (an upper bound): per
# joint and frame its 23x23 window pixels, each a product and a combine plus the pixel's sum,
# max and min; per frame, part and patch the loader transform (about 8 operations).
FLOPS_PER_CLIP = CLIP_FRAMES * (NUM_KEYPOINTS * KERNEL_SIZE ** 2 * 5 + NUM_PARTS * NUM_PATCHES * 8)
# FP32 lanes per SM: 64 on Turing (7.5) and A100 (8.0), 128 on every later architecture.
FP32_LANES_64 = {(7, 5), (8, 0)}
# The smallest kernel there is: its launch is the latency part of the bound.
EMPTY_PTX = ".version 7.0\n.target sm_75\n.address_size 64\n.visible .entry keyreid_empty()\n{\n\tret;\n}\n"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint for the model timings (default: a random one)")
    parser.add_argument("--reduced", action="store_true", help="random narrow model instead of ViT-B (quick)")
    parser.add_argument("--no-models", action="store_true", help="check and time the kernel only")
    parser.add_argument("--heatmap-mode", default="max", choices=HEATMAP_MODES, help="mode of the model timings")
    parser.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default: 0)")
    parser.add_argument("--kernel-repeats", type=int, default=200, help="timed launches per kernel figure (median)")
    parser.add_argument("--model-repeats", type=int, default=10, help="timed calls per model figure (median)")
    parser.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the bound, GB/s (default: from the driver)")
    parser.add_argument("--fp32-tflops", type=float, help="FP32 rate for the bound, TFLOP/s (default: from the driver)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"Markdown file to append to (default: {RESULTS})")
    parser.add_argument("--no-results", action="store_true", help="print only; append nothing")
    return parser


# --- the device -----------------------------------------------------------------------------------

def driver_version() -> str:
    """The display driver (nvidia-smi), else the CUDA version the driver API reports."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no nvidia-smi)"


def describe_device(torch, kernel, args) -> dict:
    from keyreid.kernels.cuda_driver import cuda_call, driver_cuda_version
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
            "driver": driver_version(), "driver_cuda": driver_cuda_version(),
            "bandwidth": bandwidth, "fp32_rate": fp32_rate, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda}


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


def check_kernel(torch, kernel, device) -> list:
    """One row per (mode, N): unwritten elements, max abs error, bit-identical relaunch and
    torch op."""
    from keyreid.kernels.cuda_op import fused_kernel_unavailable, launch
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
                launch(kernel, mode, keypoints_gpu[:clips], crop_size_gpu[:clips], poisoned)
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


# --- 4. models ------------------------------------------------------------------------------------

def load_checkpoint_for_models(args, scratch: Path):
    from keyreid.export.checkpoint import load_checkpoint
    from keyreid.export.config import REDUCED, VIT_B
    from keyreid.export.random_checkpoint import write_random_checkpoint

    path = args.checkpoint
    if path is None:
        path = scratch / ("random_reduced.pth" if args.reduced else "random_vit_b.pth")
        print(f"writing a random {'reduced' if args.reduced else 'ViT-B'} checkpoint (not timed)", flush=True)
        write_random_checkpoint(path, REDUCED if args.reduced else VIT_B)
    return load_checkpoint(path)


def time_models(torch, checkpoint, mode: str, device, repeats: int) -> dict:
    """clips/s of the reference and the deploy model per precision and batch, and their parity."""
    from keyreid.export.checkpoint import load_reference_model
    from keyreid.export.onnx_export import build_deploy_model
    from keyreid.export.reference_model import normalize_frames
    from keyreid.synthetic import MARS_CROP_SIZE, synthetic_feed
    from keyreid.kernels.torch_op import part_weights_torch

    reference = load_reference_model(checkpoint).to(device).eval()
    deploy = build_deploy_model(checkpoint, mode).to(device).eval()

    def run_reference(feed):
        # Upstream renders heatmaps on the CPU; here the unfused op renders them on the GPU.
        weights = part_weights_torch(feed["keypoints"], feed["crop_size"], mode)
        return reference(normalize_frames(feed["frames"]), weights, feed["camera"])

    def run_deploy(feed):
        return deploy(feed["frames"], feed["keypoints"], feed["crop_size"], feed["camera"])[0]

    clips_per_second, parity = {}, {}
    for batch in MODEL_BATCHES:
        inputs = synthetic_feed(batch, checkpoint.config.num_cameras, crop_sizes=[MARS_CROP_SIZE])
        feed = {name: torch.from_numpy(value).to(device) for name, value in inputs.items()}
        for precision in ("fp32", "bf16"):
            for name, run in (("reference", run_reference), ("deploy", run_deploy)):
                def call():
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                         enabled=precision == "bf16"):
                        return run(feed)
                seconds = wall_seconds(torch, call, repeats, device)
                clips_per_second.setdefault((name, precision), {})[batch] = batch / seconds
                print(f"  {name:<9} {precision} batch {batch:>3}: {batch / seconds:10.1f} clips/s", flush=True)
                if batch == MODEL_BATCHES[1]:
                    parity[(name, precision)] = call().float()
    truth = parity[("reference", "fp32")]
    agreement = {}
    for key, embedding in parity.items():
        cosine = torch.nn.functional.cosine_similarity(embedding, truth, dim=1).min().item()
        relative = ((embedding - truth).abs().max() / truth.abs().max()).item()
        agreement[key] = (cosine, relative)
    return {"clips_per_second": clips_per_second, "agreement": agreement, "embed_dim": checkpoint.config.embed_dim}


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


def model_table(models) -> list:
    results = models["clips_per_second"]
    lines = [f"Model width {models['embed_dim']}; clips/s, wall time to the last kernel, median.", "",
             "| model | precision | " + " | ".join(f"batch {b}" for b in MODEL_BATCHES)
             + " | vs reference (same precision, batch 64) | min cosine / max rel. error vs reference fp32 |",
             "|---|---|" + "---|" * len(MODEL_BATCHES) + "---|---|"]
    for (name, precision), by_batch in results.items():
        ratio = by_batch[MODEL_BATCHES[-1]] / results[("reference", precision)][MODEL_BATCHES[-1]]
        cosine, relative = models["agreement"][(name, precision)]
        lines.append(f"| {name} | {precision} | " + " | ".join(f"{by_batch[b]:.1f}" for b in MODEL_BATCHES)
                     + f" | {ratio:.2f}x | {cosine:.6f} / {relative:.1e} |")
    return lines


def target_summary(timing) -> list:
    at_target = [row for row in timing["rows"] if row["clips"] == SPEEDUP_CLIPS]
    return [f"- {row['mode']}, N = {SPEEDUP_CLIPS}: {row['speedup']:.1f}x the unfused op "
            f"({'meets' if row['speedup'] >= SPEEDUP_TARGET else 'MISSES'} {SPEEDUP_TARGET:.0f}x), "
            f"{row['vs_bound']:.2f}x its bound ({'meets' if row['vs_bound'] <= BOUND_FACTOR else 'MISSES'} "
            f"{BOUND_FACTOR:.0f}x)" for row in at_target]


def append_results(path: Path, heading: str, sections) -> None:
    previous = path.read_text() if path.is_file() else "# GPU results (appended by benchmarks/gpu_check.py)\n"
    body = "\n".join(f"\n{title}\n\n" + "\n".join(lines) for title, lines in sections)
    write_bytes(path, (previous.rstrip("\n") + f"\n\n## {heading}\n{body}\n").encode())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch = require("torch")
    if not torch.cuda.is_available():
        raise KeyreidError(f"no CUDA GPU is visible to torch {torch.__version__} (CUDA build: "
                           f"{torch.version.cuda or 'none'}), and this check needs one; on a machine "
                           f"without a GPU, pytest tests/test_cuda_kernel.py checks the kernel's arithmetic")
    require("cuda.bindings.driver")
    quiet_third_party_logs()
    from keyreid.kernels.cuda_build import source_hash
    from keyreid.kernels.cuda_driver import fused_kernel

    device = torch.device("cuda", args.device)
    torch.cuda.set_device(device)
    started = time.perf_counter()
    kernel = fused_kernel(args.device)
    info = describe_device(torch, kernel, args)
    print(f"device: {info['name']} ({info['capability']}), driver {info['driver']} ({info['driver_cuda']}), "
          f"torch {info['torch']} (CUDA {info['torch_cuda']}); kernel built and loaded in "
          f"{time.perf_counter() - started:.1f} s, source {source_hash()}", flush=True)

    checks = check_kernel(torch, kernel, device)
    sections = [("### Fused kernel against the NumPy reference (driver API launch, output poisoned with NaN)",
                 check_table(checks))]
    print("\n".join(sections[-1][1]), flush=True)
    timing = time_kernel(torch, kernel, device, info, args.kernel_repeats)
    sections.append(("### Fused kernel against the unfused torch op on the GPU (CUDA events, median)",
                     speed_table(timing) + [""] + target_summary(timing)))
    print("\n".join(sections[-1][1]), flush=True)
    if not args.no_models:
        with tempfile.TemporaryDirectory(prefix="keyreid-gpu-check-") as scratch:
            checkpoint = load_checkpoint_for_models(args, Path(scratch))
        models = time_models(torch, checkpoint, args.heatmap_mode, device, args.model_repeats)
        sections.append((f"### Models on the GPU, heatmap mode {args.heatmap_mode}", model_table(models)))
        print("\n".join(sections[-1][1]), flush=True)

    if not args.no_results:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        heading = (f"{stamp}: {info['name']} ({info['capability']}), driver {info['driver']} "
                   f"({info['driver_cuda']}), torch {info['torch']}")
        append_results(args.results, heading, sections)
        print(f"appended to {args.results}")
    failed = [f"{row['mode']} N={row['clips']}" for row in checks if not row["passed"]]
    if failed:
        raise KeyreidError(f"the fused kernel failed its check for {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
