"""The one exception the package raises for bad input; command-line tools turn it into a
one-line message and exit code 1, keeping tracebacks for real bugs. Its one warning category
says what works but is worse than it could be (command-line tools print it as ``warning: ...``)."""
import threading
import warnings


class KeyreidError(Exception):
    """Bad input or environment: a wrong file, a missing dependency, an out-of-range value."""


class KeyreidWarning(UserWarning):
    """Works, but worse than it could be: a file made for another CPU, a slower path taken."""


_warned: set = set()
_warned_lock = threading.Lock()


def warn_once(message: str) -> None:
    """Issue ``message`` as a KeyreidWarning the first time this process sees it, never again
    (an engine reopened per batch or per thread must not repeat itself)."""
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    warnings.warn(message, KeyreidWarning, stacklevel=3)
