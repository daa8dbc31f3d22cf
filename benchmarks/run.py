"""Every engine side by side, and how close each one gets to this machine's limit.

    python benchmarks/run.py                      # ViT-B random checkpoint, batch 1, 8, 32
    python benchmarks/run.py --reduced            # narrow model: a quick smoke run
    python benchmarks/run.py --checkpoint ckpt.pth --batch-sizes 1 8 --json out.json --plot out.png
    python benchmarks/run.py --output-dir benchmarks/results   # replace the committed results

One run, the same inputs and the same thread count for all: the reference model (torch eager),
the torch deploy model, the exported ONNX files in ONNX Runtime (fp32, int8; fp16 where a CUDA
provider exists) and the batched runner end to end on a folder of JPEG tracklets. For each:
clips/s and latency p50/p95 per batch size, peak resident memory, the ratio to the reference,
and the achieved arithmetic rate as a fraction of the limit: the FLOPs (and int8 MACs) of one
clip, counted from the graph (benchmarks/flops.py), at this machine's fp32 and int8 GEMM rates
measured in the same run (benchmarks/machine.py). Also the part-weight op alone.

Writes the results as JSON and a PNG (clips/s against batch, limits as dashed lines), by
default under ./keyreid-bench/ (the committed results in benchmarks/results/ change only when
asked for with --output-dir benchmarks/results). Nothing here passes or fails on speed.
Exit status: 0 measured and written; 1 bad input; 2 wrong command-line usage.
Measured run times, with the machines, are in docs/speed.md.
"""
import argparse
import gc
import sys
import tempfile
from pathlib import Path

from keyreid.cli import non_negative_float, positive_int, program_name, run_main
from keyreid.export.quiet_logs import quiet_third_party_logs
from keyreid.contract import DEFAULT_HEATMAP_MODE, HEATMAP_MODES


from keyreid.benchmarks.machine import OPENVINO_PRECISIONS, banner, describe, gemm_rates
from keyreid.benchmarks.model_speed import (PeakMemory, deploy_runner, onnxruntime_runner, openvino_runner,
                         part_weight_runners, reference_runner, sample_feed, summarise, timed_calls)

DEFAULT_OUTPUT_DIR = Path("keyreid-bench")    # in the current folder; never the committed results
RUNNER_TRACKLETS, RUNNER_FRAMES, RUNNER_MAX_BATCH = 8, 16, 8


