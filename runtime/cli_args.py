"""Argument groups the runtime's command-line tools share (engine and runner options).

``infer.py``, ``compare.py`` and ``serve_triton.py`` open engines the same way; the options,
the check of which ones apply (``check_engine_arguments``, a usage error naming the flag) and
their parsing live here once, and turn into keyword arguments for ``open_engine`` and ``Runner``.
Which flag belongs to which backend is read from ``keyreid.runtime.backends.BACKENDS``.
"""
import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from keyreid.cli import non_negative_float, positive_float, positive_int
from keyreid.cpu_features import cpu_isa
from keyreid.errors import KeyreidError
from keyreid.model_kinds import model_kind
from keyreid.runtime.backends import AUTO, BACKENDS, Backend, backend_names, choose_backend
from keyreid.runtime.engine_openvino import INFERENCE_PRECISIONS
from keyreid.runtime.engines import Engine
from keyreid.triton import is_triton_url
from keyreid.runtime.images import DEFAULT_MAX_FRAME_SIDE
from keyreid.runtime.pipeline import DEFAULT_STALL_TIMEOUT_S

ENGINE_HELP = ("model to run: .onnx (ONNX Runtime, or OpenVINO with --backend openvino), "
               ".plan/.engine/.trt (TensorRT), or grpc://HOST:PORT/MODEL or http://HOST:PORT/MODEL "
               "(a Triton Inference Server)")

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


RUNNER_MAX_BATCH_HELP = ("largest batch, in clips: the most clips per engine call (default: the engine's "
                         "maximum, such as a TensorRT plan's profile or a Triton model's max_batch_size; "
                         "else 16)")


def add_engine_arguments(parser: argparse.ArgumentParser,
                         max_batch_help: str = RUNNER_MAX_BATCH_HELP) -> argparse._ArgumentGroup:
    """The engine options; ``max_batch_help`` says what --max-batch bounds in this tool (every
    tool's --max-batch is its largest batch, in clips)."""
    group = parser.add_argument_group("engine options")
    group.add_argument("--backend", action="append", choices=(AUTO,) + backend_names(), metavar="NAME",
                       help="what runs the model: " + "; ".join(f"{backend.name}: {backend.summary}"
                                                                for backend in BACKENDS)
                            + "; auto (default): the first of these that runs the model and takes every "
                              "flag given (.onnx: ONNX Runtime, or OpenVINO with --inference-precision). "
                              "compare.py takes it once for every --engine or once per --engine")
    group.add_argument("--inference-precision", choices=INFERENCE_PRECISIONS, metavar="P",
                       help="OpenVINO's compute precision, always pinned: f32 (default, exact), bf16 "
                            "(CPUs with AMX or AVX-512 BF16; close to f32, not equal), auto (bf16 on AMX "
                            "CPUs, else f32). OpenVINO only: with --backend auto it selects OpenVINO")
    group.add_argument("--providers", type=parse_providers, metavar="LIST",
                       help="ONNX Runtime execution providers, most preferred first, comma-separated "
                            "(full names or cpu, cuda, tensorrt; default: TensorRT, CUDA, CPU, "
                            "whichever this onnxruntime build has). .onnx engines only")
    group.add_argument("--threads", type=positive_int, metavar="N",
                       help="inference threads: ONNX Runtime's (inside one operator) or OpenVINO's "
                            "(default: the library's choice, one per core). .onnx engines only")
    group.add_argument("--clips-per-run", type=positive_int, metavar="N",
                       help="run a batch in pieces of N clips (ONNX Runtime default: 1 on the CPU "
                            "provider, where it measured fastest per clip, whole batches on a GPU; "
                            "OpenVINO default: whole batches). .onnx engines only")
    group.add_argument("--max-batch", type=positive_int, metavar="N", help=max_batch_help)
    group.add_argument("--num-cameras", type=positive_int, metavar="C",
                       help="cameras the model knows, for the camera range check (default: the "
                            "ONNX metadata, or the TensorRT plan's sidecar)")
    group.add_argument("--plugin-library", type=Path, action="append", default=[], metavar="LIB",
                       help="a TensorRT plugin library (.so) to load before the engine (repeatable); "
                            "keyreid's own plans need none. TensorRT engines only")
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


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _given_backend_flags(args: argparse.Namespace) -> List[str]:
    """The backend-specific flags given on the command line (a flag's default is None or [])."""
    flags = dict.fromkeys(flag for backend in BACKENDS for flag in backend.cli_flags)
    return [flag for flag in flags if getattr(args, _dest(flag), None) not in (None, [])]


