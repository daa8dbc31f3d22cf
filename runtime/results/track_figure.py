"""The stream tool's picture: each finished track's crops beside its nearest tracks on other
cameras, for an operator to judge the matches by eye.

One row per track (the most recent ``rows``): up to ``CROPS_PER_ROW`` of its crops spread over
its life (blue borders, labelled with camera and track), then its cross-camera matches, nearest
first (grey borders, labelled with the match's name and squared distance). A match whose crops
are no longer in memory (an entry of a gallery loaded from a file, or a track older than the
ones kept) is a grey cross. Laid out by ``ranking_figure.draw_rows``, with a legend.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.runtime.results.ranking_figure import PLACEHOLDER, QUERY_BORDER, Thumbnail, draw_rows

CROPS_PER_ROW = 4
DEFAULT_ROWS = 12
MATCH_BORDER = (150, 150, 150)
# Crops of finished tracks kept for drawing them as someone's match: a bounded, oldest-out store.
MAX_REMEMBERED_TRACKS = 2000
LEGEND = ((QUERY_BORDER, "a finished track: crops over its life (camera/track)"),
          (MATCH_BORDER, "its nearest tracks on other cameras, nearest first (squared distance)"),
          (PLACEHOLDER, "grey cross: that track's crops are not in memory"))


def spread(items: Sequence, count: int) -> List:
    """``count`` items spread evenly over ``items``, first and last included."""
    if len(items) <= count:
        return list(items)
    positions = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[position] for position in positions]


class TrackFigure:
    """Remembers finished tracks' crops (``add``) and draws the last ``rows`` of them (``draw``)."""

    def __init__(self, rows: int = DEFAULT_ROWS, top_k: int = 5):
        if rows < 1:
            raise KeyreidError(f"a track figure needs at least one row, got {rows}")
        self.rows, self.top_k = rows, top_k
        self._crops: "OrderedDict[str, List[np.ndarray]]" = OrderedDict()
        self._recent: List[object] = []        # FinishedTrack, newest last

    def add(self, track) -> None:
        """Keep a finished track (``stream_session.FinishedTrack``) for the figure."""
        if track.feature is None:
            return
        self._crops[track.name] = list(track.thumbnails)
        while len(self._crops) > MAX_REMEMBERED_TRACKS:
            self._crops.popitem(last=False)
        self._recent = (self._recent + [track])[-self.rows:]

    def __len__(self) -> int:
        return len(self._recent)

    def _first_crop(self, name: str) -> Optional[np.ndarray]:
        crops = self._crops.get(name)
        return crops[0] if crops else None

    def draw(self) -> np.ndarray:
        """RGB uint8 figure of the remembered tracks, oldest first."""
        if not self._recent:
            raise KeyreidError("no track has finished with a feature yet: nothing to draw")
        rows = []
        for track in self._recent:
            crops = spread(track.thumbnails, CROPS_PER_ROW) or [None]
            label = f"c{track.camera} t{track.track}"
            query = [Thumbnail(crop, label if index == 0 else "", QUERY_BORDER) for index, crop in enumerate(crops)]
            matches = [Thumbnail(self._first_crop(match.name), f"{_short(match.name)} {_distance(match.distance)}",
                                 MATCH_BORDER) for match in track.matches[:self.top_k]]
            rows.append((query, matches))
        return draw_rows(rows, self.top_k, LEGEND)


def _distance(value: float) -> str:
    """A squared distance in at most 5 characters (labels hold about 12)."""
    return f"{value:.0f}" if 10 <= value < 1e5 else f"{value:.2g}"


def _short(name: str) -> str:
    """``cam1/track12`` -> ``c1 t12`` (labels have room for about 12 characters)."""
    return name.replace("cam", "c").replace("/track", " t")