def build_parser():
    parser = argparse.ArgumentParser(prog=program_name("run.py"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to measure (default: a random upstream-format one)")
    parser.add_argument("--reduced", action="store_true", help="random narrow model instead of ViT-B (quick)")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8, 32], metavar="N",
                        help="clips per call (default: 1 8 32)")
    parser.add_argument("--threads", type=positive_int, default=2, metavar="N",
                        help="inference threads of every engine: ONNX Runtime (inside one operator), "
                             "OpenVINO, torch (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed calls per measurement, at most (default: 5)")
    parser.add_argument("--budget", type=non_negative_float, default=15.0, metavar="SECONDS",
                        help="stop repeating a measurement after this long (default: 15)")
    parser.add_argument("--heatmap-mode", default=DEFAULT_HEATMAP_MODE, choices=HEATMAP_MODES)
    parser.add_argument("--no-runner", action="store_true", help="skip the end-to-end runner measurement")
    parser.add_argument("--workdir", type=Path, help="keep checkpoints and exported models here (default: temporary)")
    parser.add_argument("-o", "--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                        help="folder for <model>.json and <model>.png (default: %(default)s/ in the current "
                             "folder; benchmarks/results replaces the committed results)")
    parser.add_argument("--json", type=Path, help="results file (default: DIR/<model>.json)")
    parser.add_argument("--plot", type=Path, help="figure (default: DIR/<model>.png)")
    return parser


def export_models(checkpoint, heatmap_mode: str, workdir: Path, stem: str, precisions) -> dict:
    """{variant: path}; the graph is traced once and the other variants derive from it. A variant
    is a precision (int8: this machine's target CPU) or ``int8-<target>`` for another target."""
    from keyreid.export.onnx_export import write_model_atomically
    from keyreid.export.pipeline import ExportPipeline

    paths = {precision: workdir / f"{stem}_{precision}.onnx" for precision in precisions}
    missing = [precision for precision, path in paths.items() if not path.exists()]
    if missing:
        print(f"exporting {', '.join(missing)} (not timed)", flush=True)
        pipeline = ExportPipeline(checkpoint, heatmap_mode)       # traced once for every variant
        for precision in missing:
            file_precision, _, target = precision.partition("-")
            # int8 without a target: this machine's class, what a user here would export
            model = pipeline.model(file_precision, (target or "auto") if file_precision == "int8" else None)
            write_model_atomically(model, paths[precision])
    return paths


def count_arithmetic(checkpoint, heatmap_mode: str, onnx_paths: dict) -> dict:
    """{engine: {"fp32_flops", "int8_macs"}} per clip: ONNX graphs walked, torch models by torch."""
    import torch
    from keyreid.benchmarks.flops import count_file, count_torch
    from keyreid.export.checkpoint import load_reference_model
    from keyreid.export.onnx_export import build_deploy_model
    from keyreid.export.reference_model import normalize_frames
    from keyreid.kernels import part_weights

    feed = sample_feed(1, checkpoint.config.num_cameras)
    tensors = {name: torch.from_numpy(value) for name, value in feed.items()}
    weights = torch.from_numpy(part_weights(feed["keypoints"], feed["crop_size"], heatmap_mode))
    counts = {"reference": {"fp32_flops": count_torch(load_reference_model(checkpoint),
                                                      normalize_frames(tensors["frames"]), weights,
                                                      tensors["camera"]), "int8_macs": 0},
              "torch deploy": {"fp32_flops": count_torch(build_deploy_model(checkpoint, heatmap_mode),
                                                         *tensors.values()), "int8_macs": 0}}
    for precision, path in onnx_paths.items():
        counted = count_file(path)
        counts[f"onnx {precision}"] = {"fp32_flops": counted["fp32_flops"], "int8_macs": counted["int8_macs"]}
    gc.collect()
    return counts


# The GEMM rate that bounds an engine's float products: its library's, at its compute precision
# (int8 products always run at ONNX Runtime's int8 rate: only ONNX Runtime runs int8 files).
FLOAT_LIMIT_KEYS = {"openvino f32": "openvino_f32_ops_per_s", "openvino bf16": "openvino_bf16_ops_per_s"}


def limit_clips_per_s(arithmetic: dict, limits: dict, float_key: str = "fp32_ops_per_s") -> float:
    """Clips/s if every counted product ran at this machine's GEMM rate and nothing else cost."""
    seconds = arithmetic["fp32_flops"] / limits[float_key] + 2 * arithmetic["int8_macs"] / limits["int8_ops_per_s"]
    return 1.0 / seconds


def measure_engines(factories: dict, feeds: dict, repeats: int, budget: float) -> tuple:
    """({engine: {"batches": {b: summary}, "peak_rss_added_mib"}}, {engine: {b: outputs}})."""
    results, outputs = {}, {}
    for name, factory in factories.items():
        outputs[name] = {}
        with PeakMemory() as memory:
            run = factory()
            batches = {}
            for batch, feed in feeds.items():
                times = timed_calls(lambda: outputs[name].__setitem__(batch, run(feed)), repeats, budget)
                batches[batch] = summarise(batch, times)
                print(f"  {name:<14} batch {batch:>3}: {batches[batch]['clips_per_s']:8.3f} clips/s "
                      f"(p50 {batches[batch]['p50_ms']:.0f} ms, {len(times)} calls)", flush=True)
            del run
            gc.collect()
        results[name] = {"batches": batches, "peak_rss_added_mib": memory.added_mib}
    return results, outputs


def accuracy(outputs: dict) -> dict:
    """Per engine, over every measured batch: lowest embedding cosine against the reference and
    largest part_weights difference against the reference and against ONNX fp32."""
    import numpy as np
    from keyreid.benchmarks.int8_accuracy import cosine_per_clip

    summary = {}
    for name, by_batch in outputs.items():
        cosines, against_reference, against_fp32 = [], [], []
        for batch, result in by_batch.items():
            reference = outputs["reference"][batch]
            cosines.append(cosine_per_clip(result["embedding"], reference["embedding"]).min())
            against_reference.append(np.abs(result["part_weights"] - reference["part_weights"]).max())
            if "onnx fp32" in outputs:
                against_fp32.append(np.abs(result["part_weights"] - outputs["onnx fp32"][batch]["part_weights"]).max())
        summary[name] = {"min_cosine_vs_reference": float(min(cosines)),
                         "part_weights_max_diff_vs_reference": float(max(against_reference)),
                         "part_weights_max_diff_vs_onnx_fp32": float(max(against_fp32)) if against_fp32 else None}
    return summary


def measure_runner(onnx_paths: dict, workdir: Path, threads: int, repeats: int) -> dict:
    """Tracklet folder -> features through the batched Runner (JPEG decoding included)."""
    from keyreid.benchmarks.bench_runner import make_tracklet_folder, measure_runner as runner_speed

    folder = workdir / "tracklets"
    if not folder.exists():
        make_tracklet_folder(folder, RUNNER_TRACKLETS, RUNNER_FRAMES)
    results = {}
    for precision, path in onnx_paths.items():
        if precision == "fp16" or "-" in precision:     # the end-to-end runner: the files a user here runs
            continue
        with PeakMemory() as memory:
            measured = runner_speed(path, folder, max_batch=RUNNER_MAX_BATCH, threads=threads, repeats=repeats,
                                    methods=("runner",), progress=lambda line: None)
        results[f"runner ({precision})"] = {"clips_per_s": measured["clips_per_second"]["runner"],
                                            "clips": measured["clips"], "tracklets": measured["tracklets"],
                                            "max_batch": RUNNER_MAX_BATCH, "peak_rss_added_mib": memory.added_mib,
                                            "graph": f"onnx {precision}"}
        print(f"  runner ({precision}): {results[f'runner ({precision})']['clips_per_s']:.3f} clips/s "
              f"({measured['clips']} clips, max batch {RUNNER_MAX_BATCH})", flush=True)
    return results


def measure_part_weight_op(feeds: dict, threads: int, heatmap_mode: str, repeats: int, budget: float) -> dict:
    results = {}
    for name, run in part_weight_runners(threads, heatmap_mode).items():
        results[name] = {batch: summarise(batch, timed_calls(lambda: run(feed), repeats, budget))
                         for batch, feed in feeds.items()}
    return results


def limit_line(rates: dict) -> str:
    torch_rate = rates.get("torch_fp32_ops_per_s")
    torch_note = f"; torch fp32 {torch_rate / 1e9:.0f} GFLOP/s, what the reference runs on" if torch_rate else ""
    openvino = [f"{precision} {rates[f'openvino_{precision}_ops_per_s'] / 1e9:.0f}" for precision in OPENVINO_PRECISIONS
                if rates.get(f"openvino_{precision}_ops_per_s")]
    openvino_note = f"; OpenVINO {', '.join(openvino)} GFLOP/s" if openvino else ""
    return (f"ONNX Runtime fp32 GEMM {rates['fp32_ops_per_s'] / 1e9:.0f} GFLOP/s, int8 GEMM "
            f"{rates['int8_ops_per_s'] / 1e9:.0f} GOP/s ({rates['size']}^2 matrices, {rates['threads']} threads"
            f"{torch_note}{openvino_note})")


def annotate(engines: dict, arithmetic: dict, limits: dict) -> None:
    """Add ratio to the reference, achieved rate and fraction of the limit, in place."""
    for name, result in engines.items():
        graph = result.get("graph", name)
        if graph is None:       # not an ONNX graph we can count (the OpenVINO int8 IR): speed only
            result["limit_clips_per_s"] = None
            for batch, entry in result["batches"].items():
                reference = engines["reference"]["batches"].get(batch)
                entry.update(vs_reference=entry["clips_per_s"] / reference["clips_per_s"] if reference else None,
                             ops_per_s=None, fraction_of_limit=None)
            continue
        counted = arithmetic[graph]
        result["arithmetic_per_clip"] = counted
        result["limit_clips_per_s"] = limit_clips_per_s(counted, limits, FLOAT_LIMIT_KEYS.get(name, "fp32_ops_per_s"))
        batches = result["batches"]
        for batch, entry in batches.items():
            reference = engines["reference"]["batches"].get(batch)
            entry["vs_reference"] = entry["clips_per_s"] / reference["clips_per_s"] if reference else None
            entry["ops_per_s"] = entry["clips_per_s"] * (counted["fp32_flops"] + 2 * counted["int8_macs"])
            entry["fraction_of_limit"] = entry["clips_per_s"] / result["limit_clips_per_s"]


def table(engines: dict) -> str:
    header = (f"{'engine':<20}{'batch':>6}{'clips/s':>10}{'vs ref':>8}{'p50 ms':>9}{'p95 ms':>9}"
              f"{'GOP/s':>8}{'of limit':>10}{'peak RSS MiB':>14}")
    lines = [header, "-" * len(header)]
    for name, result in engines.items():
        memory = result.get("peak_rss_added_mib")
        for index, (batch, entry) in enumerate(result["batches"].items()):
            ratio = f"{entry['vs_reference']:.2f}x" if entry.get("vs_reference") else "-"
            latency = (f"{entry['p50_ms']:>9.0f}{entry['p95_ms']:>9.0f}" if "p50_ms" in entry else f"{'-':>9}{'-':>9}")
            rss = f"{memory:>14.0f}" if index == 0 and memory is not None else f"{'':>14}"
            rate = (f"{entry['ops_per_s'] / 1e9:>8.1f}{entry['fraction_of_limit']:>10.0%}"
                    if entry.get("ops_per_s") is not None else f"{'-':>8}{'-':>10}")
            lines.append(f"{name if index == 0 else '':<20}{batch:>6}{entry['clips_per_s']:>10.3f}{ratio:>8}"
                         f"{latency}{rate}{rss}")
    return "\n".join(lines)


def openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("OpenVINO rows skipped: pip install 'keyreid[openvino]'", flush=True)
        return False
    return True


def openvino_int8_ir(fp32_path: Path, workdir: Path):
    """The NNCF int8 IR of ``fp32_path`` (made once, verified, not timed); None without NNCF."""
    try:
        import nncf  # noqa: F401
    except ImportError:
        print("OpenVINO int8 row skipped: pip install 'keyreid[openvino-int8]'", flush=True)
        return None
    from keyreid.export.to_openvino import export_openvino_int8

    output = workdir / f"{fp32_path.stem}_openvino_int8.xml"
    if not output.exists():
        print("quantising for OpenVINO with NNCF (not timed)", flush=True)
        export_openvino_int8(fp32_path, output)
    return output


def targets_summary(engines: dict, limit: dict, agreement: dict) -> list:
    """The ratios the CPU-portability targets are stated in, for every measured batch size:
    the best fp32 engine against the fastest fp32 GEMM any library here reached, the best int8
    engine against the best fp32 one, bf16 against fp32."""
    float_rates = {"ONNX Runtime": limit["fp32_ops_per_s"], "torch": limit.get("torch_fp32_ops_per_s"),
                   "OpenVINO": limit.get("openvino_f32_ops_per_s")}
    fastest_library = max((name for name, rate in float_rates.items() if rate), key=lambda name: float_rates[name])
    groups = {"fp32": ("onnx fp32", "openvino f32"), "int8": ("onnx int8", "openvino int8"),
              "bf16": ("openvino bf16",)}
    lines = []
    batches = engines["onnx fp32"]["batches"]
    for batch in batches:
        best = {}
        for group, names in groups.items():
            measured = [(engines[name]["batches"][batch]["clips_per_s"], name) for name in names
                        if name in engines and batch in engines[name]["batches"]]
            if measured:
                best[group] = max(measured)
        fp32_speed, fp32_name = best["fp32"]
        flops = engines["onnx fp32"]["arithmetic_per_clip"]["fp32_flops"]
        line = (f"batch {batch}: best fp32 {fp32_name} at {fp32_speed * flops / float_rates[fastest_library]:.0%} "
                f"of {fastest_library}'s fp32 GEMM rate (the fastest here)")
        for group in ("int8", "bf16"):
            if group in best:
                speed, name = best[group]
                line += f"; {name} {speed / fp32_speed:.2f}x the best fp32 (cosine {agreement[name]['min_cosine_vs_reference']:.5f})"
        lines.append(line)
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party_logs()
    import onnxruntime as ort
    from keyreid.export.checkpoint import load_checkpoint
    from keyreid.export.config import REDUCED, VIT_B
    from keyreid.export.random_checkpoint import write_random_checkpoint
    from keyreid.errors import KeyreidError
    from keyreid.files import check_writable, write_json
    from keyreid.benchmarks.plot import draw_speed_figure

    model_name = "reduced" if args.reduced else "vit_b"
    json_path = args.json or args.output_dir / f"{model_name}.json"
    plot_path = args.plot or args.output_dir / f"{model_name}.png"
    for path in (json_path, plot_path):     # fail now, not after ten minutes of measuring
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyreidError(f"cannot create {path.parent} for the results: {exc.strerror or exc}") from exc
        check_writable(path, "results")
    info = describe(args.threads)
    print(banner(info))
    from keyreid.cpu_features import cpu_isa
    from keyreid.export.precision import resolve_int8_target

    # this machine's int8 file, and the AVX2 recipe's beside it (its cost where VNNI needs no narrowing)
    precisions = ["fp32", "int8"] + (["int8-avx2"] if resolve_int8_target() != "avx2" else []) \
        + (["fp16"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint_path = args.checkpoint
        if checkpoint_path is None:
            checkpoint_path = workdir / f"random_{model_name}.pth"
            if not checkpoint_path.exists():
                print(f"writing a random checkpoint to {checkpoint_path}", flush=True)
                write_random_checkpoint(checkpoint_path, REDUCED if args.reduced else VIT_B)
        checkpoint = load_checkpoint(checkpoint_path)
        mode = args.heatmap_mode
        onnx_paths = export_models(checkpoint, mode, workdir, checkpoint_path.stem, precisions)
        print("counting the arithmetic of one clip and measuring this machine's GEMM rates", flush=True)
        arithmetic = count_arithmetic(checkpoint, mode, onnx_paths)
        limits = [gemm_rates(args.threads)]
        print(f"limits: {limit_line(limits[0])}", flush=True)

        feeds = {batch: sample_feed(batch, checkpoint.config.num_cameras) for batch in args.batch_sizes}
        factories = {"reference": lambda: reference_runner(checkpoint, args.threads, mode),
                     "torch deploy": lambda: deploy_runner(checkpoint, args.threads, mode)}
        for precision, path in onnx_paths.items():
            providers = ["CUDAExecutionProvider"] if precision == "fp16" else ["CPUExecutionProvider"]
            factories[f"onnx {precision}"] = lambda path=path, providers=providers: \
                onnxruntime_runner(path, args.threads, providers)
        if openvino_installed():
            for precision in ("f32",) + (("bf16",) if cpu_isa().bf16 else ()):
                factories[f"openvino {precision}"] = lambda precision=precision: \
                    openvino_runner(onnx_paths["fp32"], args.threads, precision)
            int8_ir = openvino_int8_ir(onnx_paths["fp32"], workdir)
            if int8_ir is not None:
                factories["openvino int8"] = lambda: openvino_runner(int8_ir, args.threads)
        print(f"model width {checkpoint.config.embed_dim}, heatmap mode {mode}; each measurement: one warm-up, "
              f"then up to {args.repeats} calls or {args.budget:g} s", flush=True)
        engines, outputs = measure_engines(factories, feeds, args.repeats, args.budget)
        agreement = accuracy(outputs)
        del outputs
        if not args.no_runner:
            for name, result in measure_runner(onnx_paths, workdir, args.threads, min(args.repeats, 2)).items():
                engines[name] = {"batches": {RUNNER_MAX_BATCH: {"clips_per_s": result.pop("clips_per_s")}},
                                 **result}
        part_weight_op = measure_part_weight_op(feeds, args.threads, mode, args.repeats, args.budget)
    limits.append(gemm_rates(args.threads))
    print(f"limits, measured again: {limit_line(limits[1])}")
    # The limit is the fastest the machine was seen to multiply: on a shared machine a single
    # measurement can land in a busy moment and make every engine look faster than its limit.
    limit = {key: max(entry[key] for entry in limits) if limits[0].get(key) else None
             for key in ("fp32_ops_per_s", "int8_ops_per_s") + tuple(FLOAT_LIMIT_KEYS.values())}
    limit.update(size=limits[0]["size"], threads=args.threads, measurements=limits)
    torch_rates = [entry["torch_fp32_ops_per_s"] for entry in limits if entry.get("torch_fp32_ops_per_s")]
    limit["torch_fp32_ops_per_s"] = max(torch_rates) if torch_rates else None     # context, not a limit
    for name in FLOAT_LIMIT_KEYS:
        if name in engines:
            engines[name]["graph"] = "onnx fp32"
    if "openvino int8" in engines:
        engines["openvino int8"]["graph"] = None
    annotate(engines, arithmetic, limit)

    print()
    print(table(engines))
    print("\nagreement (all batches): " + "; ".join(
        f"{name} cosine {entry['min_cosine_vs_reference']:.6f}"
        + (f", part_weights vs fp32 {entry['part_weights_max_diff_vs_onnx_fp32']:.1e}"
           if entry["part_weights_max_diff_vs_onnx_fp32"] is not None else "")
        for name, entry in agreement.items() if name != "reference"))
    print("\n".join(targets_summary(engines, limit, agreement)))
    print("part-weight op alone, clips/s: " + "; ".join(
        f"{name} " + "/".join(f"{entry[batch]['clips_per_s']:.0f}" for batch in args.batch_sizes)
        for name, entry in part_weight_op.items()) + f" (batch {'/'.join(map(str, args.batch_sizes))})")
    payload = {"machine": info, "limits": limit, "checkpoint": str(checkpoint_path),
               "embed_dim": checkpoint.config.embed_dim, "heatmap_mode": mode, "batch_sizes": args.batch_sizes,
               "repeats": args.repeats, "budget_s": args.budget, "engines": engines, "accuracy": agreement,
               "part_weight_op": part_weight_op}
    write_json(json_path, payload)
    draw_speed_figure(payload, plot_path)
    print(f"wrote {json_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
