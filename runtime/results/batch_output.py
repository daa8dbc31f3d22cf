"""batch.py's output: a folder of Parquet parts, one row per embedded tracklet (docs/contract.md §4).

    OUT/part-<run>-<n>.parquet    name, source, pid, camera, frames, clips, embedding

Each part is written whole (a temporary file, then rename), so the folder only ever holds
complete parts, and the names in them are what is done: a rerun reads them and skips those
tracklets, so each tracklet is written once however often a run is killed and restarted. A
killed run loses the rows it had not yet written, never a part. A lock file keeps a second run
out of a folder that one is writing (the only writer, so the next run may remove the temporary
files a killed one left).

Every part records in its schema metadata the format, the embedding width and the engine (its
location and, for a file, its SHA-256), and a run with another engine is refused: distances
between embeddings of two models mean nothing.

pyarrow comes with the ``ray`` and ``archive`` extras; it is imported when a folder is opened.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Set, Union

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.files import PARTIAL_SUFFIX, atomic_output
from keyreid.lazy import require
from keyreid.runtime.backends.formats import OPENVINO_WEIGHTS_SUFFIX, model_kind

PathLike = Union[str, Path]

FORMAT = "keyreid-batch-1"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
LOCK_NAME = ".keyreid-batch.lock"
# Columns besides the embedding, with their Arrow types (named in pyarrow's own words).
LABEL_COLUMNS = {"name": "string", "source": "string", "pid": "int64", "camera": "int64",
                 "frames": "int32", "clips": "int32"}
EMBEDDING_COLUMN = "embedding"
_METADATA_KEYS = ("format", "embedding_dim", "engine", "engine_sha256")
_HASH_CHUNK = 16 << 20


def engine_identity(engine: Union[str, Path]) -> Dict[str, str]:
    """The engine as parts record it: its location, and for a file the SHA-256 of its bytes
    (and of an OpenVINO IR's weights file): a moved or copied file is the same engine, a
    re-exported one is not."""
    if not isinstance(engine, Path):
        return {"engine": str(engine), "engine_sha256": ""}
    digest = hashlib.sha256()
    files = [engine] + ([engine.with_suffix(OPENVINO_WEIGHTS_SUFFIX)] if model_kind(engine) == "openvino" else [])
    for path in files:
        try:
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
        except OSError as exc:
            raise KeyreidError(f"cannot read the engine {path}: {exc.strerror or exc}") from exc
    return {"engine": str(engine.resolve()), "engine_sha256": digest.hexdigest()}


def part_files(folder: PathLike) -> List[Path]:
    """The complete parts in ``folder``, by name (temporary files start with a dot)."""
    return sorted(path for path in Path(folder).glob(f"{PART_PREFIX}*{PART_SUFFIX}") if path.is_file())


def part_schema(embedding_dim: int, identity: Mapping[str, str]):
    pa = require("pyarrow")
    fields = [pa.field(name, getattr(pa, kind)(), nullable=False) for name, kind in LABEL_COLUMNS.items()]
    fields.append(pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32(), embedding_dim), nullable=False))
    metadata = {"format": FORMAT, "embedding_dim": str(embedding_dim), **identity}
    return pa.schema(fields, metadata={key: str(value) for key, value in metadata.items()})


def read_part_metadata(path: Path) -> Dict[str, str]:
    """A part's schema metadata; KeyreidError if it is not a readable part of this format."""
    parquet = require("pyarrow.parquet")
    try:
        schema = parquet.read_schema(path)
    except (OSError, ValueError) as exc:       # pyarrow's ArrowInvalid is a ValueError
        raise KeyreidError(f"{path} is not a readable Parquet file ({exc}); move it out of the folder") from exc
    metadata = {key.decode(): value.decode() for key, value in (schema.metadata or {}).items()}
    if metadata.get("format") != FORMAT or any(column not in schema.names
                                               for column in (*LABEL_COLUMNS, EMBEDDING_COLUMN)):
        raise KeyreidError(f"{path} is not a part of batch.py's output ({FORMAT})")
    return {key: metadata.get(key, "") for key in _METADATA_KEYS}


class BatchOutput:
    """The output folder of one run: what earlier runs wrote, and the parts this run adds.

    Use as a context manager: entering creates the folder, takes the lock and removes the
    temporary files a killed run left; leaving releases the lock.
    """

    def __init__(self, folder: PathLike, identity: Mapping[str, str]):
        self.folder = Path(folder)
        self.identity = dict(identity)
        self.embedding_dim: Optional[int] = None        # from the first part, earlier or written now
        self.written_rows = 0
        self.written_parts: List[Path] = []
        self._run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self._lock_handle = None

    # --- the folder and its lock -------------------------------------------------------------
    def __enter__(self) -> "BatchOutput":
        if self.folder.exists() and not self.folder.is_dir():
            raise KeyreidError(f"--output {self.folder} is a file; give a folder (it is created if missing)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_handle = open(self.folder / LOCK_NAME, "a")
        except OSError as exc:
            raise KeyreidError(f"cannot write to --output {self.folder}: {exc.strerror or exc}") from exc
        import fcntl        # POSIX only, like the rest of the Ray and Triton tooling
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_handle.close()
            raise KeyreidError(f"another batch.py run is writing {self.folder}; wait for it or "
                               "choose another --output") from None
        for stale in self.folder.glob(f".{PART_PREFIX}*{PARTIAL_SUFFIX}*"):
            with contextlib.suppress(OSError):
                stale.unlink()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()        # closing releases the lock
            self._lock_handle = None

    # --- what is done --------------------------------------------------------------------------
    def done_names(self) -> Set[str]:
        """Names of the tracklets earlier runs wrote; refuses parts of another engine."""
        parquet = require("pyarrow.parquet")
        names: Set[str] = set()
        for path in part_files(self.folder):
            metadata = read_part_metadata(path)
            self._check_same_engine(path, metadata)
            self.embedding_dim = self.embedding_dim or int(metadata["embedding_dim"])
            if int(metadata["embedding_dim"]) != self.embedding_dim:
                raise KeyreidError(f"{path} holds embeddings of length {metadata['embedding_dim']}, other "
                                   f"parts {self.embedding_dim}; the folder mixes models")
            names.update(parquet.read_table(path, columns=["name"]).column("name").to_pylist())
        return names

    def _check_same_engine(self, path: Path, metadata: Mapping[str, str]) -> None:
        ours, theirs = self.identity, metadata
        same = (ours["engine_sha256"] == theirs["engine_sha256"] if ours["engine_sha256"]
                else ours["engine"] == theirs["engine"])
        if not same:
            raise KeyreidError(f"{self.folder} holds embeddings of another engine ({theirs['engine']}, "
                               f"e.g. {path.name}); give this engine its own --output folder")

    # --- writing -------------------------------------------------------------------------------
    def write_part(self, columns: Mapping[str, np.ndarray]) -> Path:
        """Write one part whole from ``columns`` (the label columns and ``embedding`` [n, E])."""
        pa = require("pyarrow")
        parquet = require("pyarrow.parquet")
        embeddings = np.ascontiguousarray(columns[EMBEDDING_COLUMN], dtype=np.float32)
        width = embeddings.shape[1]
        if self.embedding_dim not in (None, width):
            raise KeyreidError(f"the engine returned embeddings of length {width}, but {self.folder} "
                               f"holds length {self.embedding_dim}")
        self.embedding_dim = width
        schema = part_schema(width, self.identity)
        arrays = [pa.array(np.asarray(columns[name]).tolist(), type=schema.field(name).type)
                  for name in LABEL_COLUMNS]
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), width))
        table = pa.Table.from_arrays(arrays, schema=schema)
        path = self.folder / f"{PART_PREFIX}{self._run}-{len(self.written_parts):05d}{PART_SUFFIX}"
        with atomic_output(path) as partial:
            with open(partial, "wb") as handle:
                # Embeddings are noise to a dictionary encoder; the labels are small either way.
                parquet.write_table(table, handle, use_dictionary=["name", "source"])
                handle.flush()
                os.fsync(handle.fileno())
        self.written_parts.append(path)
        self.written_rows += len(table)
        return path


