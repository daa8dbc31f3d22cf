"""A picture of the ranking: one row per query, its first frame then its top-k gallery tracklets.

Gallery thumbnails get a green border when the identity matches the query's and a red one when
it does not; same-identity same-camera entries are left out, as the evaluation leaves them out.
A legend under the rows says what the colours mean. Drawn with OpenCV (a runtime dependency) at
a fixed layout: the figure is as wide as its longest row (a small gallery gives a narrow figure,
not a blank margin), ``figure_size(rows, gallery_columns)``. ``draw_rows`` also draws the stream
tool's figure (``track_figure``), whose rows start with several crops of one track.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.lazy import require
from keyreid.runtime.inputs.images import decode_frame
from keyreid.runtime.results.query_gallery import QueryGalleryResult, valid_gallery_order
from keyreid.runtime.inputs.tracklets import UNKNOWN_PID, Tracklet

THUMB_WIDTH, THUMB_HEIGHT = 64, 128     # half the model's 128x256
BORDER = 4
LABEL_HEIGHT = 16                       # text line above each thumbnail
GAP = 6                                 # between cells and between rows
QUERY_GAP = 24                          # between the query and its gallery
MARGIN = 10
LEGEND_LINE_HEIGHT = 18                 # one line of the legend under the rows
TOP_K = 10
DEFAULT_QUERIES = 5

# RGB
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
QUERY_BORDER = (70, 110, 220)
MATCH_BORDER = (0, 180, 0)
MISMATCH_BORDER = (220, 0, 0)
PLACEHOLDER = (190, 190, 190)

CELL_WIDTH = THUMB_WIDTH + 2 * BORDER
CELL_HEIGHT = LABEL_HEIGHT + THUMB_HEIGHT + 2 * BORDER
FONT_SCALE = 0.35
LEGEND = ((QUERY_BORDER, "query"), (MATCH_BORDER, "same identity"), (MISMATCH_BORDER, "another identity"),
          (PLACEHOLDER, "grey cross: frame unreadable"))


@dataclass(frozen=True)
class Thumbnail:
    image: Optional[np.ndarray]     # RGB uint8 at any size; None draws a placeholder
    label: str
    border: Tuple[int, int, int]


def figure_size(rows: int, gallery_columns: int = TOP_K, query_columns: int = 1,
                legend_lines: int = 0) -> Tuple[int, int]:
    """(width, height) in pixels of ``rows`` rows of ``query_columns`` thumbnails, a gap, and
    ``gallery_columns`` thumbnails, with ``legend_lines`` lines of legend under them."""
    width = 2 * MARGIN + (query_columns + gallery_columns) * CELL_WIDTH \
        + (query_columns - 1 + max(gallery_columns - 1, 0)) * GAP + QUERY_GAP
    height = 2 * MARGIN + rows * CELL_HEIGHT + (rows - 1) * GAP + legend_lines * LEGEND_LINE_HEIGHT
    return width, height


def cell_origin(row: int, column: int, query_columns: int = 1) -> Tuple[int, int]:
    """(x, y) of the top-left corner of a thumbnail's border; columns below ``query_columns``
    are the query's, the gallery's follow after QUERY_GAP."""
    if column < query_columns:
        x = MARGIN + column * (CELL_WIDTH + GAP)
    else:
        x = MARGIN + query_columns * CELL_WIDTH + (query_columns - 1) * GAP + QUERY_GAP \
            + (column - query_columns) * (CELL_WIDTH + GAP)
    y = MARGIN + row * (CELL_HEIGHT + GAP) + LABEL_HEIGHT
    return x, y


def _draw_cell(canvas: np.ndarray, row: int, column: int, thumbnail: Thumbnail, query_columns: int = 1) -> None:
    cv2 = require("cv2")
    x, y = cell_origin(row, column, query_columns)
    canvas[y:y + THUMB_HEIGHT + 2 * BORDER, x:x + CELL_WIDTH] = thumbnail.border
    inner = canvas[y + BORDER:y + BORDER + THUMB_HEIGHT, x + BORDER:x + BORDER + THUMB_WIDTH]
    if thumbnail.image is None:
        inner[:] = PLACEHOLDER
        left, top = x + BORDER, y + BORDER          # a cross: drawn on the canvas, not on a view
        right, bottom = left + THUMB_WIDTH - 1, top + THUMB_HEIGHT - 1
        cv2.line(canvas, (left, top), (right, bottom), TEXT, 1)
        cv2.line(canvas, (right, top), (left, bottom), TEXT, 1)
    else:
        inner[:] = cv2.resize(thumbnail.image, (THUMB_WIDTH, THUMB_HEIGHT), interpolation=cv2.INTER_AREA)
    cv2.putText(canvas, thumbnail.label[:12], (x, y - 4), cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE, TEXT, 1,
                cv2.LINE_AA)


def _legend_width(legend: Sequence[Tuple[Tuple[int, int, int], str]]) -> int:
    cv2 = require("cv2")
    widths = [LEGEND_LINE_HEIGHT + cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE, 1)[0][0]
              for _, text in legend]
    return 2 * MARGIN + max(widths, default=0)


def _draw_legend(canvas: np.ndarray, legend: Sequence[Tuple[Tuple[int, int, int], str]]) -> None:
    """One line per colour under the rows: a swatch, then what it means."""
    cv2 = require("cv2")
    top = canvas.shape[0] - MARGIN - len(legend) * LEGEND_LINE_HEIGHT
    for line, (colour, text) in enumerate(legend):
        y = top + line * LEGEND_LINE_HEIGHT
        canvas[y + 3:y + LEGEND_LINE_HEIGHT - 3, MARGIN:MARGIN + LEGEND_LINE_HEIGHT - 6] = colour
        cv2.putText(canvas, text, (MARGIN + LEGEND_LINE_HEIGHT, y + LEGEND_LINE_HEIGHT - 5), cv2.FONT_HERSHEY_SIMPLEX,
                    FONT_SCALE, TEXT, 1, cv2.LINE_AA)


def draw_rows(rows: Sequence[Tuple[object, Sequence[Thumbnail]]], top_k: int = TOP_K,
              legend: Sequence[Tuple[Tuple[int, int, int], str]] = LEGEND) -> np.ndarray:
    """RGB uint8 figure: per row the query's thumbnail (or a list of them) and up to ``top_k``
    gallery thumbnails, then the legend. The figure is as wide as its longest row."""
    if not rows:
        raise KeyreidError("a ranking figure needs at least one query")
    queries = [[query] if isinstance(query, Thumbnail) else list(query) for query, _ in rows]
    query_columns = max(1, max(len(query) for query in queries))
    gallery_columns = max(1, min(top_k, max(len(gallery) for _, gallery in rows)))
    width, height = figure_size(len(rows), gallery_columns, query_columns, len(legend))
    canvas = np.empty((height, max(width, _legend_width(legend)), 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for row, (query, (_, gallery)) in enumerate(zip(queries, rows)):
        for column, thumbnail in enumerate(query):
            _draw_cell(canvas, row, column, thumbnail, query_columns)
        for rank, thumbnail in enumerate(gallery[:top_k]):
            _draw_cell(canvas, row, query_columns + rank, thumbnail, query_columns)
    _draw_legend(canvas, legend)
    return canvas


def first_frame_or_none(tracklet: Tracklet) -> Optional[np.ndarray]:
    """The tracklet's first frame, or None when it cannot be decoded (drawn as a placeholder)."""
    try:
        return decode_frame(tracklet.frame_paths[0])
    except KeyreidError:
        return None


