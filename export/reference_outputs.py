"""Write reference results: sample clips and the checkpoint's reference-model outputs on them.

    python export/reference_outputs.py ckpt.pth -o ckpt_reference.npz [--heatmap-mode max] [--clips 16]
    python runtime/compare.py --engine model.plan --reference ckpt_reference.npz

Run it where torch is installed; copy the file to the device, where ``compare.py --reference``
checks an engine against it without torch (the runtime never imports the export package).
"""
import argparse
import sys
from pathlib import Path

from keyreid.cli import Steps, run_main
from keyreid.export.quiet_logs import quiet_third_party_logs
from keyreid.contract import DEFAULT_HEATMAP_MODE, HEATMAP_MODES
from keyreid.errors import KeyreidError
from keyreid.files import check_distinct_outputs, check_writable
from keyreid.reference_results import write_reference_results
from keyreid.synthetic import synthetic_feed

DEFAULT_CLIPS = 16
MAX_CLIPS = 1024     # each clip is 393 kB of frames plus a reference-model pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reference_outputs.py", description=__doc__.split("\n\n")[0],
        epilog="The clips are synthetic (realistic poses on crops of several sizes; cameras cycle "
               "-1, 0, ..., C-1). exit status: 0 written; 1 bad input (nothing written); 2 wrong usage.")
    parser.add_argument("checkpoint", type=Path, help="trained KeyRe-ID checkpoint (.pth)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="REF.npz",
                        help="reference file to write")
    parser.add_argument("--heatmap-mode", choices=HEATMAP_MODES, default=DEFAULT_HEATMAP_MODE,
                        help="heatmap mode of the reference model; must match the engine's "
                             "(default: %(default)s)")
    parser.add_argument("--clips", type=int, default=DEFAULT_CLIPS, metavar="N",
                        help=f"synthetic clips (1..{MAX_CLIPS}; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic clips (default: 0)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.clips <= MAX_CLIPS:
        raise KeyreidError(f"--clips must be between 1 and {MAX_CLIPS}, got {args.clips}")
    check_distinct_outputs({"--output": args.output}, {"the checkpoint": args.checkpoint})
    check_writable(args.output, "--output")
    quiet_third_party_logs()
    from keyreid.export.checkpoint import load_checkpoint, load_reference_model
    from keyreid.export.verify import reference_results

    steps = Steps(total=2, quiet=args.quiet)
    steps(f"loading checkpoint {args.checkpoint}")
    checkpoint = load_checkpoint(args.checkpoint)
    steps(f"running the reference model on {args.clips} synthetic clips (heatmap mode {args.heatmap_mode})")
    feed = synthetic_feed(args.clips, checkpoint.config.num_cameras, args.seed)
    expected = reference_results(load_reference_model(checkpoint), feed, args.heatmap_mode)
    steps.done()
    write_reference_results(args.output, feed, expected, {
        "heatmap_mode": args.heatmap_mode, "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": checkpoint.sha256, "num_cameras": checkpoint.config.num_cameras,
        "seed": args.seed})
    print(f"wrote {args.output} ({args.clips} clips, heatmap mode {args.heatmap_mode})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