def requested_backend(args: argparse.Namespace, index: int = 0) -> str:
    """The --backend asked for the engine at ``index`` (one --backend applies to every engine)."""
    names = args.backend or [AUTO]
    return names[index] if len(names) > 1 else names[0]


def _engine_backend(args: argparse.Namespace, engine_path: Union[str, Path], index: int) -> Optional[Backend]:
    """The backend that will run ``engine_path``; None for an unknown file type (``open_engine``
    reports that one, as bad input)."""
    kind = model_kind(engine_path)
    if kind is None:
        return None
    given = set(_given_backend_flags(args))
    asked = [keyword for backend in BACKENDS for flag, keyword in backend.cli_flags.items() if flag in given]
    return choose_backend(kind, requested_backend(args, index), engine_path, asked)


def check_engine_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           engines: Sequence[Union[str, Path]]) -> None:
    """Usage errors (exit 2), before any work: a --backend that cannot run its engine, the wrong
    number of --backend, and a backend flag that none of the chosen backends takes."""
    if args.backend and len(args.backend) > 1 and len(args.backend) != len(engines):
        parser.error(f"--backend is given {len(args.backend)} times for {len(engines)} engine(s); "
                     "give it once, or once per --engine")
    chosen = []
    for index, engine in enumerate(engines):
        try:
            chosen.append((engine, _engine_backend(args, engine, index)))
        except KeyreidError as exc:
            parser.error(f"--backend {requested_backend(args, index)}: {exc}")
    known = [(engine, backend) for engine, backend in chosen if backend is not None]
    for flag in _given_backend_flags(args):
        if known and not any(flag in backend.cli_flags for _, backend in known):
            takers = [backend.name for backend in BACKENDS if flag in backend.cli_flags]
            runs = ", ".join(f"{engine} runs on {backend.name}" for engine, backend in known)
            parser.error(f"{flag} is for the {' and '.join(takers)} backend{'s' if len(takers) > 1 else ''}; {runs}")


def engine_options(args: argparse.Namespace, engine_path: Union[str, Path], index: int = 0) -> Dict[str, object]:
    """Keyword arguments for ``open_engine(engine_path, ...)`` (the engine at ``index`` of the
    command's --engine list): the backend, the cameras, and the flags that backend takes.
    Call ``check_engine_arguments`` first: flags other backends take are left out here."""
    options: Dict[str, object] = {}
    if args.num_cameras is not None:
        options["num_cameras"] = args.num_cameras
    backend = _engine_backend(args, engine_path, index)
    if backend is None:
        return options
    options["backend"] = backend.name
    for flag, keyword in backend.cli_flags.items():
        value = getattr(args, _dest(flag), None)
        if value not in (None, []):
            options[keyword] = value
    return options


def engine_banner(engine: Engine) -> str:
    """Which backend runs the engine and in which precision, for banners."""
    return f"{engine.backend} backend, computing in {engine.compute_precision}"


def cpu_banner() -> str:
    """This machine's CPU as the inference libraries see it, for banners."""
    return f"cpu: {cpu_isa().describe()}"


def runner_options(args: argparse.Namespace) -> Dict[str, object]:
    """Keyword arguments for ``Runner(engine, ...)`` (without ``preprocess``)."""
    return {"max_batch_size": args.max_batch, "max_queue_delay_ms": args.queue_delay_ms,
            "max_queue_size": args.queue_size, "block_when_full": True,
            "block_timeout_s": args.stall_timeout, "preprocess_workers": args.workers}

