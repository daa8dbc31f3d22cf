"""Files written whole: a temporary file beside the target, then ``os.replace``; and a check that
an output can be written, made before a long run rather than after it. Export and runtime both
write through here.

A run that fails, or is interrupted, half way leaves either the previous file or none, never a
truncated one. The temporary name starts with a dot and ends in ``.partial`` (git-ignored).
"""
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np

from keyreid.errors import KeyreidError

PathLike = Union[str, Path]


def check_writable(path: PathLike, what: str = "output") -> Path:
    """Fail before a long run, not after it, when ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise KeyreidError(f"{what} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise KeyreidError(f"{what} {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise KeyreidError(f"{what} {path}: directory {path.parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise KeyreidError(f"{what} {path} exists and is not writable")
    return path


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (same-directory temporary file, then rename)."""
    path = Path(path)
    try:
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial",
                                             delete=False)
    except OSError as exc:
        raise KeyreidError(f"cannot write {path}: {exc.strerror or exc}") from exc
    partial = Path(handle.name)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError as exc:
        raise KeyreidError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if partial.exists():
            partial.unlink()
    return path


def write_npz(path: PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """An uncompressed ``.npz`` of ``arrays``, written whole (the name is kept as given)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    return write_bytes(path, buffer.getvalue())


def write_json(path: PathLike, content: Any) -> Path:
    """Indented JSON, written whole."""
    text = json.dumps(content, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return write_bytes(path, text.encode("utf-8"))
