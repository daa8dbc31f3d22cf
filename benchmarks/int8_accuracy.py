"""Accuracy of the int8 recipes (export/precision.py, one per target CPU class) on several
random checkpoints.

    python benchmarks/int8_accuracy.py                    # five ViT-B checkpoints + small residual
    python benchmarks/int8_accuracy.py --reduced          # narrow models only (quick)
    python benchmarks/int8_accuracy.py --targets avx2 --json out.json

For each checkpoint (seeds and residual scales differ, so the recipe cannot lean on one lucky
seed) it exports fp32 and one int8 ONNX file per target CPU (avx2: 7-bit activations; vnni: full
8-bit codes, the same recipe as amx) and runs them in ONNX Runtime on the same sample clips as
the reference model. Reported per target: the lowest per-clip embedding cosine of int8 against
the reference, the largest |part_weights| difference of int8 against fp32 (bars: the int8 row of
keyreid/tolerances.py) and, as a control, fp32's relative error against the reference. On a CPU without VNNI
the vnni file runs on ONNX Runtime's exact u8 x u8 path (keyreid/int8_targets.py), so every row
is what that file gives on this CPU. Checkpoints and models are written to a temporary folder;
at most one ViT-B model is held in memory at a time.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from keyreid.cli import run_main
from keyreid.cpu_features import cpu_isa
from keyreid.int8_targets import TARGET_CPUS
from keyreid.tolerances import TOLERANCES
from keyreid.export.quiet_logs import quiet_third_party_logs

# (seed, residual scale): scale < 1 shrinks the residual stream so that part weights move the
# embedding (docs/contract.md §5 caveat); > 1 widens the activations' dynamic range.
VIT_B_CASES = ((0, 1.0), (1, 0.5), (2, 2.0), (3, 0.1), (4, 1.0))
SMALL_RESIDUAL_CASE = ("reduced", 2, 1e-3)   # tests/conftest.py small_residual_checkpoint
MIN_COSINE = TOLERANCES["int8"]["embedding"].min_cosine
MAX_PART_WEIGHT_DIFF = TOLERANCES["int8"]["part_weights"].max_abs


def cosine_per_clip(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def measure_case(config_name: str, seed: int, residual_scale: float, workdir: Path, clips: int,
                 threads: int, targets=("avx2", "vnni")) -> list:
    """One row per int8 target for one random checkpoint."""
    from keyreid.export.checkpoint import load_checkpoint, load_reference_model
    from keyreid.export.config import REDUCED, VIT_B
    from keyreid.export.onnx_export import write_model_atomically
    from keyreid.export.pipeline import ExportPipeline
    from keyreid.export.random_checkpoint import write_random_checkpoint
    from keyreid.export.verify import onnxruntime_results, reference_results
    from keyreid.synthetic import MARS_CROP_SIZE, synthetic_feed

    config = VIT_B if config_name == "vit_b" else REDUCED
    path = write_random_checkpoint(workdir / f"{config_name}_{seed}_{residual_scale:g}.pth", config, seed=seed,
                                   residual_scale=residual_scale)
    checkpoint = load_checkpoint(path)
    feed = synthetic_feed(clips, config.num_cameras, seed, crop_sizes=[MARS_CROP_SIZE])
    reference = reference_results(load_reference_model(checkpoint), feed, "max")
    outputs = {}
    pipeline = ExportPipeline(checkpoint, "max")     # traced once for every variant
    for variant in ("fp32",) + tuple(targets):
        model = pipeline.model("fp32") if variant == "fp32" else pipeline.model("int8", variant)
        onnx_path = write_model_atomically(model, workdir / f"{path.stem}_{variant}.onnx")
        del model
        outputs[variant] = onnxruntime_results(onnx_path, feed, threads)
        onnx_path.unlink()
    path.unlink()
    fp32_error = np.abs(outputs["fp32"]["embedding"] - reference["embedding"]).max() \
        / np.abs(reference["embedding"]).max()
    return [{"model": config_name, "seed": seed, "residual_scale": residual_scale, "clips": clips, "target": target,
             "int8_min_cosine": float(cosine_per_clip(outputs[target]["embedding"], reference["embedding"]).min()),
             "int8_part_weights_max_diff": float(np.abs(outputs[target]["part_weights"]
                                                        - outputs["fp32"]["part_weights"]).max()),
             "fp32_max_rel_error": float(fp32_error)} for target in targets]


def table(rows) -> str:
    lines = [f"{'model':<9}{'seed':>5}{'residual':>10}{'target':>8}{'int8 cosine (min)':>19}{'part_weights diff':>19}"
             f"{'fp32 rel err':>14}  verdict", "-" * 94]
    for row in rows:
        ok = row["int8_min_cosine"] >= MIN_COSINE and row["int8_part_weights_max_diff"] <= MAX_PART_WEIGHT_DIFF
        lines.append(f"{row['model']:<9}{row['seed']:>5}{row['residual_scale']:>10g}{row['target']:>8}"
                     f"{row['int8_min_cosine']:>19.6f}"
                     f"{row['int8_part_weights_max_diff']:>19.1e}{row['fp32_max_rel_error']:>14.1e}  "
                     f"{'pass' if ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="narrow models instead of ViT-B (quick)")
    parser.add_argument("--clips", type=int, default=4, help="sample clips per checkpoint (default: 4)")
    parser.add_argument("--threads", type=int, default=2,
                        help="inference threads: ONNX Runtime's, inside one operator (default: 2)")
    parser.add_argument("--targets", nargs="+", choices=TARGET_CPUS, default=["avx2", "vnni"],
                        help="int8 target CPUs to measure (default: avx2 vnni; amx is vnni's recipe)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    quiet_third_party_logs()
    print(f"on {cpu_isa().describe()}", flush=True)
    cases = [("reduced" if args.reduced else "vit_b", seed, scale) for seed, scale in VIT_B_CASES]
    cases.append(SMALL_RESIDUAL_CASE)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, seed, scale in cases:
            print(f"{name} seed {seed} residual scale {scale:g}: exporting and comparing", flush=True)
            case_rows = measure_case(name, seed, scale, Path(scratch), args.clips, args.threads, args.targets)
            rows += case_rows
            print("\n".join(table(case_rows).splitlines()[2:]), flush=True)
    print()
    print(table(rows))
    if args.json:
        from keyreid.files import write_json
        write_json(args.json, rows)
    failed = [row for row in rows if row["int8_min_cosine"] < MIN_COSINE
              or row["int8_part_weights_max_diff"] > MAX_PART_WEIGHT_DIFF]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
