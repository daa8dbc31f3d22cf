"""Turn a trained KeyRe-ID checkpoint into an ONNX model (docs/contract.md §6).

    python export/to_onnx.py ckpt.pth [--output model.onnx] [--heatmap-mode max|mean|blank]
                             [--precision fp32|fp16|int8] [--target-cpu auto|avx2|vnni|amx]
                             [--opset N] [--no-verify]

The model is written to a temporary file, checked by running it in ONNX Runtime against the
reference model (unless --no-verify), and only then renamed into place.
"""
import argparse
import sys
from pathlib import Path

from keyreid.cli import positive_int, program_name, run_main
from keyreid.export.quiet_logs import quiet_third_party_logs
from keyreid.contract import DEFAULT_HEATMAP_MODE, DEFAULT_PRECISION, HEATMAP_MODES, ONNX_OPSET, PRECISIONS
from keyreid.export.verify import DEFAULT_SAMPLE_CLIPS
from keyreid.files import check_distinct_outputs, check_writable
from keyreid.cpu_features import cpu_isa
from keyreid.int8_targets import TARGET_CPUS
from keyreid.runtime.backends.formats import ONNX_SUFFIXES
from keyreid.tolerances import TOLERANCES

# Without VNNI, int8 GEMMs are only ~1.4x fp32's (measured: 54 GOP/s against 38 GFLOP/s), and
# whole int8 files ran 1.06-1.34x fp32 on an AVX2-only EPYC: worth checking before choosing int8.
AVX2_SPEED_NOTE = ("note: on CPUs without VNNI int8 gains little over fp32 (earlier int8 files ran "
                   "1.06-1.34x fp32 on an AVX2-only EPYC); measure both here with benchmarks/run.py "
                   "before choosing int8")

DESCRIPTION = """\
Export a KeyRe-ID checkpoint (the upstream model's state_dict, or {'model': ...} /
{'state_dict': ...}, DataParallel prefixes allowed) to one ONNX file with inputs
frames/keypoints/crop_size/camera and outputs embedding/part_weights (batch axis dynamic).
The graph is restructured for speed but computes what the checkpoint computes; the keypoint
heatmap op is one keyreid::KeypointPartPool node with a standard-op body, so ONNX Runtime runs
it as is and TensorRT can use the keyreid plugin."""

EPILOG = """\
heatmap modes (the checkpoint does not record which one it was trained with):
  max    current upstream generator as intended: per-pixel max of Gaussians (default)
  mean   earlier upstream generator: per-pixel mean of covering Gaussians
  blank  what the current upstream generator actually writes: empty maps (W = -1 everywhere)

verification tolerances against the reference model on sample clips (keyreid/tolerances.py):
{TOLERANCE_TABLE}

int8 target CPUs (--target-cpu; recorded in the file, checked by the runtime):
  avx2   activations on 0..127: exact on every x86 CPU, including AVX2-only ones whose int8
         kernels add product pairs in saturating 16-bit registers (cosine ~0.0004 lower)
  vnni   full 8-bit codes, for CPUs with AVX-512 VNNI or AVX-VNNI (32-bit sums); on an
         AVX2-only CPU the runtime keeps them exact on ONNX Runtime's slower u8 x u8 path,
         and says so
  amx    full 8-bit codes, for Intel CPUs with AMX
  auto   this machine's class (the default); the verification runs on this machine

exit status: 0 written and verified; 1 bad input or failed verification (nothing written);
2 wrong command-line usage; 130 interrupted, 143 terminated (nothing written, no temporary file left)."""


EPILOG = EPILOG.replace("{TOLERANCE_TABLE}", "\n".join(
    f"  {precision:<11} embedding {TOLERANCES[precision]['embedding'].describe()}, part_weights "
    f"{TOLERANCES[precision]['part_weights'].describe()}" for precision in PRECISIONS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("to_onnx.py"), description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="trained KeyRe-ID checkpoint (.pth)")
    parser.add_argument("-o", "--output", type=Path,
                        help="ONNX file to write (default: the checkpoint path with suffix .onnx)")
    parser.add_argument("--heatmap-mode", choices=HEATMAP_MODES, default=DEFAULT_HEATMAP_MODE,
                        help="how keypoints become part heatmaps; must match training "
                             f"(default: {DEFAULT_HEATMAP_MODE}; see below)")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help="fp32: exact; fp16: fp16 weights and matmuls for GPUs/TensorRT "
                             "(LayerNorm, softmax, the op and outputs stay fp32); int8: ONNX "
                             "Runtime on CPUs only (fused attention, dynamic quantisation) (default: fp32)")
    parser.add_argument("--target-cpu", choices=("auto",) + TARGET_CPUS, default=None,
                        help="int8 only: the CPU class the file is made for (default: auto, this "
                             "machine's; see below)")
    parser.add_argument("--opset", type=positive_int, default=None,
                        help=f"ONNX opset of the standard ops (default: {ONNX_OPSET}, the lowest supported)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the ONNX Runtime parity check against the reference model")
    parser.add_argument("--verify-clips", type=positive_int, default=DEFAULT_SAMPLE_CLIPS, metavar="N",
                        help="sample clips for the parity check (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.target_cpu is not None and args.precision != "int8":
        parser.error(f"--target-cpu applies to --precision int8 only, not {args.precision}")
    if args.opset is not None and args.opset < ONNX_OPSET:
        parser.error(f"--opset {args.opset} is too old: the exporter needs opset {ONNX_OPSET} or newer")
    output = args.output or args.checkpoint.with_suffix(ONNX_SUFFIXES[0])
    check_distinct_outputs({"--output": output}, {"the checkpoint": args.checkpoint})
    check_writable(output, "--output")
    quiet_third_party_logs()
    from keyreid.export.onnx_file import VerificationFailed, export_onnx

    try:
        exported = export_onnx(args.checkpoint, output, heatmap_mode=args.heatmap_mode, precision=args.precision,
                               target_cpu=args.target_cpu, opset=args.opset, verify=not args.no_verify,
                               verify_clips=args.verify_clips, progress=not args.quiet)
    except VerificationFailed as exc:
        print(exc.report.table())
        raise
    if exported.report is not None:
        print(exported.report.table())
    metadata = exported.metadata
    made_for = f" for {metadata.int8_target_cpu} CPUs" if metadata.int8_target_cpu else ""
    print(f"wrote {output} ({exported.size_mib:.1f} MiB, {args.precision}{made_for}, heatmap mode "
          f"{args.heatmap_mode}, opset {metadata.opset})")
    if metadata.int8_target_cpu == "avx2" and not cpu_isa().vnni:
        print(AVX2_SPEED_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
