"""Helpers for tests that start a child process and signal it."""
import signal


def default_signal_handling() -> None:
    """``preexec_fn`` for a child that will be sent SIGINT or SIGTERM: both at their defaults.

    A shell starts background jobs (``nohup pytest ... &``) with SIGINT ignored, children inherit
    that, and Python installs its KeyboardInterrupt handler only where SIGINT is not ignored, so
    without this the child would ignore the test's Ctrl-C and finish its work."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
