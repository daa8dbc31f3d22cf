"""Turn an exported model (ONNX or TensorRT plan) into a Triton Inference Server model repository.

    python export/to_triton.py MODEL.onnx|MODEL.plan --repository DIR [--name keyreid]
                               [--max-batch N] [--max-queue-delay-us N] [--instances N]
                               [--kind gpu|cpu] [--version N]

The model file goes into the repository unchanged; config.pbtxt is validated with Triton's own
ModelConfig protobuf (from tritonclient) before anything is written.
"""
import argparse
import re
import sys
from pathlib import Path

from keyreid.cli import Steps, non_negative_int, positive_int, program_name, run_main
from keyreid.errors import KeyreidError
from keyreid.triton import DEFAULT_MAX_BATCH, DEFAULT_MODEL_NAME, DEFAULT_QUEUE_DELAY_US

DESCRIPTION = """\
Write a Triton Inference Server model repository entry for a KeyRe-ID model:
  DIR/NAME/config.pbtxt       platform (onnxruntime_onnx or tensorrt_plan), max_batch_size,
                              dynamic batching, instance groups, the contract's inputs and
                              outputs (batch axis implicit), a one-clip warm-up, and the model's
                              metadata (heatmap mode, cameras, ...) as parameters
  DIR/NAME/VERSION/model.onnx the model, unchanged (or model.plan and its model.plan.json)
  DIR/NAME/warmup/crop_size   warm-up data
Then start Triton on DIR and point infer.py at it: --engine grpc://HOST:8001/NAME"""

EPILOG = """\
TensorRT plans: the plan's JSON sidecar (MODEL.plan.json, written by to_tensorrt.py) must sit
beside it; it gives the build's batch range and the TensorRT version the server must carry.

exit status: 0 written; 1 bad input (nothing written); 2 wrong command-line usage."""

# Triton model names become folder names and URL path segments.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def model_name(text: str) -> str:
    if not _MODEL_NAME.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a usable model name (letters, digits, _ . -)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("to_triton.py"), description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the exported .onnx model or TensorRT .plan")
    parser.add_argument("--repository", type=Path, required=True, metavar="DIR",
                        help="the model repository folder (created if missing)")
    parser.add_argument("--name", type=model_name, default=DEFAULT_MODEL_NAME,
                        help="model name on the server (default: %(default)s)")
    parser.add_argument("--max-batch", type=positive_int, metavar="N",
                        help=f"largest batch, in clips: the model's max_batch_size, the most clips the "
                             f"server puts in one batch (default: the plan's build maximum, {DEFAULT_MAX_BATCH} "
                             "for ONNX)")
    parser.add_argument("--max-queue-delay-us", type=non_negative_int, default=DEFAULT_QUEUE_DELAY_US,
                        metavar="US", help="longest a request waits for a fuller batch (default: %(default)s)")
    parser.add_argument("--instances", type=positive_int, default=1, metavar="N",
                        help="model instances (per GPU for --kind gpu) (default: %(default)s)")
    parser.add_argument("--kind", choices=("gpu", "cpu"), default=None,
                        help="where instances run (default: cpu for an int8 .onnx file, whose quantised "
                             "operators are CPU kernels; gpu otherwise; plans need gpu)")
    parser.add_argument("--version", type=positive_int, default=1, metavar="N",
                        help="model version folder (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from keyreid.export.triton_repository import RepositoryOptions, describe_model, instance_kind, write_repository

    if args.repository.exists() and not args.repository.is_dir():
        raise KeyreidError(f"--repository {args.repository} is a file; give a folder")
    steps = Steps(total=2, quiet=args.quiet)
    steps(f"reading {args.model} and checking it against the I/O contract")
    description = describe_model(args.model)
    kind = instance_kind(description, args.kind)
    options = RepositoryOptions(name=args.name, max_batch=args.max_batch,
                                max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                                kind=kind, version=args.version)
    model_dir = write_repository(description, args.repository, options, step=steps)
    steps.done()
    print(f"wrote {model_dir} ({'TensorRT plan' if description.kind == 'plan' else 'ONNX Runtime'}, "
          f"{kind} x{args.instances}, model version {args.version})")
    if args.kind is None and kind == "cpu":
        print("note: an int8 file: its instances run on the CPU (KIND_CPU), where its quantised "
              "operators run; export fp16 or fp32 to serve from GPUs")
    for note in description.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
