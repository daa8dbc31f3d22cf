"""A cross-camera gallery of tracklet features: add, remove, search, save and load.

Each entry is a tracklet feature with its camera, a timestamp and an optional label (an
identity) and name. ``search`` returns the k nearest entries by squared Euclidean distance
(docs/contract.md §4), optionally leaving out the query's own camera (an appliance looking for the
person elsewhere) or, as the evaluation protocol does, the entries with the query's label *and*
camera. The exact NumPy backend is the default; FAISS backends (extra ``gallery``) serve large
galleries (``gallery_index``).

A gallery is saved as one ``.npz`` file, written whole (temporary file, then rename); loading
checks it completely, so a truncated file or one of another feature width is one clear error.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Literal, Optional, Sequence, Union

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.files import read_npz, write_npz
from keyreid.runtime.results.gallery_index import DEFAULT_BACKEND, make_index

PathLike = Union[str, Path]
Exclude = Literal["none", "camera", "label_and_camera"]
EXCLUDE_CHOICES = ("none", "camera", "label_and_camera")
FORMAT = "keyreid-gallery-1"
NO_LABEL = ""
# Growth when the feature buffer is full: allocate rarely, copy rarely.
GROWTH = 2
INITIAL_CAPACITY = 1024


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
