"""Files written whole, and the checks on output paths made before a long run.

Every writer in the package (export and runtime alike) goes through ``atomic_output``: the bytes
go to a uniquely named temporary file beside the target, which is renamed over the target only
when complete. A run that fails, is interrupted (Ctrl-C, or SIGTERM, which ``keyreid.cli``
turns into an exception) or races another run writing the same path leaves the previous file or
the other run's complete file, never a truncated or mixed one, and no temporary file behind.
The temporary name starts with a dot and ends in ``.partial`` plus the target's suffix, so tools
that go by suffix (``open_engine``) read it as what it will become (git-ignores ``*.partial*``).

The installed file gets the permissions a plain ``open(path, "w")`` would give it: those of
the file it replaces, else 0666 less the umask (temporary files are created 0600).
"""
import contextlib
import io
import json
import os
import shutil
import stat
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from keyreid.errors import KeyreidError

PathLike = Union[str, Path]
PARTIAL_SUFFIX = ".partial"

_umask_lock = threading.Lock()


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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_distinct_outputs(outputs: Mapping[str, Optional[PathLike]],
                           inputs: Mapping[str, Optional[PathLike]] = {}) -> None:
    """Refuse, before any work, an output that is also an input or another output.

    ``outputs`` and ``inputs`` map what a path is (``--output``, ``the engine``) to the path;
    None entries are skipped. Paths are compared after resolving links, so ``./a`` and a
    symlink to ``a`` are the same file.
    """
    given = [(name, Path(path)) for name, path in outputs.items() if path is not None]
    for position, (name, path) in enumerate(given):
        for other_name, other in given[:position]:
            if _same_file(path, other):
                raise KeyreidError(f"{name} and {other_name} are the same file ({path}); give each its own name")
        for input_name, input_path in inputs.items():
            if input_path is not None and _same_file(path, Path(input_path)):
                raise KeyreidError(f"{name} {path} is {input_name}; writing it would destroy an input, "
                                   "choose another name")


def check_not_among(outputs: Mapping[str, Optional[PathLike]], inputs: Iterable[PathLike], what: str) -> None:
    """Refuse an output that is one of ``inputs`` (e.g. every frame of a dataset).

    Only inputs named like an output (or like the file an output links to) are resolved, so a
    million frames cost a name comparison each rather than a walk of their folders.
    """
    given = {name: Path(path) for name, path in outputs.items() if path is not None}
    names = {path.name for path in given.values()} | {path.resolve().name for path in given.values()}
    for input_path in inputs:
        input_path = Path(input_path)
        if input_path.name not in names:
            continue
        for name, path in given.items():
            if _same_file(path, input_path):
                raise KeyreidError(f"{name} {path} is one of the {what}; writing it would destroy an input, "
                                   "choose another name")


def _default_mode(path: Path) -> int:
    """Permission bits a plain write would give ``path``: kept if it exists, else 0666 & ~umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        pass
    return 0o666 & ~_current_umask()


def _current_umask() -> int:
    """The process umask: from /proc on Linux, else by setting it and back (under a lock; a
    file another thread creates in that instant could get 022)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a unique temporary path beside ``path``; install it at ``path`` when the block ends.

    Write (and check) the file at the yielded path inside the block. If the block raises,
    including KeyboardInterrupt or a SIGTERM turned into one, the temporary file is removed
    and ``path`` is untouched.
    """
    path = Path(path)
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                        suffix=PARTIAL_SUFFIX + path.suffix)
    except OSError as exc:
        raise KeyreidError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(handle)
    partial = Path(name)
    try:
        yield partial
        os.chmod(partial, _default_mode(path))
        os.replace(partial, path)
    except OSError as exc:
        raise KeyreidError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


@contextlib.contextmanager
def atomic_output_with_companions(path: PathLike, companion_suffixes: Sequence[str]) -> Iterator[Path]:
    """``atomic_output`` for a file that comes with companions of the same stem (an OpenVINO
    IR's .xml and its .bin, which ``ov.save_model`` names after the .xml).

    Yields ``path``'s name inside a unique temporary folder beside ``path``: write the file and
    its companions there. When the block ends each companion is renamed into place, then the
    file itself (so a reader that finds the new file finds its new companions), and the folder
    is removed. If the block raises, the folder and everything in it is removed and nothing at
    ``path`` or its companions changes.
    """
    path = Path(path)
    try:
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX))
    except OSError as exc:
        raise KeyreidError(f"cannot write {path}: {exc.strerror or exc}") from exc
    staged = folder / path.name
    try:
        yield staged
        for suffix in tuple(companion_suffixes) + (path.suffix,):
            target = path.with_suffix(suffix)
            if not staged.with_suffix(suffix).is_file():
                raise KeyreidError(f"cannot write {path}: {target.name} was not produced")
            os.chmod(staged.with_suffix(suffix), _default_mode(target))
            os.replace(staged.with_suffix(suffix), target)
    except OSError as exc:
        raise KeyreidError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole (unique temporary file, fsync, rename)."""
    with atomic_output(path) as partial:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def copy_file(source: PathLike, path: PathLike) -> Path:
    """Copy ``source`` to ``path`` whole, streaming (model files can be gigabytes)."""
    try:
        reader = open(source, "rb")
    except OSError as exc:
        raise KeyreidError(f"cannot read {source}: {exc.strerror or exc}") from exc
    with reader, atomic_output(path) as partial:
        with open(partial, "wb") as handle:
            shutil.copyfileobj(reader, handle, 16 << 20)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def read_npz(path: PathLike, what: str) -> Dict[str, np.ndarray]:
    """Every array of the ``.npz`` archive at ``path`` (pickles refused), or one KeyreidError that
    names ``what`` the file should have been: missing, truncated, a lone ``.npy``, not NumPy."""
    path = Path(path)
    if not path.is_file():
        raise KeyreidError(f"{what} {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise KeyreidError(f"{path} holds a single array (.npy), not the .npz archive of a {what}")
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise KeyreidError(f"{path} is not a {what}: it cannot be read as an .npz archive ({exc})") from exc


def write_npz(path: PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """An uncompressed ``.npz`` of ``arrays``, written whole (the name is kept as given)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    return write_bytes(path, buffer.getvalue())


def write_json(path: PathLike, content: Any) -> Path:
    """Indented JSON, written whole."""
    text = json.dumps(content, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return write_bytes(path, text.encode("utf-8"))
