"""Re-identification metrics as the MARS protocol and upstream's ``evaluation.py`` define them.

Distance is squared Euclidean on the raw (un-normalised) tracklet features. For each query the
gallery is ranked by distance; entries with the query's identity *and* camera are dropped
(the same person seen by the same camera is not a re-identification); a query with no true
match left is skipped and counted. CMC at rank k is the fraction of evaluated queries whose first
true match is within the top k; AP is the mean precision at each true match.

Ties are broken by gallery order (a stable sort), so results do not depend on the sort
algorithm; upstream's ``np.argsort`` default is not stable, which only matters for exact ties.
"""
from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np

from keyreid.errors import KeyreidError

DEFAULT_RANKS = (1, 5, 10, 20)


def squared_euclidean_distances(query_features: np.ndarray, gallery_features: np.ndarray,
                                block_rows: int = 512) -> np.ndarray:
    """``||q||^2 + ||g||^2 - 2 q.g`` for every pair: [m, n], float32 (float64 for float64 input).

    Upstream's formula, in blocks of query rows so that a few thousand 19200-d features need
    only the [m, n] result and one [block_rows, n] temporary. Values are not clamped at zero:
    rounding can make a near-duplicate's distance slightly negative, as upstream's can.
    """
    query_features, gallery_features = np.asarray(query_features), np.asarray(gallery_features)
    if query_features.ndim != 2 or gallery_features.ndim != 2 \
            or query_features.shape[1] != gallery_features.shape[1]:
        raise KeyreidError(f"features must be [m, d] and [n, d], got {query_features.shape} "
                           f"and {gallery_features.shape}")
    dtype = np.result_type(query_features.dtype, gallery_features.dtype, np.float32)
    gallery = gallery_features.astype(dtype, copy=False)
    gallery_norms = np.einsum("nd,nd->n", gallery, gallery)
    distances = np.empty((len(query_features), len(gallery)), dtype=dtype)
    for start in range(0, len(query_features), block_rows):
        query = query_features[start:start + block_rows].astype(dtype, copy=False)
        block = distances[start:start + len(query)]
        np.matmul(query, gallery.T, out=block)
        block *= -2
        block += np.einsum("md,md->m", query, query)[:, None]
        block += gallery_norms[None, :]
    return distances


@dataclass(frozen=True)
class RankingResult:
    cmc: Dict[int, float]     # rank k -> fraction of evaluated queries matched within the top k
    mean_ap: float
    num_queries: int
    num_evaluated: int
    num_skipped: int          # queries with no true match left in the gallery

    def summary(self) -> str:
        ranks = ", ".join(f"rank-{rank} {value:.2%}" for rank, value in self.cmc.items())
        skipped = f" ({self.num_skipped} of {self.num_queries} queries had no match and were skipped)" \
            if self.num_skipped else ""
        return f"mAP {self.mean_ap:.2%}, {ranks}{skipped}"


def _labels(values: Sequence[int], length: int, what: str) -> np.ndarray:
    labels = np.asarray(values).reshape(-1)
    if labels.shape != (length,):
        raise KeyreidError(f"{what} must hold {length} entries, got {labels.shape[0]}")
    return labels


def evaluate_rankings(distances: np.ndarray, query_pids: Sequence[int], gallery_pids: Sequence[int],
                      query_cameras: Sequence[int], gallery_cameras: Sequence[int],
                      ranks: Sequence[int] = DEFAULT_RANKS) -> RankingResult:
    """CMC at ``ranks`` and mAP for a [num_queries, num_gallery] distance matrix (smaller = closer)."""
    distances = np.asarray(distances)
    if distances.ndim != 2:
        raise KeyreidError(f"distances must be [queries, gallery], got shape {distances.shape}")
    if np.isnan(distances).any():
        raise KeyreidError("distances contain NaN; the features are broken")
    if not ranks or min(ranks) < 1:
        raise KeyreidError(f"ranks must be positive, got {list(ranks)}")
    num_queries, num_gallery = distances.shape
    query_pids = _labels(query_pids, num_queries, "query_pids")
    query_cameras = _labels(query_cameras, num_queries, "query_cameras")
    gallery_pids = _labels(gallery_pids, num_gallery, "gallery_pids")
    gallery_cameras = _labels(gallery_cameras, num_gallery, "gallery_cameras")

    first_match_positions, average_precisions = [], []
    for query in range(num_queries):
        order = np.argsort(distances[query], kind="stable")
        same_pid = gallery_pids[order] == query_pids[query]
        same_camera = gallery_cameras[order] == query_cameras[query]
        is_match = same_pid[~(same_pid & same_camera)]    # drop same identity and same camera
        match_positions = np.flatnonzero(is_match)        # 0-based ranks of the true matches
        if match_positions.size == 0:
            continue
        first_match_positions.append(match_positions[0])
        precision_at_matches = np.arange(1, match_positions.size + 1) / (match_positions + 1)
        average_precisions.append(precision_at_matches.mean())

    if not first_match_positions:
        raise KeyreidError(f"none of the {num_queries} queries has a matching gallery entry "
                           "from another camera; check the identities and cameras")
    first_match_positions = np.asarray(first_match_positions)
    return RankingResult(
        cmc={int(rank): float(np.mean(first_match_positions < rank)) for rank in ranks},
        mean_ap=float(np.mean(average_precisions)),
        num_queries=num_queries,
        num_evaluated=len(first_match_positions),
        num_skipped=num_queries - len(first_match_positions))
