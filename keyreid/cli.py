"""What every command-line tool shares: one-line errors, exit codes, timed progress steps,
argument types.

A KeyreidError (bad input) becomes ``error: <sentence>`` on stderr and exit code 1; anything
else is a bug and keeps its traceback. SIGTERM is handled like Ctrl-C: it raises ``Terminated``
(a KeyboardInterrupt) in the main thread, so ``finally`` blocks and context managers run (a
Runner cancels its queued clips, a half-written file is removed) before the exit.
"""
import argparse
import signal
import sys
import threading
import time
import warnings
from typing import Callable, Optional, Sequence

from keyreid.errors import KeyreidError, KeyreidWarning


# How the running tool was invoked, for its usage line: its script name, or ``keyreid SUBCOMMAND``
# when the ``keyreid`` command (keyreid/command.py) runs it.
_invoked_as: Optional[str] = None


def program_name(script: str) -> str:
    """The name a tool's ``--help`` and usage errors show: ``keyreid export`` when it runs as a
    subcommand of ``keyreid``, else its ``script`` name (``to_onnx.py``)."""
    return _invoked_as or script


def run_as(name: str, main: Callable[[Optional[Sequence[str]]], int], argv: Sequence[str]) -> int:
    """Run a tool's ``main`` as ``name`` (``keyreid export``), through ``run_main``."""
    global _invoked_as
    previous, _invoked_as = _invoked_as, name
    try:
        return run_main(main, list(argv))
    finally:
        _invoked_as = previous


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; unwinds like Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _one_line_warnings(show_other):
    """``warnings.showwarning`` that prints a KeyreidWarning as one ``warning: ...`` line."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, KeyreidWarning):
            print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            show_other(message, category, filename, lineno, file, line)
    return show


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a CLI's ``main``: one-line errors, exit 1; interrupted, exit 130 (SIGINT) or 143 (SIGTERM);
    KeyreidWarnings as one-line ``warning:`` messages."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    show_warning = warnings.showwarning
    warnings.showwarning = _one_line_warnings(show_warning)
    try:
        return main(argv)
    except KeyreidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        warnings.showwarning = show_warning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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


# --- argument types every command-line tool shares (argparse ``type=``) -------------------------
def _whole_number(text: str, minimum: int, rule: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{rule}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1, "must be at least 1")


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0, "must not be negative")


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, not negative, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return value
