"""Argument groups the runtime's command-line tools share (engine and runner options).

``infer.py`` and ``compare.py`` both open engines the same way; the options and their parsing
live here once, and turn into keyword arguments for ``open_engine`` and ``Runner``.
"""
import argparse
from pathlib import Path
from typing import Dict, List, Union

from keyreid.cli import non_negative_float, positive_float, positive_int
from keyreid.errors import KeyreidError
from keyreid.runtime.engines import ONNX_SUFFIXES
from keyreid.triton import is_triton_url
from keyreid.runtime.images import DEFAULT_MAX_FRAME_SIDE
from keyreid.runtime.pipeline import DEFAULT_STALL_TIMEOUT_S

ENGINE_HELP = ("model to run: .onnx (ONNX Runtime), .plan/.engine/.trt (TensorRT), or "
               "grpc://HOST:PORT/MODEL or http://HOST:PORT/MODEL (a Triton Inference Server)")

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
DEFAULT_QUEUE_DELAY_MS = 5.0
DEFAULT_QUEUE_SIZE = 8
DEFAULT_WORKERS = 4


def engine_location(text: str) -> Union[str, Path]:
    """An engine file as a Path, a Triton server address kept as the string it is."""
    return text if is_triton_url(text) else Path(text)


def parse_providers(text: str) -> List[str]:
    """``"cuda,cpu"`` -> ``["CUDAExecutionProvider", "CPUExecutionProvider"]``; full names pass."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one execution provider")
    return [PROVIDER_ALIASES.get(name.lower(), name) for name in names]


def add_engine_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("engine options")
    group.add_argument("--providers", type=parse_providers, metavar="LIST",
                       help="ONNX Runtime execution providers, most preferred first, comma-separated "
                            "(full names or cpu, cuda, tensorrt; default: TensorRT, CUDA, CPU, "
                            "whichever this onnxruntime build has). .onnx engines only")
    group.add_argument("--threads", type=positive_int, metavar="N",
                       help="ONNX Runtime threads inside one operator (default: onnxruntime's "
                            "choice, one per core). .onnx engines only")
    group.add_argument("--clips-per-run", type=positive_int, metavar="N",
                       help="ONNX Runtime runs a batch in pieces of N clips (default: 1 on the CPU "
                            "provider, where it measured fastest per clip; whole batches on a GPU). "
                            ".onnx engines only")
    group.add_argument("--max-batch", type=positive_int, metavar="N",
                       help="most clips per engine call (default: 16; a TensorRT engine runs a "
                            "bigger call in pieces of its profile's maximum)")
    group.add_argument("--num-cameras", type=positive_int, metavar="C",
                       help="cameras the model knows, for the camera range check (default: the "
                            "ONNX metadata, or the TensorRT plan's sidecar)")
    group.add_argument("--plugin", type=Path, action="append", default=[], metavar="LIB",
                       help="TensorRT plugin library to load first (repeatable). TensorRT engines only")
    group.add_argument("--timeout", type=positive_float, metavar="S",
                       help="longest wait for one request to the server, in seconds (default: 60); "
                            "requests the server cannot take are retried 3 times. Triton engines only")
    return group


def add_frame_limit_argument(parser: "argparse._ActionsContainer") -> None:
    parser.add_argument("--max-frame-side", type=positive_int, default=DEFAULT_MAX_FRAME_SIDE, metavar="PX",
                        help="a frame whose JPEG/PNG header declares a wider or taller image fails its "
                             "tracklet before it is decoded; bounds memory (default: %(default)d)")


def add_runner_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("batching options")
    group.add_argument("--queue-delay-ms", type=non_negative_float, default=DEFAULT_QUEUE_DELAY_MS,
                       metavar="MS",
                       help="longest a clip waits for a fuller batch (default: %(default)g)")
    group.add_argument("--queue-size", type=positive_int, default=DEFAULT_QUEUE_SIZE, metavar="N",
                       help="tracklets decoded or waiting at once; bounds memory "
                            "(default: %(default)d)")
    group.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS, metavar="N",
                       help="threads decoding frames and poses while the engine runs "
                            "(default: %(default)d)")
    group.add_argument("--stall-timeout", type=non_negative_float, default=DEFAULT_STALL_TIMEOUT_S,
                       metavar="S",
                       help="fail the tracklets still waiting when nothing finished for this long "
                            "(a hung engine) (default: %(default)g)")
    return group


def engine_options(args: argparse.Namespace, engine_path: Union[str, Path]) -> Dict[str, object]:
    """Keyword arguments for ``open_engine(engine_path, ...)`` from the parsed options."""
    options: Dict[str, object] = {}
    if args.num_cameras is not None:
        options["num_cameras"] = args.num_cameras
    if is_triton_url(engine_path):
        for flag, value in (("--providers", args.providers), ("--threads", args.threads),
                            ("--clips-per-run", args.clips_per_run), ("--plugin", args.plugin)):
            if value:
                raise KeyreidError(f"{flag} is for local engines; {engine_path} is a Triton server")
        if args.timeout is not None:
            options["timeout_s"] = args.timeout
        return options
    if args.timeout is not None:
        raise KeyreidError(f"--timeout is for Triton engines; {engine_path} is a local file")
    if Path(engine_path).suffix.lower() in ONNX_SUFFIXES:
        if args.plugin:
            raise KeyreidError(f"--plugin is for TensorRT engines; {engine_path} is an ONNX model")
        if args.providers is not None:
            options["providers"] = args.providers
        if args.threads is not None:
            options["intra_op_threads"] = args.threads
        if args.clips_per_run is not None:
            options["clips_per_run"] = args.clips_per_run
    else:
        for flag, value in (("--providers", args.providers), ("--threads", args.threads),
                            ("--clips-per-run", args.clips_per_run)):
            if value is not None:
                raise KeyreidError(f"{flag} is for ONNX Runtime; {engine_path} is a TensorRT engine")
        if args.plugin:
            options["plugin_libraries"] = args.plugin
    return options


def runner_options(args: argparse.Namespace) -> Dict[str, object]:
    """Keyword arguments for ``Runner(engine, ...)`` (without ``preprocess``)."""
    return {"max_batch_size": args.max_batch, "max_queue_delay_ms": args.queue_delay_ms,
            "max_queue_size": args.queue_size, "block_when_full": True,
            "block_timeout_s": args.stall_timeout, "preprocess_workers": args.workers}

