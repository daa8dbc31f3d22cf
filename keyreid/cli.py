"""What every command-line tool shares: one-line errors, exit codes, timed progress steps.

A KeyreidError (bad input) becomes ``error: <sentence>`` on stderr and exit code 1; anything
else is a bug and keeps its traceback.
"""
import logging
import sys
import time
from typing import Callable, Optional, Sequence

from keyreid.errors import KeyreidError


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    try:
        return main(argv)
    except KeyreidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class Steps:
    """Numbered, timed progress lines on stderr for the slow steps of a command."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.quiet = total, quiet
        self.index, self.started = 0, None

    def __call__(self, message: str) -> None:
        self._finish()
        self.index += 1
        self.started = time.perf_counter()
        if not self.quiet:
            print(f"[{self.index}/{self.total}] {message} ...", file=sys.stderr, flush=True)

    def _finish(self) -> None:
        if self.started is not None and not self.quiet:
            print(f"      done in {time.perf_counter() - self.started:.1f} s", file=sys.stderr, flush=True)
        self.started = None

    def done(self) -> None:
        self._finish()


def quiet_third_party_logs() -> None:
    """The exporter logs a warning per missing torchvision op; users need none of it.
    torch configures its loggers when imported, so import it (if present) before quietening."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
