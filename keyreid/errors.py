"""The one exception the package raises for bad input; command-line tools turn it into a
one-line message and exit code 1, keeping tracebacks for real bugs."""


class KeyreidError(Exception):
    """Bad input or environment: a wrong file, a missing dependency, an out-of-range value."""