def read_output(folder: PathLike, columns: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
    """Every part of an output folder as NumPy columns (``embedding`` as [n, E] float32), in
    part order. For tests and small outputs; the archive gallery streams the parts instead."""
    parquet = require("pyarrow.parquet")
    paths = part_files(folder)
    if not paths:
        raise KeyreidError(f"{folder} holds no {PART_PREFIX}*{PART_SUFFIX} files of batch.py")
    tables = [parquet.read_table(path, columns=columns) for path in paths]
    result: Dict[str, np.ndarray] = {}
    for name in tables[0].column_names:
        if name == EMBEDDING_COLUMN:
            width = tables[0].schema.field(name).type.list_size
            result[name] = np.concatenate([table.column(name).combine_chunks().flatten().to_numpy()
                                           .reshape(-1, width) for table in tables]).astype(np.float32)
        else:
            result[name] = np.concatenate([table.column(name).to_numpy() for table in tables])
    return result


def output_sources(folder: PathLike) -> Set[str]:
    """The values of an output folder's ``source`` column (query and gallery for MARS)."""
    parquet = require("pyarrow.parquet")
    return {source for path in part_files(folder)
            for source in parquet.read_table(path, columns=["source"]).column("source").to_pylist()}


def output_chunks(folder: PathLike, rows_per_chunk: int) -> Iterator[Dict[str, np.ndarray]]:
    """An output folder's rows, part by part, at most ``rows_per_chunk`` at a time, as NumPy
    columns (``embedding`` [n, E] float32): what reads a large output without holding it whole."""
    parquet = require("pyarrow.parquet")
    parts = part_files(folder)
    if not parts:
        raise KeyreidError(f"{folder} holds no {PART_PREFIX}*{PART_SUFFIX} files of batch.py")
    for path in parts:
        width = int(read_part_metadata(path)["embedding_dim"])
        for batch in parquet.ParquetFile(path).iter_batches(batch_size=rows_per_chunk):
            columns = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in LABEL_COLUMNS}
            columns[EMBEDDING_COLUMN] = batch.column(EMBEDDING_COLUMN).flatten().to_numpy().reshape(-1, width)
            yield columns
