"""Files written whole: a temporary file beside the target, then ``os.replace``; and a check that
an output can be written, made before a long run rather than after it. Export and runtime both
write through here.

A run that fails, or is interrupted, half way leaves either the previous file or none, never a
truncated one. The temporary name starts with a dot and ends in ``.partial`` (git-ignored).
"""
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Union

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Mode of the files written here: what open() would give, not tempfile's private 0600.
FILE_MODE = 0o666 & ~_umask()


def _write_whole(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a same-directory temporary file, then rename it to ``path``."""
    path = Path(path)
    try:
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial",
                                             delete=False)
    except OSError as exc:
        raise KeyreidError(f"cannot write {path}: {exc.strerror or exc}") from exc
    partial = Path(handle.name)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError as exc:
        raise KeyreidError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if partial.exists():
            partial.unlink()
    return path


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (same-directory temporary file, then rename)."""
    return _write_whole(path, lambda handle: handle.write(data))


def copy_file(source: PathLike, path: PathLike) -> Path:
    """Copy ``source`` to ``path`` atomically, streaming (model files can be gigabytes)."""
    try:
        with open(source, "rb") as reader:
            return _write_whole(path, lambda handle: shutil.copyfileobj(reader, handle, 16 << 20))
    except OSError as exc:
        raise KeyreidError(f"cannot read {source}: {exc.strerror or exc}") from exc


def write_npz(path: PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """An uncompressed ``.npz`` of ``arrays``, written whole (the name is kept as given)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    return write_bytes(path, buffer.getvalue())


def write_json(path: PathLike, content: Any) -> Path:
    """Indented JSON, written whole."""
    text = json.dumps(content, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return write_bytes(path, text.encode("utf-8"))
