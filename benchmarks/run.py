"""Side-by-side speed of the reference model and the exported ONNX models (and the runner).

    python benchmarks/run.py                      # full ViT-B random checkpoint, batch 1 and 8
    python benchmarks/run.py --reduced            # narrow model: a quick smoke run
    python benchmarks/run.py --checkpoint ckpt.pth --batch-sizes 1 8 16 --json out.json

Prints the machine, the clips/s of each engine and the ratio to the reference, measured in one
run on the same inputs with the same thread count. Nothing here is a pass/fail test.
"""
import argparse
import sys
import tempfile
from pathlib import Path

from keyreid.cli import quiet_third_party_logs, run_main
from keyreid.contract import DEFAULT_HEATMAP_MODE, HEATMAP_MODES, PRECISIONS
from keyreid.files import write_json

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # sibling modules when run as a script

from machine import banner, describe  # noqa: E402
from model_speed import measure, onnxruntime_runner, ratio_table, reference_runner  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to measure (default: a random upstream-format one)")
    parser.add_argument("--reduced", action="store_true", help="random narrow model instead of ViT-B (quick)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], metavar="N")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=PRECISIONS)
    parser.add_argument("--heatmap-mode", default=DEFAULT_HEATMAP_MODE, choices=HEATMAP_MODES)
    parser.add_argument("--workdir", type=Path, help="where to keep the exported models (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party_logs()
    from keyreid.export.checkpoint import load_checkpoint
    from keyreid.export.config import REDUCED, VIT_B
    from keyreid.export.onnx_export import export_model, write_model_atomically
    from keyreid.export.random_checkpoint import write_random_checkpoint

    info = describe(args.threads)
    print(banner(info))
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint_path = args.checkpoint
        if checkpoint_path is None:
            checkpoint_path = workdir / ("random_reduced.pth" if args.reduced else "random_vit_b.pth")
            if not checkpoint_path.exists():
                print(f"writing a random checkpoint to {checkpoint_path}")
                write_random_checkpoint(checkpoint_path, REDUCED if args.reduced else VIT_B)
        checkpoint = load_checkpoint(checkpoint_path)
        runners = {"reference": reference_runner(checkpoint, args.threads, args.heatmap_mode)}
        for precision in args.precisions:
            path = workdir / f"{checkpoint_path.stem}_{precision}.onnx"
            if not path.exists():
                print(f"exporting {path.name} (not timed)")
                write_model_atomically(export_model(checkpoint, args.heatmap_mode, precision), path)
            runners[f"onnx {precision}"] = onnxruntime_runner(path, args.threads)
        print(f"model width {checkpoint.config.embed_dim} ({checkpoint.config.embedding_dim}-d embeddings), "
              f"heatmap mode {args.heatmap_mode}, median of {args.repeats} after one warm-up")
        results = measure(runners, args.batch_sizes, checkpoint.config.num_cameras, args.repeats)
    print()
    print(ratio_table(results))
    if args.json:
        payload = {"machine": info, "embed_dim": checkpoint.config.embed_dim, "clips_per_second": results}
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
