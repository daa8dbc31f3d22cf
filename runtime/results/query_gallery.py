"""Query/gallery evaluation of tracklet features: the MARS protocol (docs/contract.md §4) on
``Tracklet`` records, for ``infer.py``'s evaluation modes and the ranking figure.

``evaluation.py`` holds the metrics on plain arrays; this module ties them to tracklets (their
identities and cameras, unknown identities, the gallery order a query sees).
"""
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.runtime.results.evaluation import RankingResult, evaluate_rankings, squared_euclidean_distances
from keyreid.runtime.inputs.tracklets import UNKNOWN_PID, Tracklet


@dataclass
class QueryGalleryResult:
    ranking: RankingResult
    distances: np.ndarray               # [queries, gallery] squared Euclidean
    query: List[Tracklet]               # the queries that were ranked (known identity)
    gallery: List[Tracklet]
    unlabelled_queries: List[str]       # queries without an identity, left out


def evaluate_query_gallery(query: Sequence[Tracklet], query_features: np.ndarray,
                           gallery: Sequence[Tracklet], gallery_features: np.ndarray) -> QueryGalleryResult:
    """CMC and mAP with the MARS protocol (docs/contract.md §4) on tracklet features.

    Queries with an unknown identity (pid -1) cannot be scored and are left out (and listed);
    gallery entries with an unknown identity stay, as distractors that never match.
    """
    if len(query) != len(query_features) or len(gallery) != len(gallery_features):
        raise KeyreidError("each query and gallery tracklet needs exactly one feature")
    labelled = [index for index, tracklet in enumerate(query) if tracklet.pid != UNKNOWN_PID]
    unlabelled = [tracklet.name for tracklet in query if tracklet.pid == UNKNOWN_PID]
    if not labelled:
        raise KeyreidError("no query tracklet has a known identity: give identities in manifest.csv "
                           "(tracklet,pid,camera) or use MARS-style frame names")
    if not gallery:
        raise KeyreidError("the gallery is empty: no gallery tracklet produced a feature")
    query = [query[index] for index in labelled]
    distances = squared_euclidean_distances(np.asarray(query_features)[labelled], gallery_features)
    ranking = evaluate_rankings(distances,
                                [tracklet.pid for tracklet in query], [tracklet.pid for tracklet in gallery],
                                [tracklet.camera for tracklet in query],
                                [tracklet.camera for tracklet in gallery])
    return QueryGalleryResult(ranking, distances, query, list(gallery), unlabelled)


def valid_gallery_order(distances_row: np.ndarray, query: Tracklet, gallery: Sequence[Tracklet]) -> np.ndarray:
    """Gallery indices for one query, nearest first, without same-identity same-camera entries
    (what the protocol ranks)."""
    order = np.argsort(distances_row, kind="stable")
    keep = [index for index in order
            if not (gallery[index].pid == query.pid and gallery[index].camera == query.camera)]
    return np.array(keep, dtype=np.int64)

