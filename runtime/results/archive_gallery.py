"""An archive gallery in LanceDB: tracklet features beyond one process's memory.

    python runtime/gallery.py build batch-out/ -o archive.lance [--timestamp T]
    python runtime/gallery.py search archive.lance queries.npz [--cameras 1,2] [--since T] [--until T]

``Gallery`` keeps every feature in RAM: 19 200 floats, 77 KB an entry for ViT-B, so a million
entries is 77 GB. The archive keeps them in a LanceDB table instead, embedded (no server): a
folder on disk, or on object storage (``s3://``, ``gs://``, ``az://`` URIs, LanceDB's own). It
searches with an IVF-PQ index: product-quantised codes in the partitions nearest the query give
``refine_factor`` x k candidates, and their stored features re-rank them exactly, so the
distances returned are exact squared Euclidean distances, as ``Gallery``'s are
(docs/contract.md §4). Until an index is built (``build_index``; ``gallery.py build`` builds one
from ``INDEX_MIN_ROWS`` entries on), and for entries added after it, search is exact.
LanceDB trains and writes the index in memory: about 2.3 times the features (17.6 GiB for
100 000 ViT-B features, 7.7 GB; benchmarks/RESULTS.md section 9), which bounds the archive one
machine can index; entries added later join the index without retraining (``update_index``).

Filters run before the nearest entries are taken (LanceDB's prefilter), so a search returns k
entries that pass them whenever k do: leave out the query's camera, or its label and camera
(the evaluation protocol), keep only some cameras, or a time window.

One table, ``tracklets``: name, source, label ("" when none), camera, timestamp (NaN when
unknown) and the embedding. An entry is identified by (source, name): adding the same
batch.py output twice adds nothing the second time.

LanceDB and pyarrow come with the ``archive`` extra; they are imported when an archive is opened.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.lazy import require
from keyreid.runtime.results.batch_output import EMBEDDING_COLUMN, output_chunks
from keyreid.runtime.results.archive_settings import (DEFAULT_NPROBES, DEFAULT_REFINE_FACTOR, INDEX_MIN_ROWS,
                                                      OUTPUT_CHUNK_ROWS)
from keyreid.runtime.results.gallery_store import EXCLUDE_CHOICES, NO_LABEL, Exclude, Match

PathLike = Union[str, Path]

TABLE = "tracklets"
KEY_COLUMNS = ("source", "name")
SUB_VECTOR_WIDTH = 32              # PQ: floats per sub-vector (19200 -> 600 one-byte codes)


def _schema(dim: int):
    pa = require("pyarrow")
    return pa.schema([
        pa.field("name", pa.string(), nullable=False), pa.field("source", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False), pa.field("camera", pa.int64(), nullable=False),
        pa.field("timestamp", pa.float64(), nullable=False),
        pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32(), dim), nullable=False)])


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_number(value: float, what: str) -> str:
    if not math.isfinite(value):
        raise KeyreidError(f"{what} must be a finite number, got {value}")
    return repr(float(value))


class ArchiveGallery:
    """A LanceDB table of tracklet features, searched through an IVF-PQ index with exact re-ranking."""

    def __init__(self, location: PathLike, *, create: bool = False, dim: Optional[int] = None,
                 storage_options: Optional[Dict[str, str]] = None):
        """Open the archive at ``location`` (a folder or an object-storage URI).

        Args:
            create: make it if missing (``dim``, the feature length, is then needed).
            dim: the feature length the caller needs; a mismatch is a KeyreidError.
            storage_options: LanceDB's object-store settings (credentials, region, endpoint).
        """
        lancedb = require("lancedb")
        self.location = str(location)
        local = "://" not in self.location
        if local and Path(self.location).is_file():
            raise KeyreidError(f"archive {self.location} is a file; an archive is a folder (or an s3:// URI)")
        if local and not create and not Path(self.location).is_dir():
            raise KeyreidError(f"archive {self.location} does not exist")
        try:
            self._db = lancedb.connect(self.location, storage_options=storage_options)
            names = list(self._db.list_tables().tables)
            if TABLE in names:
                self._table = self._db.open_table(TABLE)
            elif create:
                if dim is None:
                    raise KeyreidError("a new archive needs the feature length (dim)")
                self._table = self._db.create_table(TABLE, schema=_schema(int(dim)))
            else:
                raise KeyreidError(f"{self.location} is not a keyreid archive (no table '{TABLE}')")
        except (OSError, ValueError, RuntimeError) as exc:
            raise KeyreidError(f"cannot open archive {self.location}: {exc}") from exc
        field = self._table.schema.field(EMBEDDING_COLUMN) if EMBEDDING_COLUMN in self._table.schema.names else None
        if field is None or getattr(field.type, "list_size", -1) < 1:
            raise KeyreidError(f"{self.location} is not a keyreid archive: no fixed-length '{EMBEDDING_COLUMN}'")
        self.dim = int(field.type.list_size)
        if dim is not None and int(dim) != self.dim:
            raise KeyreidError(f"archive {self.location} holds features of length {self.dim}, but these "
                               f"features have length {dim} (another model?)")

    def __len__(self) -> int:
        return int(self._table.count_rows())

    @property
    def has_index(self) -> bool:
        return any(EMBEDDING_COLUMN in index.columns for index in self._table.list_indices())

    # --- adding --------------------------------------------------------------------------------
    def add_many(self, features: np.ndarray, cameras: Sequence[int], names: Sequence[str],
                 timestamps: Optional[Sequence[float]] = None, labels: Optional[Sequence[Optional[str]]] = None,
                 sources: Optional[Sequence[str]] = None) -> int:
        """Add entries; those whose (source, name) the archive holds are left as they are.
        Returns how many were added. Everything is checked before anything is written."""
        pa = require("pyarrow")
        features = np.asarray(features)
        count = len(features)
        if features.ndim != 2 or features.shape[1] != self.dim or features.dtype.kind not in "fiu":
            raise KeyreidError(f"features must be numbers of shape [n, {self.dim}] (this archive's feature "
                               f"length), got {features.dtype} {list(features.shape)}")
        features = np.ascontiguousarray(features, dtype=np.float32)
        if not np.isfinite(features).all():
            raise KeyreidError("features contain NaN or infinity; the embedding is broken")
        columns = {
            "name": [str(name) for name in names],
            "source": [""] * count if sources is None else [str(source) for source in sources],
            "label": [NO_LABEL] * count if labels is None else [NO_LABEL if label is None else str(label)
                                                               for label in labels],
            "camera": np.asarray(cameras, dtype=np.int64),
            "timestamp": np.full(count, np.nan) if timestamps is None else np.asarray(timestamps, np.float64)}
        if any(len(values) != count for values in columns.values()):
            raise KeyreidError(f"give one camera, name, timestamp, label and source per feature ({count})")
        if any(not name for name in columns["name"]):
            raise KeyreidError("every entry needs a name")
        if not count:
            return 0
        schema = _schema(self.dim)
        arrays = [pa.array(columns[field.name], type=field.type) for field in schema if field.name != EMBEDDING_COLUMN]
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), self.dim))
        table = pa.Table.from_arrays(arrays, schema=schema)
        result = self._table.merge_insert(list(KEY_COLUMNS)).when_not_matched_insert_all().execute(table)
        return int(result.num_inserted_rows)

    def add_batch_output(self, folder: PathLike, timestamp: Optional[float] = None) -> int:
        """Add every tracklet of a batch.py output folder, part by part, ``OUTPUT_CHUNK_ROWS`` rows
        at a time (pid -> label, -1: none). Returns how many were added."""
        added = 0
        for columns in output_chunks(folder, OUTPUT_CHUNK_ROWS):
            count = len(columns["name"])
            labels = [None if int(pid) < 0 else str(int(pid)) for pid in columns["pid"]]
            added += self.add_many(columns[EMBEDDING_COLUMN], columns["camera"], columns["name"],
                                   np.full(count, np.nan if timestamp is None else timestamp), labels,
                                   columns["source"])
        return added

    # --- the index -----------------------------------------------------------------------------
    def build_index(self, num_partitions: Optional[int] = None, num_sub_vectors: Optional[int] = None,
                    sample_rate: int = 256, max_iterations: int = 50) -> None:
        """Train the IVF-PQ index over every entry (replacing an older one).

        Defaults: sqrt(n) partitions; sub-vectors of ``SUB_VECTOR_WIDTH`` floats (the feature
        length must divide by the count). Training reads ``sample_rate`` x partitions entries.
        Needs memory for about 2.3 times the features (see the module's notes).
        """
        index_module = require("lancedb.index")
        rows = len(self)
        if rows < INDEX_MIN_ROWS:
            raise KeyreidError(f"the archive holds {rows} entries; an index needs at least {INDEX_MIN_ROWS} "
                               "(below that, search scans every entry, exactly)")
        partitions = num_partitions or max(1, int(round(math.sqrt(rows))))
        sub_vectors = num_sub_vectors or max(1, self.dim // SUB_VECTOR_WIDTH)
        if self.dim % sub_vectors:
            raise KeyreidError(f"the feature length {self.dim} does not divide into {sub_vectors} sub-vectors")
        config = index_module.IvfPq(distance_type="l2", num_partitions=partitions, num_sub_vectors=sub_vectors,
                                    sample_rate=sample_rate, max_iterations=max_iterations)
        self._table.create_index(EMBEDDING_COLUMN, config=config, replace=True)

    def update_index(self) -> None:
        """Add the entries that came after the index to it (no retraining), and merge small files."""
        self._table.optimize()

    @property
    def backend(self) -> str:
        """What searches it, for messages."""
        return "lancedb ivf-pq" if self.has_index else "lancedb exact"

    # --- searching -----------------------------------------------------------------------------
    def where_clause(self, camera: Optional[int] = None, label: Union[str, int, None] = None,
                     exclude: Exclude = "none", cameras: Optional[Sequence[int]] = None,
                     since: Optional[float] = None, until: Optional[float] = None) -> Optional[str]:
        """The SQL filter for these conditions (None: no filter); the same exclusions as ``Gallery``."""
        if exclude not in EXCLUDE_CHOICES:
            raise KeyreidError(f"exclude must be one of {', '.join(EXCLUDE_CHOICES)}, got {exclude!r}")
        terms = []
        if exclude != "none":
            if camera is None:
                raise KeyreidError(f"exclude={exclude!r} needs the query's camera")
            if exclude == "camera":
                terms.append(f"camera != {int(camera)}")
            else:
                if label is None or str(label) == NO_LABEL:
                    raise KeyreidError("exclude='label_and_camera' needs the query's label")
                terms.append(f"NOT (label = {_sql_text(str(label))} AND camera = {int(camera)})")
        if cameras is not None:
            terms.append(f"camera IN ({', '.join(str(int(value)) for value in cameras) or 'NULL'})")
        if since is not None:
            terms.append(f"timestamp >= {_sql_number(since, 'since')}")
        if until is not None:
            terms.append(f"timestamp <= {_sql_number(until, 'until')}")
        return " AND ".join(terms) or None

    def search(self, feature: np.ndarray, k: int = 10, camera: Optional[int] = None,
               label: Union[str, int, None] = None, exclude: Exclude = "none",
               cameras: Optional[Sequence[int]] = None, since: Optional[float] = None,
               until: Optional[float] = None, nprobes: int = DEFAULT_NPROBES,
               refine_factor: int = DEFAULT_REFINE_FACTOR, exact: bool = False) -> List[Match]:
        """The k entries nearest to ``feature`` [dim] that pass the filters, nearest first, with
        exact squared Euclidean distances.

        Args:
            camera, label, exclude: as ``Gallery.search``.
            cameras: only entries of these cameras.
            since, until: only entries with a timestamp in [since, until] (unknown times never pass).
            nprobes: IVF partitions searched; refine_factor: candidates re-ranked, as a multiple of k.
            exact: scan every entry instead of using the index (for checking the index).
        """
        query = np.asarray(feature, dtype=np.float32).reshape(-1)
        if query.shape != (self.dim,):
            raise KeyreidError(f"search takes one feature [{self.dim}], got shape {list(np.shape(feature))}")
        if not np.isfinite(query).all():
            raise KeyreidError("the query feature contains NaN or infinity")
        if int(k) < 1:
            raise KeyreidError(f"k must be at least 1, got {k}")
        where = self.where_clause(camera, label, exclude, cameras, since, until)
        builder = (self._table.search(query, vector_column_name=EMBEDDING_COLUMN).distance_type("l2")
                   .select(["name", "source", "label", "camera", "timestamp", "_distance"]).with_row_id(True).limit(int(k)))
        if exact:
            builder = builder.bypass_vector_index()
        else:
            builder = builder.nprobes(int(nprobes)).refine_factor(int(refine_factor))
        if where is not None:
            builder = builder.where(where, prefilter=True)
        result = builder.to_arrow().to_pydict()
        return [Match(int(row_id), float(distance), int(camera_), float(timestamp), label_, name)
                for row_id, distance, camera_, timestamp, label_, name in zip(
                    result["_rowid"], result["_distance"], result["camera"], result["timestamp"],
                    result["label"], result["name"])]
