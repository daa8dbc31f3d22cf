"""The Triton server's own Python environment, and a server started from it, for the tests and
benchmarks that talk to a real ``tritonserver``.

Why its own: PyTriton (``nvidia-pytriton``, extra ``[triton-server]``), whose wheel bundles the
CPU-capable tritonserver, pins numpy < 2 and with it older OpenCV and protobuf, while the test
environment runs numpy 2 (Ray, LanceDB). So the server side lives in a virtual environment made
from keyreid's base requirements and the ``[triton-server]`` extra, as the installed package's
metadata lists them, under ``$KEYREID_CACHE`` (default ``~/.cache/keyreid``) in
``triton-server-<hash>``, the hash taken over those requirements, the Python version and the
machine. It is made once (about a minute and 600 MB; a lock keeps two sessions from making it
together) and reused by later runs, offline too; a changed extra makes a new one. The client side,
``tritonclient``, stays in the test environment.

keyreid itself is not installed there: each session copies this checkout's package into a
folder of its own (``pip install --no-deps --target``, about 2 s) that the server process gets on
``PYTHONPATH``, so the server runs the code under test and two checkouts never share an install.

The server is ``python -m keyreid.runtime.serve_triton`` in that environment, a subprocess on
127.0.0.1 with free ports, stopped (SIGTERM, then SIGKILL) when the with-block ends.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

from packaging.requirements import Requirement

from keyreid.runtime.serve_triton import ACCESS_TOKEN_VARIABLE

REPO = Path(__file__).resolve().parent.parent
EXTRA = "triton-server"
COMPLETE_MARKER = ".keyreid-complete"       # written last: a folder without it is half-made
INSTALL_TIMEOUT_S = 1200
READY_TIMEOUT_S = 180                        # the server's start, its Python backend included
STOP_TIMEOUT_S = 30
READY_LINE = "serving "                      # what serve_triton.py prints once the server is up


class ServerEnvironmentError(RuntimeError):
    """The environment could not be made (offline without a cached one, a failed install)."""


def cache_folder() -> Path:
    return Path(os.environ.get("KEYREID_CACHE", Path.home() / ".cache" / "keyreid"))


def server_requirements() -> List[str]:
    """keyreid's base requirements and those of the extra, for this platform, as pip takes them."""
    requirements = []
    for text in importlib.metadata.requires("keyreid") or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": EXTRA}):
            continue
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        requirements.append(f"{requirement.name}{extras}{requirement.specifier}")
    if not any(Requirement(text).name == "nvidia-pytriton" for text in requirements):
        raise ServerEnvironmentError(f"the [{EXTRA}] extra has no PyTriton on {platform.system()} "
                                     f"{platform.machine()}; its tritonserver needs Linux x86_64 or aarch64")
    return sorted(requirements)


def environment_folder(requirements: List[str]) -> Path:
    key = "\n".join([*requirements, f"python {sys.version_info[0]}.{sys.version_info[1]}", platform.machine()])
    return cache_folder() / f"{EXTRA}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _run(command: List[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if result.returncode != 0:
        raise ServerEnvironmentError(f"{what} failed ({' '.join(command[:6])} ...): {result.stderr.strip()[-2000:]}")


def server_python() -> Path:
    """The Python of the server's environment, made first if this machine has none yet."""
    requirements = server_requirements()
    folder = environment_folder(requirements)
    python = folder / "bin" / "python"
    if (folder / COMPLETE_MARKER).is_file():
        return python
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)           # another session may be making it right now
        if (folder / COMPLETE_MARKER).is_file():
            return python
        shutil.rmtree(folder, ignore_errors=True)   # a half-made one from a run that was killed
        try:
            # The base interpreter, not this virtual environment's (venv resolves it itself).
            _run([sys.executable, "-m", "venv", str(folder)], "making the virtual environment")
            _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
                 f"installing the [{EXTRA}] requirements")
        except (ServerEnvironmentError, subprocess.TimeoutExpired):
            shutil.rmtree(folder, ignore_errors=True)
            raise
        (folder / COMPLETE_MARKER).write_text("\n".join(requirements) + "\n")
    return python


def keyreid_copy(target: Path) -> Path:
    """This checkout's keyreid package installed into ``target`` (no dependencies, offline)."""
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
          "--no-build-isolation", "--no-index", "--target", str(target), str(REPO)], "copying keyreid")
    return target


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def triton_server_process(python: Path, keyreid_path: Path, engine: Path, log: Path, *, max_batch: int,
                          max_queue_delay_us: int, access_token: Optional[str] = None,
                          extra_args: tuple = ()) -> Iterator[dict]:
    """``serve_triton.py`` serving ``engine`` from the server's environment, on 127.0.0.1.

    Yields the addresses: ``grpc`` and ``http`` engine URLs, ``grpc_server`` (host:port) and
    ``http_server``. The server's output goes to ``log``, quoted when it does not come up.
    """
    grpc_port, http_port = free_port(), free_port()
    command = [str(python), "-m", "keyreid.runtime.serve_triton", "--engine", str(engine),
               "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--max-batch", str(max_batch),
               "--max-queue-delay-us", str(max_queue_delay_us), *extra_args]
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(keyreid_path)
    if access_token is not None:
        env[ACCESS_TOKEN_VARIABLE] = access_token
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while READY_LINE not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {process.returncode}" if process.returncode is not None else "timed out"
                raise ServerEnvironmentError(f"the Triton server {state}; its log:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)
        yield {"grpc": f"grpc://127.0.0.1:{grpc_port}/keyreid", "http": f"http://127.0.0.1:{http_port}/keyreid",
               "grpc_server": f"127.0.0.1:{grpc_port}", "http_server": f"127.0.0.1:{http_port}"}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
