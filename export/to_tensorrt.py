"""Turn an exported KeyRe-ID ONNX model into a TensorRT engine for the GPU this runs on.

    python export/to_tensorrt.py MODEL.onnx [-o MODEL.plan] [--min-batch N --opt-batch N --max-batch N]
                                 [--workspace MiB] [--timing-cache FILE] [--plugin aot|none]

Writes MODEL.plan and its sidecar MODEL.plan.json (both whole: temporary file, then rename).
"""
import argparse
import sys
from pathlib import Path

from keyreid.cli import Steps, program_name, run_main
from keyreid.errors import KeyreidError
from keyreid.files import check_writable
from keyreid.runtime.backends.formats import TENSORRT_SUFFIXES

DESCRIPTION = """\
Build a TensorRT 10 or 11 engine (.plan) from a KeyRe-ID ONNX file made by to_onnx.py
(--precision fp32 or fp16: the network is built strongly typed, so the ONNX file's precision is
the engine's). A plan runs only on the GPU model and TensorRT version that built it, so run this
on the target device. Beside the plan goes MODEL.plan.json: TensorRT, CUDA, GPU, build options
and the ONNX file's hash and metadata; runtime/infer.py reads it and refuses a plan from another
device."""

EPILOG = """\
the keypoint op (keyreid::KeypointPartPool):
  aot   the fused CUDA kernel as a TensorRT AOT plugin: its PTX is compiled for this GPU and
        stored in the plan, which then needs no Python and no plugin library (TensorRT >= 10.9)
  none  the op's ONNX function of standard ops (any TensorRT 10, e.g. JetPack 6's 10.3)

check a new build on the device against ONNX Runtime; compare.py takes the tolerances of the
plan's precision from keyreid/tolerances.py (an fp32 plan computes in TF32: its row is tf32):
  python runtime/compare.py --engine MODEL.plan --engine MODEL.onnx

install: pip install "keyreid[gpu,export]" (TensorRT, cuda-python, onnx), on the GPU that will serve.

exit status: 0 built; 1 bad input (an int8 file among it), no TensorRT or GPU, or a failed
build (nothing written); 2 wrong command-line usage."""


def build_parser() -> argparse.ArgumentParser:
    from keyreid.cli import positive_int

    parser = argparse.ArgumentParser(prog=program_name("to_tensorrt.py"), description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path, metavar="MODEL.onnx", help="ONNX file from export/to_onnx.py")
    parser.add_argument("-o", "--output", type=Path, metavar="MODEL.plan",
                        help="engine to write (default: the ONNX path with suffix .plan)")
    group = parser.add_argument_group("optimisation profile (clips per engine call)")
    group.add_argument("--min-batch", type=positive_int, default=1, metavar="N", help="smallest batch (default: %(default)d)")
    group.add_argument("--opt-batch", type=positive_int, default=8, metavar="N",
                       help="batch TensorRT tunes for (default: %(default)d)")
    group.add_argument("--max-batch", type=positive_int, default=32, metavar="N",
                       help="largest batch, in clips: the top of the plan's profile; the runtime splits "
                            "bigger calls (default: %(default)d)")
    parser.add_argument("--workspace", type=positive_int, default=4096, metavar="MiB",
                        help="most scratch GPU memory a layer may use while building (default: %(default)d)")
    parser.add_argument("--timing-cache", type=Path, metavar="FILE",
                        help="reuse and update this timing cache, making rebuilds on one device faster")
    parser.add_argument("--plugin", choices=("aot", "none"), default="aot",
                        help="how the plan runs the keypoint op: aot compiles keyreid's kernel into it, none "
                             "builds the op from standard layers (default: %(default)s; see below). Not "
                             "a plugin library: keyreid's plans need none")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from keyreid.export.trt_builder import BuildOptions, build_plan
    from keyreid.plan_sidecar import sidecar_path

    if not args.onnx.is_file():
        raise KeyreidError(f"{args.onnx}: ONNX file does not exist")
    output = args.output or args.onnx.with_suffix(TENSORRT_SUFFIXES[0])
    inputs = {args.onnx.resolve()} | ({args.timing_cache.resolve()} if args.timing_cache else set())
    if output.resolve() in inputs or sidecar_path(output).resolve() in inputs:
        raise KeyreidError(f"{output}: the plan or its sidecar would overwrite an input; choose --output")
    check_writable(output, "output")
    if args.timing_cache is not None:
        check_writable(args.timing_cache, "--timing-cache")

    options = BuildOptions(args.min_batch, args.opt_batch, args.max_batch, args.workspace, args.plugin,
                           args.timing_cache)
    steps = Steps(total=4, quiet=args.quiet)
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    sidecar = build_plan(args.onnx, output, options, step=steps, say=say)
    steps.done()
    size = output.stat().st_size / 2 ** 20
    print(f"wrote {output} ({size:.1f} MiB, TensorRT {sidecar.tensorrt_version}, {sidecar.device_name}, "
          f"batch {options.min_batch}..{options.max_batch}, plugin {options.plugin}) and {sidecar_path(output).name}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
