"""Keypoints from common pose tools: COCO keypoint-results JSON for a tracklet folder.

MMPose, YOLO-pose (Ultralytics ``save_json``) and OpenPifPaf can all write the COCO results
format: a JSON list of detections, each

    {"image_id": "0003", "keypoints": [x0, y0, c0, ..., x16, y16, c16], "score": 0.93,
     "bbox": [x, y, width, height]}                     # bbox optional

with 17 COCO joints as 51 numbers in pixels of the image the tool ran on (here: the crop).
A tracklet folder holding ``keypoints.json`` takes its keypoints from there instead of
``.pose`` files. A detection belongs to the frame named by ``"file_name"`` (or ``"image_id"``
given as a string): the frame's file name, or its name without extension. An integer
``image_id`` names the frame whose file name without extension is that number (``000012.jpg``
is image 12).

A crop may show several people (a passer-by behind the tracked one). The frame's person is the
detection whose box best overlaps the whole crop (intersection over union), then the higher
score; without a ``"bbox"`` the box around the detection's confident joints stands in.
A frame with no detection runs with no joints visible, as a missing ``.pose`` file does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from keyreid.contract import CONFIDENCE_THRESHOLD, NUM_KEYPOINTS
from keyreid.errors import KeyreidError

COCO_FILE_NAME = "keypoints.json"
# Larger files are refused before parsing: a tracklet's detections take kilobytes.
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class FrameDetections:
    """The detections of one frame: keypoints [n, 17, 3], boxes [n, 4] (x, y, w, h), scores [n]."""
    source: Path
    keypoints: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def select(self, crop_size: Tuple[float, float]) -> np.ndarray:
        """The tracked person's keypoints [17, 3] (float64) for a crop of (width, height)."""
        if len(self.keypoints) == 1:
            return self.keypoints[0]
        overlaps = [box_iou(box, (0.0, 0.0, float(crop_size[0]), float(crop_size[1]))) for box in self.boxes]
        best = max(range(len(overlaps)), key=lambda index: (overlaps[index], self.scores[index]))
        return self.keypoints[best]

    def __str__(self) -> str:      # how a PoseTally names the source
        return str(self.source)


def box_iou(first: Sequence[float], second: Sequence[float]) -> float:
    """Intersection over union of two (x, y, width, height) boxes; 0 for empty ones."""
    x0, y0 = max(first[0], second[0]), max(first[1], second[1])
    x1 = min(first[0] + first[2], second[0] + second[2])
    y1 = min(first[1] + first[3], second[1] + second[3])
    intersection = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = first[2] * first[3] + second[2] * second[3] - intersection
    return intersection / union if union > 0 else 0.0


def joints_box(keypoints: np.ndarray) -> np.ndarray:
    """The (x, y, w, h) box around the confident joints; all zeros if there are none."""
    confident = keypoints[np.nan_to_num(keypoints[:, 2]) > CONFIDENCE_THRESHOLD, :2]   # the part pooling's own rule
    confident = confident[np.isfinite(confident).all(axis=1)]
    if not len(confident):
        return np.zeros(4)
    low, high = confident.min(axis=0), confident.max(axis=0)
    return np.array([low[0], low[1], high[0] - low[0], high[1] - low[1]])


def _numbers(value: object, length: int) -> Optional[np.ndarray]:
    """``value`` as float64 [length] if it is a list of JSON numbers (null -> NaN), else None."""
    if not isinstance(value, list) or len(value) != length or not all(
            item is None or (isinstance(item, (int, float)) and not isinstance(item, bool)) for item in value):
        return None
    try:
        return np.array(value, dtype=np.float64)
    except OverflowError:
        return None


def _frame_keys(frame_names: Sequence[str]) -> Dict[object, str]:
    """Every way a detection may name a frame -> that frame's file name."""
    keys: Dict[object, str] = {}
    for name in frame_names:
        stem = Path(name).stem
        keys[name] = keys[stem] = name
        if stem.isdigit():
            keys[int(stem)] = name
    return keys


def read_coco_keypoints(path: Path, frame_names: Sequence[str]) -> Dict[str, FrameDetections]:
    """The detections of each frame in ``frame_names`` (file names) that has any.

    A file that is not a COCO keypoint-results list, an entry without 51 keypoint numbers, or a
    file that names none of the frames is a KeyreidError saying what to fix.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise KeyreidError(f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB; split it per tracklet")
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise KeyreidError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:       # also UnicodeDecodeError
        raise KeyreidError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise KeyreidError(f"{path}: COCO keypoint results are a JSON list of detections, got {type(entries).__name__}")
    keys = _frame_keys(frame_names)
    found: Dict[str, List[Tuple[np.ndarray, np.ndarray, float]]] = {}
    for number, entry in enumerate(entries):
        where = f"{path} detection {number}"
        if not isinstance(entry, dict):
            raise KeyreidError(f"{where} is not an object")
        frame_key = entry.get("file_name", entry.get("image_id"))
        if frame_key is None:
            raise KeyreidError(f"{where} has neither \"file_name\" nor \"image_id\"")
        if not isinstance(frame_key, (str, int)) or isinstance(frame_key, bool):
            raise KeyreidError(f"{where}: \"file_name\" / \"image_id\" must be a string or a whole number, "
                               f"got {type(frame_key).__name__}")
        keypoints = _numbers(entry.get("keypoints"), NUM_KEYPOINTS * 3)
        if keypoints is None:
            raise KeyreidError(f"{where}: \"keypoints\" must be {NUM_KEYPOINTS * 3} numbers "
                               f"(x, y, confidence for each of the {NUM_KEYPOINTS} COCO joints)")
        keypoints = keypoints.reshape(NUM_KEYPOINTS, 3)
        box = _numbers(entry["bbox"], 4) if "bbox" in entry else joints_box(keypoints)
        if box is None:
            raise KeyreidError(f"{where}: \"bbox\" must be 4 numbers (x, y, width, height)")
        score = entry.get("score", 1.0)
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise KeyreidError(f"{where}: \"score\" must be a number")
        frame = keys.get(frame_key if not isinstance(frame_key, str) else Path(frame_key).name,
                         keys.get(Path(str(frame_key)).stem))
        if frame is not None:
            found.setdefault(frame, []).append((keypoints, box, float(score)))
    if entries and not found:
        raise KeyreidError(f"{path}: none of its {len(entries)} detections names a frame of this tracklet "
                           f"(e.g. {frame_names[0]!r}); use the frame's file name as \"file_name\" or \"image_id\"")
    return {frame: FrameDetections(path, np.stack([item[0] for item in detections]),
                                   np.stack([item[1] for item in detections]),
                                   np.array([item[2] for item in detections]))
            for frame, detections in found.items()}
