"""Serve a local keyreid engine through Triton Inference Server, without a container.

    python runtime/serve_triton.py --engine model.onnx [--name keyreid] [--grpc-port 8001]
                                   [--http-port 8000] [--max-batch 8] [--max-queue-delay-us 2000]

PyTriton (the ``nvidia-pytriton`` wheel, extra ``triton-server``) bundles the ``tritonserver``
binary with its Python backend only. Here that server runs the keyreid engine in this process
through PyTriton's Python binding: the server does the protocol (gRPC and HTTP/REST, KServe v2)
and the dynamic batching of requests from many clients, and hands each batch to the engine.
Clients reach it exactly as they reach a Triton container serving the repository that
``export/to_triton.py`` writes: ``infer.py --engine grpc://HOST:8001/keyreid``. PyTriton publishes
no model parameters, so clients of this server do not learn the camera count from it: they
give ``--num-cameras C`` (or use camera -1), as for any engine that does not record it.

The bundled server supports Linux x86_64 and aarch64 with glibc 2.35 or newer and CPython
3.8-3.13. Its Python backend links against ``libpython3.X.so``; the server is started with this
interpreter's own library directory first on the library path, so a shared-library CPython that
is not the system's (pyenv, a venv on another Python) still works.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from keyreid.cli import positive_int, program_name, run_main
from keyreid.errors import KeyreidError
from keyreid.lazy import require
from keyreid.runtime.cli_args import add_engine_arguments, check_engine_arguments, engine_options
from keyreid.runtime.backends import Engine, open_engine
from keyreid.triton import (DEFAULT_MAX_BATCH, DEFAULT_MODEL_NAME, DEFAULT_PORTS, DEFAULT_QUEUE_DELAY_US,
                            preferred_batch_sizes, wire_dims)

EXIT_TIMEOUT_S = 5          # longest the server waits for in-flight requests when stopping
MAX_LOG_LINES_SHOWN = 8     # of the server's log, on a failed start


def check_port_free(host: str, port: int, flag: str) -> None:
    """A port another process listens on, as one error naming the flag, at once: the bundled
    server would otherwise log the clash, wait a minute for readiness and only then fail."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise KeyreidError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                               f"choose another {flag}") from exc


def _relevant_log_lines(log_file: Path) -> list:
    """The lines of the server's log that say why it failed: its error (E) lines, else its last
    lines. The log is a glog stream: a severity letter, a timestamp, the source, the message."""
    try:
        lines = [line.rstrip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []
    errors = [line for line in lines if line.startswith("E")]
    return (errors or lines)[-MAX_LOG_LINES_SHOWN:]

# The token that unlocks the server's administrative endpoints (statistics, repository, logging);
# read from the environment, where other users of the machine cannot read it (a command line is
# visible to them). Unset: a random token nobody is told, which keeps them locked.
ACCESS_TOKEN_VARIABLE = "KEYREID_TRITON_ACCESS_TOKEN"


@contextlib.contextmanager
def _python_library_first() -> Iterator[None]:
    """Put this interpreter's libpython directory first on LD_LIBRARY_PATH while the server starts
    (it inherits the environment), so the backend stub loads the matching libpython."""
    library_dir = sysconfig.get_config_var("LIBDIR")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not library_dir:
        yield
        return
    previous = os.environ.get("LD_LIBRARY_PATH")
    os.environ["LD_LIBRARY_PATH"] = library_dir + (os.pathsep + previous if previous else "")
    try:
        yield
    finally:
        if previous is None:
            del os.environ["LD_LIBRARY_PATH"]
        else:
            os.environ["LD_LIBRARY_PATH"] = previous


@contextlib.contextmanager
def triton_server(engine: Engine, *, name: str = DEFAULT_MODEL_NAME, host: str = "127.0.0.1",
                  grpc_port: int = DEFAULT_PORTS["grpc"], http_port: int = DEFAULT_PORTS["http"],
                  max_batch: int = DEFAULT_MAX_BATCH, max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                  workspace: Optional[Path] = None, access_token: Optional[str] = None,
                  verbose: bool = False) -> Iterator[object]:
    """Run a Triton server for the active ``engine`` while the with-block lasts; stop it after.

    Args:
        engine: an active engine (any backend); the server calls its ``infer`` with each batch.
        name: the model's name on the server (the last part of ``grpc://HOST:PORT/NAME``).
        host: the address the server listens on; the default serves this machine only.
        grpc_port, http_port: the ports (the metrics endpoint is switched off).
        max_batch: the model's ``max_batch_size``: most clips the server puts in one batch.
        max_queue_delay_us: longest a request waits on the server for a fuller batch.
        workspace: PyTriton's folder for sockets and the generated model store (default: a
            temporary folder it removes); it must not exist yet.
        access_token: the token that unlocks the server's administrative endpoints (statistics,
            model repository, logging), sent as the ``triton-access-token`` header; default a
            random one that nobody is told, which keeps them locked.
        verbose: pass the server's own log through; otherwise it goes to a temporary file, and
            a failed start quotes its error lines.

    Yields PyTriton's ``Triton`` object.
    """
    pytriton = require("pytriton.triton")
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    if engine.max_batch is not None and max_batch > engine.max_batch:
        raise KeyreidError(f"max_batch {max_batch} is above the engine's maximum of {engine.max_batch}")

    @batch
    def infer(**feed: np.ndarray) -> dict:
        return engine.infer({spec.name: feed[spec.name].reshape((len(feed[spec.name]),) + spec.shape[1:])
                             for spec in engine.input_specs})

    def tensors(specs) -> list:
        return [Tensor(name=spec.name, dtype=spec.dtype.type, shape=wire_dims(spec.shape)) for spec in specs]

    with contextlib.ExitStack() as cleanup:
        # Without verbose the server's log (dozens of lines, CUDA complaints on a CPU machine
        # among them) goes to a file that lives as long as the server; a failed start quotes it.
        log_file = None if verbose else \
            Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="keyreid-triton-"))) / "tritonserver.log"
        config = pytriton.TritonConfig(
            http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
            allow_metrics=False, log_verbose=1 if verbose else 0, log_file=log_file, exit_on_error=True,
            exit_timeout_secs=EXIT_TIMEOUT_S)
        model_config = ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(
            max_queue_delay_microseconds=max_queue_delay_us, preferred_batch_size=preferred_batch_sizes(max_batch)))
        security = pytriton.TritonSecurityConfig(access_token=access_token)
        server = pytriton.Triton(config=config, workspace=workspace, security_config=security)
        try:
            server.bind(model_name=name, infer_func=infer, inputs=tensors(engine.input_specs),
                        outputs=tensors(engine.output_specs), config=model_config, strict=True)
            with _python_library_first():
                server.run()
        except Exception as exc:
            # A server that failed half way can fail to stop too (it may have reached another
            # server on the same port); the start's failure is the one to report.
            with contextlib.suppress(Exception):
                server.stop()
            if isinstance(exc, KeyreidError):
                raise
            # PyTriton raises its own types, with the server's log in the message
            quoted = _relevant_log_lines(log_file) if log_file is not None else []
            raise KeyreidError(f"the Triton server did not start: {str(exc).strip().splitlines()[0]}"
                               + "".join(f"\n  server log: {line}" for line in quoted)
                               + ("\n  (-v shows the whole log)" if quoted else "")) from exc
        try:
            yield server
        finally:
            server.stop()                   # before its log folder goes


