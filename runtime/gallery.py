"""A cross-camera gallery of tracklet features: add, remove, search, save and load.

    python runtime/gallery.py build embeddings.npz [more.npz ...] --output gallery.npz
    python runtime/gallery.py search gallery.npz queries.npz [--top-k 10] [--exclude camera]
    python runtime/gallery.py build batch-out/ --output archive.lance      (an archive in LanceDB)

Each entry is a tracklet feature with its camera, a timestamp and an optional label (an
identity) and name. ``search`` returns the k nearest entries by squared Euclidean distance
(docs/contract.md §4), optionally leaving out the query's own camera (an appliance looking for the
person elsewhere) or, as the evaluation protocol does, the entries with the query's label *and*
camera. The exact NumPy backend is the default; FAISS backends (extra ``gallery``) serve large
galleries (``gallery_index``). An output or gallery that is not a ``.npz`` file is an archive gallery
in LanceDB (``archive_gallery``, extra ``archive``), for galleries beyond one process's memory.

A gallery is saved as one ``.npz`` file, written whole (temporary file, then rename); loading
checks it completely, so a truncated file or one of another feature width is one clear error.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Literal, Optional, Sequence, Union

import numpy as np

from keyreid.cli import positive_int, run_main
from keyreid.errors import KeyreidError
from keyreid.files import check_writable, read_npz, write_json, write_npz
from keyreid.runtime.gallery_index import BACKENDS, DEFAULT_BACKEND, make_index

PathLike = Union[str, Path]
Exclude = Literal["none", "camera", "label_and_camera"]
EXCLUDE_CHOICES = ("none", "camera", "label_and_camera")
FORMAT = "keyreid-gallery-1"
NO_LABEL = ""
# Growth when the feature buffer is full: allocate rarely, copy rarely.
GROWTH = 2
INITIAL_CAPACITY = 1024

# Archive galleries (archive_gallery.py): what names one, and its search defaults. Here, so that
# reading them needs neither LanceDB nor a circular import; archive_gallery reads them from here.
INDEX_MIN_ROWS = 4096              # below this an exact scan is quick, and IVF-PQ trains poorly
DEFAULT_NPROBES = 32               # IVF partitions searched per query
DEFAULT_REFINE_FACTOR = 20         # candidates re-ranked exactly: refine_factor x k
OUTPUT_CHUNK_ROWS = 512            # batch.py rows read at a time by build (ViT-B: 40 MB)


def is_archive_location(location: PathLike) -> bool:
    """True for what names an archive gallery: a URI (``s3://...``), or a path that does not end
    in .npz (a folder, existing or to be made)."""
    text = str(location)
    return "://" in text or not text.lower().endswith(".npz")


@dataclass(frozen=True)
class Match:
    entry_id: int
    distance: float            # squared Euclidean
    camera: int
    timestamp: float           # NaN when unknown
    label: str                 # "" when none
    name: str


def _label_text(value: object, what: str) -> str:
    if value is None:
        return NO_LABEL
    if not isinstance(value, (str, int, np.integer)) or isinstance(value, bool):
        raise KeyreidError(f"{what} must be a string or an integer, got {value!r}")
    return str(value)


class Gallery:
    """Tracklet features [n, dim] float32 with camera, time, label and name per entry.

    Entry ids are assigned in order of addition and never reused, so an id stays valid (and
    rows keep their order) however many entries are removed. Safe to share between threads:
    adding, removing and searching take turns.
    """

    def __init__(self, dim: int, backend: str = DEFAULT_BACKEND, *, capacity: int = INITIAL_CAPACITY,
                 **index_options):
        """
        Args:
            dim: feature length (19200 for ViT-B; the engine's ``embedding_dim``).
            backend: one of ``gallery_index.BACKENDS``; "numpy" is exact and needs no extra.
            capacity: entries to allocate room for at first (the buffer doubles when full).
            index_options: for FAISS backends: nlist, nprobe (IVF), hnsw_m, ef_search (HNSW).
        """
        if int(dim) < 1:
            raise KeyreidError(f"a gallery's feature length must be positive, got {dim}")
        self.dim = int(dim)
        self._lock = threading.RLock()
        self.use_backend(backend, **index_options)
        self._features = np.empty((max(1, capacity), self.dim), np.float32)
        self._ids = np.empty(0, np.int64)
        self._cameras = np.empty(0, np.int64)
        self._timestamps = np.empty(0, np.float64)
        self._label_codes = np.empty(0, np.int64)      # -1: no label
        self._labels: Dict[str, int] = {}
        self._label_names: List[str] = []
        self._names: List[str] = []
        self._next_id = 0

    def use_backend(self, backend: str, **index_options) -> None:
        """Search with another index from now on (built at the next search); the entries stay."""
        index = make_index(backend, **index_options)
        with self._lock:
            self._index, self.backend = index, backend

    @property
    def index_bytes(self) -> int:
        """Memory the search index holds besides the features (a FAISS index keeps a copy)."""
        return self._index.memory_bytes

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def features(self) -> np.ndarray:
        """The entries' features [n, dim], in entry order (a read-only view)."""
        view = self._features[:len(self)]
        view.flags.writeable = False
        return view

    @property
    def ids(self) -> np.ndarray:
        return self._ids.copy()

    # --- adding and removing ------------------------------------------------------------
    def _checked_features(self, features, count: Optional[int] = None) -> np.ndarray:
        array = np.asarray(features)
        if array.ndim != 2 or array.shape[1] != self.dim or array.dtype.kind not in "fiu":
            raise KeyreidError(f"features must be numbers of shape [n, {self.dim}] (this gallery's "
                               f"feature length), got {array.dtype} {list(array.shape)}")
        if count is not None and len(array) != count:
            raise KeyreidError(f"{len(array)} features but {count} cameras")
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise KeyreidError("features contain NaN or infinity; the embedding is broken")
        return array

    def add(self, feature: np.ndarray, camera: int, timestamp: Optional[float] = None,
            label: Union[str, int, None] = None, name: str = "") -> int:
        """Add one feature [dim]; returns its entry id."""
        feature = np.asarray(feature)
        if feature.ndim != 1:
            raise KeyreidError(f"a feature is one vector [{self.dim}], got shape {list(feature.shape)}")
        return int(self.add_many(feature[None, :], [camera], None if timestamp is None else [timestamp],
                                 None if label is None else [label], [name])[0])

    def add_many(self, features: np.ndarray, cameras: Sequence[int], timestamps: Optional[Sequence[float]] = None,
                 labels: Optional[Sequence[Union[str, int, None]]] = None,
                 names: Optional[Sequence[str]] = None) -> np.ndarray:
        """Add features [n, dim] with their cameras (and optional timestamps, labels, names);
        returns their entry ids. Everything is checked before anything is added."""
        cameras = np.asarray(cameras)
        if cameras.ndim != 1 or cameras.dtype.kind not in "iu":
            raise KeyreidError(f"cameras must be a list of integers, got {cameras.dtype} {list(cameras.shape)}")
        count = len(cameras)
        features = self._checked_features(features, count)
        timestamps = np.full(count, np.nan) if timestamps is None else np.asarray(timestamps, np.float64)
        labels = [None] * count if labels is None else list(labels)
        names = [""] * count if names is None else [str(name) for name in names]
        if timestamps.shape != (count,) or len(labels) != count or len(names) != count:
            raise KeyreidError(f"give one timestamp, label and name per feature ({count})")
        label_texts = [_label_text(label, "a label") for label in labels]
        with self._lock:
            return self._append(features, cameras, timestamps, label_texts, names)

    def _append(self, features: np.ndarray, cameras: np.ndarray, timestamps: np.ndarray,
                label_texts: List[str], names: List[str]) -> np.ndarray:
        count = len(features)
        start = len(self)
        self._reserve(start + count)
        self._features[start:start + count] = features
        ids = np.arange(self._next_id, self._next_id + count, dtype=np.int64)
        self._next_id += count
        self._ids = np.concatenate([self._ids, ids])
        self._cameras = np.concatenate([self._cameras, cameras.astype(np.int64)])
        self._timestamps = np.concatenate([self._timestamps, timestamps])
        self._label_codes = np.concatenate([self._label_codes, [self._label_code(text, create=True)
                                                                for text in label_texts]]).astype(np.int64)
        self._names += names
        return ids

    def _reserve(self, size: int) -> None:
        if size <= len(self._features):
            return
        grown = np.empty((max(size, GROWTH * len(self._features)), self.dim), np.float32)
        grown[:len(self)] = self._features[:len(self)]
        self._features = grown

    def _label_code(self, text: str, create: bool = False) -> int:
        if text == NO_LABEL:
            return -1
        code = self._labels.get(text)
        if code is None and create:
            code = self._labels[text] = len(self._label_names)
            self._label_names.append(text)
        return -2 if code is None else code      # -2: a label no entry has

    def _rows(self, entry_ids: Iterable[int]) -> np.ndarray:
        entry_ids = np.asarray(list(entry_ids), dtype=np.int64)
        rows = np.searchsorted(self._ids, entry_ids)
        unknown = [int(entry_id) for entry_id, row in zip(entry_ids, rows)
                   if row >= len(self._ids) or self._ids[row] != entry_id]
        if unknown:
            raise KeyreidError(f"no gallery entry with id {', '.join(map(str, unknown[:5]))}")
        return rows

    def remove(self, entry_ids: Union[int, Iterable[int]]) -> None:
        """Remove entries by id (all or none: an unknown id removes nothing)."""
        with self._lock:
            self._remove_rows(self._rows([entry_ids] if isinstance(entry_ids, (int, np.integer)) else entry_ids))

    def _remove_rows(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        keep = np.ones(len(self), bool)
        keep[rows] = False
        # Close the gaps block by block, in place: no second copy of a large gallery.
        removed = np.unique(rows)
        write = int(removed[0])
        for start, stop in zip(removed + 1, [*removed[1:], len(self)]):
            self._features[write:write + stop - start] = self._features[start:stop]
            write += stop - start
        self._ids, self._cameras = self._ids[keep], self._cameras[keep]
        self._timestamps, self._label_codes = self._timestamps[keep], self._label_codes[keep]
        self._names = [name for name, kept in zip(self._names, keep) if kept]
        self._index.invalidate()

    def entry(self, row: int, distance: float = float("nan")) -> Match:
        code = int(self._label_codes[row])
        return Match(int(self._ids[row]), float(distance), int(self._cameras[row]), float(self._timestamps[row]),
                     self._label_names[code] if code >= 0 else NO_LABEL, self._names[row])

    # --- searching ----------------------------------------------------------------------
    def _allowed(self, camera: Optional[int], label: Union[str, int, None], exclude: Exclude) -> Optional[np.ndarray]:
        if exclude not in EXCLUDE_CHOICES:
            raise KeyreidError(f"exclude must be one of {', '.join(EXCLUDE_CHOICES)}, got {exclude!r}")
        if exclude == "none":
            return None
        if camera is None:
            raise KeyreidError(f"exclude={exclude!r} needs the query's camera")
        same_camera = self._cameras == int(camera)
        if exclude == "camera":
            return ~same_camera
        code = self._label_code(_label_text(label, "the query's label"))
        if code == -1:
            raise KeyreidError("exclude='label_and_camera' needs the query's label")
        return ~(same_camera & (self._label_codes == code))

    def search_rows(self, feature: np.ndarray, k: int = 10, camera: Optional[int] = None,
                    label: Union[str, int, None] = None, exclude: Exclude = "none"):
        """(rows [<=k] int64, squared distances [<=k] float32), nearest first."""
        query = self._checked_features(np.asarray(feature).reshape(1, -1) if np.ndim(feature) == 1 else feature)
        if len(query) != 1:
            raise KeyreidError(f"search takes one feature [{self.dim}], got {len(query)}")
        if int(k) < 1:
            raise KeyreidError(f"k must be at least 1, got {k}")
        with self._lock:
            allowed = self._allowed(camera, label, exclude)
            if len(self) == 0 or (allowed is not None and not allowed.any()):
                return np.empty(0, np.int64), np.empty(0, np.float32)
            features = self._features[:len(self)]
            self._index.sync(features)
            return self._index.search(features, query[0], int(k), allowed)

    def search(self, feature: np.ndarray, k: int = 10, camera: Optional[int] = None,
               label: Union[str, int, None] = None, exclude: Exclude = "none") -> List[Match]:
        """The k entries nearest to ``feature`` [dim], nearest first.

        Args:
            camera: the query's camera (needed to exclude).
            label: the query's identity (needed for ``exclude="label_and_camera"``).
            exclude: "none"; "camera": leave out entries of the query's camera (find the person
                elsewhere); "label_and_camera": leave out entries with the query's label and
                camera, the evaluation protocol of docs/contract.md §4.
        """
        with self._lock:
            rows, distances = self.search_rows(feature, k, camera, label, exclude)
            return [self.entry(row, distance) for row, distance in zip(rows, distances)]

    # --- files --------------------------------------------------------------------------
    def save(self, path: PathLike) -> Path:
        """Write the gallery to one ``.npz`` file, whole (a temporary file, then rename)."""
        with self._lock:
            return write_npz(path, self._arrays())

    def _arrays(self) -> Dict[str, np.ndarray]:
        codes = self._label_codes
        labels = np.array([self._label_names[code] if code >= 0 else NO_LABEL for code in codes], dtype=str)
        return {
            "format": np.array(FORMAT), "features": self._features[:len(self)], "ids": self._ids,
            "cameras": self._cameras, "timestamps": self._timestamps, "labels": labels.reshape(len(self)),
            "names": np.array(self._names, dtype=str).reshape(len(self)), "next_id": np.array(self._next_id)}

    @classmethod
    def load(cls, path: PathLike, backend: str = DEFAULT_BACKEND, dim: Optional[int] = None,
             **index_options) -> "Gallery":
        """Read a gallery file; ``dim`` (if given) is the feature length the caller needs."""
        arrays = _read_gallery_file(Path(path))
        features = arrays["features"]
        if dim is not None and features.shape[1] != dim:
            raise KeyreidError(f"gallery {path} holds features of length {features.shape[1]}, "
                               f"but these features have length {dim} (another model?)")
        gallery = cls(features.shape[1], backend, capacity=len(features), **index_options)
        gallery.add_many(features, arrays["cameras"], arrays["timestamps"],
                         [label or None for label in arrays["labels"].tolist()], arrays["names"].tolist())
        gallery._ids = arrays["ids"].astype(np.int64)
        gallery._next_id = int(arrays["next_id"])
        return gallery


_FILE_ARRAYS = {"format": "U", "features": "f", "ids": "i", "cameras": "i", "timestamps": "f",
                "labels": "U", "names": "U", "next_id": "i"}


def _read_gallery_file(path: Path) -> Dict[str, np.ndarray]:
    """The checked arrays of a gallery file, or one KeyreidError saying what is wrong."""
    arrays = {name: array for name, array in read_npz(path, "gallery file").items() if name in _FILE_ARRAYS}
    missing = [name for name in _FILE_ARRAYS if name not in arrays]
    if missing or str(arrays.get("format")) != FORMAT:
        raise KeyreidError(f"{path} is not a keyreid gallery file ({FORMAT})"
                           + (f": missing {', '.join(missing)}" if missing else ""))
    problems = [f"{name} has dtype {arrays[name].dtype}" for name, kind in _FILE_ARRAYS.items()
                if arrays[name].dtype.kind not in (kind, "u" if kind == "i" else kind)]
    features = arrays["features"]
    if features.ndim != 2 or features.shape[1] < 1:
        problems.append(f"features have shape {list(features.shape)}")
    count = len(features)
    problems += [f"{name} holds {arrays[name].shape} for {count} entries"
                 for name in ("ids", "cameras", "timestamps", "labels", "names") if arrays[name].shape != (count,)]
    if not problems:
        ids = arrays["ids"]
        if (np.diff(ids) <= 0).any() or (count and int(ids[-1]) >= int(arrays["next_id"])):
            problems.append("entry ids are not increasing")
        if not np.isfinite(features).all():
            problems.append("features contain NaN or infinity")
    if problems:
        raise KeyreidError(f"gallery file {path} is damaged: {'; '.join(problems)}")
    return arrays


# ----------------------------------------------------------------------------- command line

DESCRIPTION = """\
Build a gallery of tracklet features from infer.py or batch.py outputs, and search it.

  build EMBEDDINGS [...] --output GALLERY
        every tracklet of the inputs (infer.py --output .npz files, batch.py output folders)
        becomes an entry: its feature, camera, identity (pid, when known) as label and name
  search GALLERY QUERIES [--top-k K] [--exclude camera]
        the K nearest gallery entries of every tracklet in QUERIES (an infer.py or batch.py output)

A GALLERY ending in .npz is one file, searched in memory (NumPy or FAISS). Anything else is an
archive gallery in LanceDB: a folder (or an s3://, gs://, az:// URI), searched through an IVF-PQ
index with exact re-ranking, filtered by camera and time (--cameras, --since, --until); build
adds to it (a tracklet already there is left alone) and indexes it from %d entries on.""" % INDEX_MIN_ROWS

EPILOG = """\
rows of an input (--rows):
  infer.py's evaluation modes mark queries (is_query), as batch.py --mars does (source query);
  by default build takes the gallery rows of such an output and search the query rows. Outputs
  that mark no queries are used whole.

exclusions (--exclude):
  none              every entry may match
  camera            leave out entries of the query's own camera (find the person elsewhere)
  label-and-camera  leave out entries with the query's identity and camera (the MARS protocol)

exit status: 0 done; 1 bad input (nothing written); 2 wrong usage"""


def _select_rows(arrays: Dict[str, np.ndarray], rows: str, default_rows: str, path: Path) -> Dict[str, np.ndarray]:
    """``arrays`` restricted to ``rows`` (auto: ``default_rows`` where queries are marked)."""
    if rows == "auto":
        rows = default_rows if "is_query" in arrays else "all"
    if rows == "all":
        return arrays
    if "is_query" not in arrays:
        raise KeyreidError(f"--rows {rows}: {path} does not mark queries (is_query); use --rows all")
    keep = arrays["is_query"].astype(bool) == (rows == "query")
    return {name: values[keep] for name, values in arrays.items()}


def _batch_output_arrays(columns: Dict[str, np.ndarray], marks_queries: bool) -> Dict[str, np.ndarray]:
    """batch.py's columns under infer.py's output names (and ``sources``)."""
    arrays = {"embeddings": columns["embedding"], "tracklets": np.asarray(columns["name"], dtype=str),
              "pids": columns["pid"], "cameras": columns["camera"], "sources": np.asarray(columns["source"], dtype=str)}
    if marks_queries:
        arrays["is_query"] = arrays["sources"] == "query"
    return arrays


def _input_chunks(path: Path, rows: str, default_rows: str) -> Iterator[Dict[str, np.ndarray]]:
    """The rows of one input: an infer.py .npz whole, a batch.py output folder a piece at a time."""
    if not path.is_dir():
        yield _read_embeddings(path, rows, default_rows)
        return
    from keyreid.runtime.batch_output import output_chunks, output_sources
    marks_queries = "query" in output_sources(path)
    for columns in output_chunks(path, OUTPUT_CHUNK_ROWS):
        yield _select_rows(_batch_output_arrays(columns, marks_queries), rows, default_rows, path)


def _read_embeddings(path: Path, rows: str, default_rows: str) -> Dict[str, np.ndarray]:
    """infer.py's --output arrays (or a batch.py output folder's, whole), restricted to ``rows``
    (auto: ``default_rows`` if marked)."""
    if path.is_dir():
        from keyreid.runtime.batch_output import read_output
        columns = read_output(path)
        return _select_rows(_batch_output_arrays(columns, bool((columns["source"] == "query").any())),
                            rows, default_rows, path)
    arrays = read_npz(path, "infer.py output")
    needed = ("embeddings", "tracklets", "pids", "cameras")
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise KeyreidError(f"{path} is not an infer.py output: missing {', '.join(missing)}")
    return _select_rows({name: arrays[name] for name in (*needed, "is_query") if name in arrays},
                        rows, default_rows, path)


def _labels(pids: np.ndarray) -> List[Optional[str]]:
    return [None if int(pid) < 0 else str(int(pid)) for pid in pids]


def match_json(match: Match) -> Dict[str, object]:
    """A match as JSON values (an unknown timestamp becomes null)."""
    values = asdict(match)
    values["timestamp"] = None if np.isnan(match.timestamp) else match.timestamp
    return values


def build_command(args: argparse.Namespace) -> int:
    inputs = [path.resolve() for path in args.embeddings]
    if "://" not in str(args.output) and args.output.resolve() in inputs:
        raise KeyreidError(f"--output {args.output} is one of the inputs; give another file name")
    if is_archive_location(args.output):
        return build_archive(args)
    check_writable(args.output, "--output")
    gallery = None
    for path in args.embeddings:
        for arrays in _input_chunks(path, args.rows, "gallery"):
            if gallery is None:
                gallery = Gallery(arrays["embeddings"].shape[-1], capacity=len(arrays["embeddings"]))
            elif arrays["embeddings"].shape[-1] != gallery.dim:
                raise KeyreidError(f"{path} holds features of length {arrays['embeddings'].shape[-1]}, "
                                   f"the earlier files {gallery.dim}; build one gallery per model")
            timestamps = np.full(len(arrays["embeddings"]), args.timestamp, np.float64)
            gallery.add_many(arrays["embeddings"], arrays["cameras"], timestamps, _labels(arrays["pids"]),
                             arrays["tracklets"].tolist())
    gallery.save(args.output)
    print(f"wrote {args.output}: {len(gallery)} entries of length {gallery.dim}")
    return 0


def build_archive(args: argparse.Namespace) -> int:
    """``build`` into an archive: add every input a piece at a time, then index it."""
    from keyreid.runtime.archive_gallery import ArchiveGallery
    archive, offered, added = None, 0, 0
    for path in args.embeddings:
        for arrays in _input_chunks(path, args.rows, "gallery"):
            count = len(arrays["embeddings"])
            archive = archive or ArchiveGallery(args.output, create=True, dim=arrays["embeddings"].shape[-1])
            sources = arrays.get("sources", np.full(count, path.stem))
            added += archive.add_many(arrays["embeddings"], arrays["cameras"], arrays["tracklets"].tolist(),
                                      np.full(count, args.timestamp), _labels(arrays["pids"]), sources.tolist())
            offered += count
    print(f"added {added} entries to {args.output} ({offered - added} were there already); it holds "
          f"{len(archive)} of length {archive.dim}")
    if args.no_index:
        return 0
    if archive.has_index and added:
        archive.update_index()
        print("added the new entries to its index")
    elif not archive.has_index and len(archive) >= INDEX_MIN_ROWS:
        started = time.perf_counter()
        archive.build_index()
        print(f"built its IVF-PQ index in {time.perf_counter() - started:.1f} s")
    elif not archive.has_index:
        print(f"no index below {INDEX_MIN_ROWS} entries: search scans them all, exactly")
    return 0


def search_command(args: argparse.Namespace) -> int:
    if args.output is not None:
        if args.output.resolve() in (args.gallery.resolve(), args.queries.resolve()):
            raise KeyreidError(f"--output {args.output} is one of the inputs; give another file name")
        check_writable(args.output, "--output")
    queries = _read_embeddings(args.queries, args.rows, "query")
    dim = queries["embeddings"].shape[-1]
    if is_archive_location(args.gallery):
        from keyreid.runtime.archive_gallery import ArchiveGallery
        gallery = ArchiveGallery(args.gallery, dim=dim)
        filters = {"cameras": args.cameras, "since": args.since, "until": args.until,
                   "nprobes": args.nprobes or DEFAULT_NPROBES, "refine_factor": args.refine_factor or DEFAULT_REFINE_FACTOR}
    else:
        archive_only = [flag for flag in ("--cameras", "--since", "--until", "--nprobes", "--refine-factor")
                        if getattr(args, flag[2:].replace("-", "_")) is not None]
        if archive_only:
            raise KeyreidError(f"{', '.join(archive_only)} filter an archive gallery; {args.gallery} is a .npz file")
        gallery = Gallery.load(args.gallery, args.backend, dim=dim)
        filters = {}
    exclude = args.exclude.replace("-", "_")
    results, unlabelled, started = [], [], time.perf_counter()
    for feature, name, camera, label in zip(queries["embeddings"], queries["tracklets"], queries["cameras"],
                                            _labels(queries["pids"])):
        if exclude == "label_and_camera" and label is None:
            unlabelled.append(str(name))      # the protocol cannot place it; the others go on
            continue
        matches = gallery.search(feature, args.top_k, camera=int(camera), label=label, exclude=exclude, **filters)
        results.append({"query": str(name), "camera": int(camera), "label": label or "",
                        "matches": [match_json(match) for match in matches]})
    seconds = time.perf_counter() - started
    for result in results[:args.show]:
        shown = ", ".join(f"{match['name'] or match['entry_id']} ({match['distance']:.4g})"
                          for match in result["matches"][:5])
        print(f"{result['query']} (camera {result['camera']}): {shown}")
    if len(results) > args.show:
        print(f"... and {len(results) - args.show} more queries")
    print(f"{len(results)} queries against {len(gallery)} entries ({gallery.backend}) in {seconds:.2f} s")
    if unlabelled:
        print(f"{len(unlabelled)} queries without an identity (pid -1) were not searched: --exclude "
              f"label-and-camera needs one (e.g. {unlabelled[0]})")
    if args.output is not None:
        write_json(args.output, results)
        print(f"wrote {args.output}")
    return 0


def _camera_list(text: str) -> List[int]:
    try:
        return [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected camera numbers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gallery.py", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="build|search")
    build = commands.add_parser("build", help="make a gallery file from infer.py outputs")
    build.add_argument("embeddings", type=Path, nargs="+", metavar="EMBEDDINGS",
                       help="infer.py --output .npz files or batch.py output folders")
    build.add_argument("-o", "--output", type=Path, required=True, metavar="GALLERY",
                       help="gallery file to write (.npz), or archive to add to (a folder or URI)")
    build.add_argument("--rows", choices=("auto", "all", "gallery", "query"), default="auto",
                       help="which tracklets of each file to add (default: %(default)s, see below)")
    build.add_argument("--timestamp", type=float, default=float("nan"), metavar="T",
                       help="time stamp of every entry, e.g. seconds since the epoch (default: unknown)")
    build.add_argument("--no-index", action="store_true",
                       help="archive: leave the index as it is (search scans new entries exactly)")
    build.set_defaults(run=build_command)

    search = commands.add_parser("search", help="rank a gallery for each query tracklet")
    search.add_argument("gallery", type=Path, metavar="GALLERY", help="a gallery .npz file or an archive")
    search.add_argument("queries", type=Path, metavar="QUERIES", help="an infer.py --output file or batch.py output")
    search.add_argument("-k", "--top-k", type=int, default=10, metavar="K", help="matches per query (default: %(default)s)")
    search.add_argument("--exclude", choices=("none", "camera", "label-and-camera"), default="none",
                        help="entries a query may not match (default: %(default)s, see below)")
    search.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                        help="search index; faiss-* need the extra 'gallery' (default: %(default)s)")
    search.add_argument("--rows", choices=("auto", "all", "gallery", "query"), default="auto",
                        help="which tracklets of QUERIES.npz to search with (default: %(default)s)")
    search.add_argument("-o", "--output", type=Path, metavar="RESULTS.json", help="write every query's matches")
    archive = search.add_argument_group("archive galleries only")
    archive.add_argument("--cameras", type=_camera_list, metavar="LIST",
                         help="only entries of these cameras, comma-separated (e.g. 0,2)")
    archive.add_argument("--since", type=float, metavar="T", help="only entries with a timestamp >= T")
    archive.add_argument("--until", type=float, metavar="T", help="only entries with a timestamp <= T")
    archive.add_argument("--nprobes", type=positive_int, metavar="N",
                         help=f"index partitions searched per query (default: {DEFAULT_NPROBES})")
    archive.add_argument("--refine-factor", type=positive_int, metavar="R",
                         help=f"candidates re-ranked exactly, R x K (default: {DEFAULT_REFINE_FACTOR})")
    search.add_argument("--show", type=int, default=5, metavar="N", help="queries printed (default: %(default)s)")
    search.set_defaults(run=search_command)
    for sub in (build, search):
        sub.epilog, sub.formatter_class = EPILOG, argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "search" and args.top_k < 1:
        parser.error("--top-k must be at least 1")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