def _pid_text(pid: int) -> str:
    return "?" if pid == UNKNOWN_PID else str(pid)


def chosen_queries(num_queries: int, wanted: int) -> List[int]:
    """``wanted`` query positions spread evenly over the ``num_queries`` (first and last included)."""
    if num_queries < 1 or wanted < 1:
        return []
    return sorted(set(np.linspace(0, num_queries - 1, min(wanted, num_queries)).round().astype(int).tolist()))


def ranking_figure(result: QueryGalleryResult, num_queries: int = DEFAULT_QUERIES, top_k: int = TOP_K,
                   first_frame: Callable[[Tracklet], Optional[np.ndarray]] = first_frame_or_none) -> np.ndarray:
    """RGB uint8 figure of the top-``top_k`` gallery tracklets of a few queries of ``result``."""
    rows = []
    for position in chosen_queries(len(result.query), num_queries):
        query = result.query[position]
        order = valid_gallery_order(result.distances[position], query, result.gallery)[:top_k]
        gallery = [Thumbnail(first_frame(result.gallery[index]),
                             f"{rank} id {_pid_text(result.gallery[index].pid)}",
                             MATCH_BORDER if result.gallery[index].pid == query.pid else MISMATCH_BORDER)
                   for rank, index in enumerate(order, start=1)]
        rows.append((Thumbnail(first_frame(query), f"q id {_pid_text(query.pid)} c{query.camera}",
                               QUERY_BORDER), gallery))
    return draw_rows(rows, top_k)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image."""
    cv2 = require("cv2")
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise KeyreidError("OpenCV could not encode the ranking figure as PNG")
    return encoded.tobytes()
