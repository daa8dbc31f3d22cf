"""Nearest-neighbour search for the gallery: one interface, an exact NumPy index and FAISS ones.

Every index answers "the k rows nearest to this query by squared Euclidean distance (docs/contract.md
§4), among the allowed rows". The gallery owns the features; an index only mirrors
them: ``sync(features)`` hands it the gallery's rows (it adds the ones it has not seen), and
``invalidate()`` says rows were removed (it rebuilds on the next sync).

- ``numpy``: exact. Distances as ``evaluation.squared_euclidean_distances`` computes them
  (``||q||^2 + ||g||^2 - 2 q.g`` in float32) and ties broken by gallery order, as its stable
  sort does, so rankings are the evaluation's.
- ``faiss-flat``: exact, FAISS ``IndexFlatL2``; the same top-k as NumPy (distances agree to
  float32 rounding, so only exact ties may swap).
- ``faiss-ivf``: approximate, ``IndexIVFFlat`` (``nlist`` k-means cells, ``nprobe`` searched).
- ``faiss-hnsw``: approximate, ``IndexHNSWFlat`` (graph of ``hnsw_m`` links, ``ef_search``).

FAISS is the optional extra ``gallery`` (``faiss-cpu``), imported when a FAISS index is built.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.lazy import require

BACKENDS = ("numpy", "faiss-flat", "faiss-ivf", "faiss-hnsw")
DEFAULT_BACKEND = "numpy"
# IVF trains k-means on 39 to 64 points per cell (FAISS warns below 39, and gains little above).
IVF_MIN_POINTS_PER_CELL = 39
IVF_TRAINING_POINTS_PER_CELL = 64

Hits = Tuple[np.ndarray, np.ndarray]    # rows [k] int64, squared distances [k] float32


def nearest(distances: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k smallest ``distances``, nearest first, ties in position order (what a
    stable argsort gives, without sorting everything)."""
    if k >= distances.size:
        return np.argsort(distances, kind="stable")
    threshold = np.partition(distances, k - 1)[k - 1]
    candidates = np.flatnonzero(distances <= threshold)
    return candidates[np.lexsort((candidates, distances[candidates]))][:k]


class NumpyIndex:
    """Exact search in NumPy; keeps the squared norms of the gallery rows."""

    name = "numpy"
    exact = True

    def __init__(self):
        self._norms = np.zeros(0, np.float32)

    def invalidate(self) -> None:
        self._norms = np.zeros(0, np.float32)

    @property
    def memory_bytes(self) -> int:
        """Memory the index holds besides the gallery's features."""
        return self._norms.nbytes

    def sync(self, features: np.ndarray) -> None:
        have = len(self._norms)
        if have < len(features):
            added = features[have:]
            self._norms = np.concatenate([self._norms, np.einsum("nd,nd->n", added, added)])

    def search(self, features: np.ndarray, query: np.ndarray, k: int, allowed: Optional[np.ndarray]) -> Hits:
        distances = features @ query
        distances *= -2
        distances += np.dot(query, query)
        distances += self._norms
        rows = np.arange(len(features)) if allowed is None else np.flatnonzero(allowed)
        if allowed is not None:
            distances = distances[rows]
        order = nearest(distances, k)
        return rows[order], distances[order]


class FaissIndex:
    """A FAISS index mirroring the gallery's rows; positions in the index are gallery rows."""

    def __init__(self, name: str, nlist: Optional[int] = None, nprobe: int = 16, hnsw_m: int = 32,
                 ef_search: int = 128):
        self.name = name
        self.exact = name == "faiss-flat"
        self.nlist, self.nprobe, self.hnsw_m, self.ef_search = nlist, nprobe, hnsw_m, ef_search
        self._faiss = require("faiss")
        self._index = None
        self._bitmap = None     # the allowed rows of the current search, read by FAISS's selector

    def invalidate(self) -> None:
        self._index = None

    @property
    def memory_bytes(self) -> int:
        """Memory the index holds (its own copy of the features, cells or graph links)."""
        index = self._index
        if index is None:
            return 0
        vectors = index.ntotal * index.d * 4
        if self.name == "faiss-ivf":
            return vectors + index.ntotal * 8 + index.nlist * index.d * 4       # + ids, centroids
        if self.name == "faiss-hnsw":
            graph = index.hnsw
            return vectors + graph.neighbors.size() * 4 + graph.levels.size() * 4 + graph.offsets.size() * 8
        return vectors

    def _build(self, features: np.ndarray):
        faiss, dim = self._faiss, features.shape[1]
        if self.name == "faiss-flat":
            return faiss.IndexFlatL2(dim)
        if self.name == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m)
            index.hnsw.efSearch = self.ef_search
            return index
        # IVF: cells from k-means on a sample of the current rows (at least one row per cell).
        nlist = self.nlist or max(1, min(int(4 * np.sqrt(len(features))), len(features) // IVF_MIN_POINTS_PER_CELL))
        nlist = min(nlist, len(features))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        sample = features
        limit = IVF_TRAINING_POINTS_PER_CELL * nlist
        if len(features) > limit:
            sample = features[np.random.default_rng(0).choice(len(features), limit, replace=False)]
        index.train(np.ascontiguousarray(sample))
        index.nprobe = min(self.nprobe, nlist)
        return index

    def sync(self, features: np.ndarray) -> None:
        if len(features) == 0:
            self._index = None
            return
        if self._index is None:
            self._index = self._build(features)
        have = self._index.ntotal
        if have < len(features):
            self._index.add(np.ascontiguousarray(features[have:]))

    def _parameters(self, allowed: Optional[np.ndarray]):
        faiss = self._faiss
        options = {}
        if allowed is not None:
            self._bitmap = np.packbits(allowed, bitorder="little")
            options["sel"] = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(self._bitmap))
        if self.name == "faiss-ivf":
            return faiss.SearchParametersIVF(nprobe=self._index.nprobe, **options)
        if self.name == "faiss-hnsw":
            return faiss.SearchParametersHNSW(efSearch=self.ef_search, **options)
        return faiss.SearchParameters(**options) if options else None

    def search(self, features: np.ndarray, query: np.ndarray, k: int, allowed: Optional[np.ndarray]) -> Hits:
        k = min(k, len(features))
        distances, rows = self._index.search(query[None, :], k, params=self._parameters(allowed))
        found = rows[0] >= 0        # -1: fewer allowed rows than k
        return rows[0][found].astype(np.int64), distances[0][found].astype(np.float32)


def make_index(backend: str, **options):
    """The index for ``backend`` (one of BACKENDS); options go to FAISS indexes."""
    if backend == "numpy":
        return NumpyIndex()
    if backend in BACKENDS:
        return FaissIndex(backend, **options)
    raise KeyreidError(f"unknown gallery backend {backend!r}; choose one of {', '.join(BACKENDS)}")