DESCRIPTION = """\
Serve a keyreid engine file through Triton Inference Server (the tritonserver that the
nvidia-pytriton wheel bundles), over gRPC and HTTP/REST, with dynamic batching on the server.
The engine runs in this process; clients connect as to any Triton server:
  python runtime/infer.py --engine grpc://HOST:GRPC_PORT/NAME --tracklets DIR --output OUT.npz
For a Triton container, write a model repository with export/to_triton.py instead."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("serve_triton.py"), formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
        epilog=f"Ctrl-C or SIGTERM stops the server, after the requests in flight (at most 5 s).\n"
               f"The environment variable {ACCESS_TOKEN_VARIABLE}, if set, is the token that unlocks the "
               "server's\nadministrative endpoints (statistics, model repository, logging); unset, they stay locked.\n\n"
               "exit status: 0 stopped; 1 bad input (engine file, a port in use, a server that did not\n"
               "start); 2 wrong command-line usage.")
    parser.add_argument("--engine", type=Path, required=True, metavar="FILE",
                        help="the model to serve: .onnx or .plan/.engine/.trt")
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME, help="model name on the server (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 serves other machines (default: %(default)s)")
    parser.add_argument("--grpc-port", type=positive_int, default=DEFAULT_PORTS["grpc"], metavar="PORT",
                        help="gRPC port (default: %(default)s)")
    parser.add_argument("--http-port", type=positive_int, default=DEFAULT_PORTS["http"], metavar="PORT",
                        help="HTTP/REST port (default: %(default)s)")
    parser.add_argument("--max-queue-delay-us", type=positive_int, default=DEFAULT_QUEUE_DELAY_US, metavar="US",
                        help="longest a request waits for a fuller batch (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the server's log (without -v: a status line, and on a failed start "
                             "the log's error lines)")
    add_engine_arguments(parser, max_batch_help=(
        "largest batch, in clips: the served model's max_batch_size, the most clips the server puts "
        f"in one batch (default: the engine's maximum, else {DEFAULT_MAX_BATCH})"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_engine_arguments(parser, args, [args.engine])
    if args.grpc_port == args.http_port:
        parser.error(f"--grpc-port and --http-port are both {args.grpc_port}; give two ports")
    for flag, port in (("--grpc-port", args.grpc_port), ("--http-port", args.http_port)):
        check_port_free(args.host, port, flag)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with open_engine(args.engine, **engine_options(args, args.engine)) as engine:
        max_batch = args.max_batch or engine.max_batch or DEFAULT_MAX_BATCH
        print(f"starting the Triton server ({'its log follows' if args.verbose else '-v shows its log'})",
              file=sys.stderr, flush=True)
        with triton_server(engine, name=args.name, host=args.host, grpc_port=args.grpc_port,
                           http_port=args.http_port, max_batch=max_batch,
                           max_queue_delay_us=args.max_queue_delay_us, verbose=args.verbose,
                           access_token=os.environ.get(ACCESS_TOKEN_VARIABLE) or None):
            print(f"serving {args.engine} as grpc://{args.host}:{args.grpc_port}/{args.name} and "
                  f"http://{args.host}:{args.http_port}/{args.name} (max batch {max_batch}); Ctrl-C stops",
                  file=sys.stderr, flush=True)
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
