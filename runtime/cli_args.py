"""Argument groups the runtime's command-line tools share (engine and runner options).

``infer.py``, ``compare.py`` and ``serve_triton.py`` open engines the same way; the options,
the check of which ones apply (``check_engine_arguments``, a usage error naming the flag) and
their parsing live here once, and turn into keyword arguments for ``open_engine`` and ``Runner``.
Which flag belongs to which backend is read from ``keyreid.runtime.backends.registry.BACKENDS``.
"""
import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from keyreid.cli import non_negative_float, positive_int
from keyreid.cpu_features import cpu_isa
from keyreid.errors import KeyreidError
from keyreid.runtime.backends.formats import model_kind
from keyreid.runtime.backends.declaration import Backend, EngineOption
from keyreid.runtime.backends import AUTO, BACKENDS, backend_names, choose_backend
from keyreid.runtime.backends.base import Engine
from keyreid.triton import is_triton_url
from keyreid.runtime.inputs.images import DEFAULT_MAX_FRAME_SIDE
from keyreid.runtime.serving.pipeline import DEFAULT_STALL_TIMEOUT_S
from keyreid.runtime.serving.runner import DEFAULT_MAX_BATCH_SIZE, RunnerOptions

ENGINE_HELP = ("model to run: .onnx (ONNX Runtime, or OpenVINO with --backend openvino), "
               ".plan/.engine/.trt (TensorRT), or grpc://HOST:PORT/MODEL or http://HOST:PORT/MODEL "
               "(a Triton Inference Server)")



def engine_location(text: str) -> Union[str, Path]:
    """An engine file as a Path, a Triton server address kept as the string it is."""
    return text if is_triton_url(text) else Path(text)


def _backends_taking(option: EngineOption) -> List[str]:
    return [backend.name for backend in BACKENDS if option in backend.options]


RUNNER_MAX_BATCH_HELP = ("largest batch, in clips: the most clips per engine call (default: the engine's "
                         "maximum, such as a TensorRT plan's profile or a Triton model's max_batch_size; "
                         "else %d)" % DEFAULT_MAX_BATCH_SIZE)


def add_engine_arguments(parser: argparse.ArgumentParser,
                         max_batch_help: str = RUNNER_MAX_BATCH_HELP) -> argparse._ArgumentGroup:
    """The engine options: --backend, the options every backend takes, then each option some
    backends declare (backends/declaration.py), with its help naming the backends that take it.
    ``max_batch_help`` says what --max-batch bounds in this tool (every tool's --max-batch is its
    largest batch, in clips)."""
    group = parser.add_argument_group("engine options")
    group.add_argument("--backend", action="append", choices=(AUTO,) + backend_names(), metavar="NAME",
                       help="what runs the model: " + "; ".join(f"{backend.name}: {backend.summary}"
                                                                for backend in BACKENDS)
                            + "; auto (default): the first of these that runs the model and takes every "
                              "flag given (.onnx: ONNX Runtime, or OpenVINO with --inference-precision). "
                              "compare.py takes it once for every --engine or once per --engine")
    group.add_argument("--max-batch", type=positive_int, metavar="N", help=max_batch_help)
    group.add_argument("--num-cameras", type=positive_int, metavar="C",
                       help="cameras the model knows, for the camera range check (default: the "
                            "model's metadata; a server that publishes none, such as serve_triton.py's, "
                            "needs it for any camera but -1)")
    for option in _backend_options():
        takers = _backends_taking(option)
        extra = {"action": "append", "default": []} if option.repeatable else {}
        group.add_argument(option.flag, type=option.type, choices=option.choices, metavar=option.metavar,
                           help=f"{option.help}. {' and '.join(takers)} backend{'s' if len(takers) > 1 else ''} only",
                           **extra)
    return group


def _backend_options() -> List[EngineOption]:
    """Every option some backend declares, once each, in table order."""
    return list({option.flag: option for backend in BACKENDS for option in backend.options}.values())


def add_frame_limit_argument(parser: "argparse._ActionsContainer") -> None:
    parser.add_argument("--max-frame-side", type=positive_int, default=DEFAULT_MAX_FRAME_SIDE, metavar="PX",
                        help="a frame whose JPEG/PNG header declares a wider or taller image fails its "
                             "tracklet before it is decoded; bounds memory (default: %(default)d)")


def add_runner_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("batching options")
    group.add_argument("--queue-delay-ms", type=non_negative_float, default=RunnerOptions.max_queue_delay_ms,
                       metavar="MS",
                       help="longest a clip waits for a fuller batch (default: %(default)g)")
    group.add_argument("--queue-size", type=positive_int, default=RunnerOptions.max_queue_size, metavar="N",
                       help="tracklets decoded or waiting at once; bounds memory "
                            "(default: %(default)d)")
    group.add_argument("--workers", type=positive_int, default=RunnerOptions.preprocess_workers, metavar="N",
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
    return [option.flag for option in _backend_options() if getattr(args, _dest(option.flag), None) not in (None, [])]


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
    asked = [option.keyword for option in _backend_options() if option.flag in given]
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
        if known and not any(flag in backend.flags for _, backend in known):
            takers = [backend.name for backend in BACKENDS if flag in backend.flags]
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
    for option in backend.options:
        value = getattr(args, _dest(option.flag), None)
        if value not in (None, []):
            options[option.keyword] = value
    return options


def engine_banner(engine: Engine) -> str:
    """Which backend runs the engine and in which precision, for banners."""
    return f"{engine.backend} backend, computing in {engine.compute_precision}"


def cpu_banner() -> str:
    """This machine's CPU as the inference libraries see it, for banners."""
    return f"cpu: {cpu_isa().describe()}"


def runner_options(args: argparse.Namespace) -> RunnerOptions:
    """The Runner's options from the batching flags (``Runner(engine, **options.as_kwargs())``)."""
    return RunnerOptions(max_batch_size=args.max_batch, max_queue_delay_ms=args.queue_delay_ms,
                         max_queue_size=args.queue_size, block_when_full=True,
                         block_timeout_s=args.stall_timeout, preprocess_workers=args.workers)
