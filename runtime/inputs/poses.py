"""Upstream ``.pose`` files -> float32 [17, 3] keypoints (docs/contract.md §3, input ``keypoints``).

A ``.pose`` file is the JSON array OpenPifPaf's extraction script writes: 17 COCO joints as
[x, y, confidence] in pixels of the original crop, undetected joints as [0, 0, 0].

Keypoints only steer the part weights, so a bad pose file must not stop a whole evaluation:
missing, unreadable and malformed files all read as "no joint visible" (zeros, which the part
pooling treats like an undetected person), and a ``PoseTally`` counts them so the caller can say
how many frames ran without a pose instead of failing silently or loudly.
"""
import json
import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from keyreid.contract import NUM_KEYPOINTS
from keyreid.runtime.inputs.coco_keypoints import FrameDetections

PathLike = Union[str, Path]
# Where a frame's keypoints come from: a .pose file, or its detections in a COCO results file.
PoseSource = Union[PathLike, FrameDetections]

# A pose file is 17 x 3 numbers, well under 2 KB; a larger file is malformed and is not read whole.
MAX_POSE_BYTES = 64 * 1024


class PoseStatus(Enum):
    OK = "ok"
    MISSING = "missing"          # no file (or no path given)
    UNREADABLE = "unreadable"    # the file exists but could not be read (permissions, a folder, ...)
    MALFORMED = "malformed"      # not JSON, or not a 17 x 3 array of numbers


def no_joints() -> np.ndarray:
    """The keypoints of a frame where nothing was detected: float32 [17, 3] zeros."""
    return np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)


def _is_number_or_null(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _parse_pose(text: str) -> Optional[np.ndarray]:
    """The [17, 3] float64 array in ``text``, or None if it is not one.

    Only JSON numbers count (NumPy would quietly turn "1.5" or true into floats); null becomes
    NaN, so that joint is cleared rather than the whole file rejected.
    """
    try:
        rows = json.loads(text)
    except (ValueError, RecursionError):     # RecursionError: arrays nested thousands deep
        return None
    if not (isinstance(rows, list) and len(rows) == NUM_KEYPOINTS and all(
            isinstance(row, list) and len(row) == 3 and all(map(_is_number_or_null, row))
            for row in rows)):
        return None
    try:
        return np.array(rows, dtype=np.float64)   # None -> NaN
    except OverflowError:                          # an integer too large for a float
        return None


def clear_invalid_joints(keypoints: np.ndarray) -> Tuple[np.ndarray, int]:
    """float32 keypoints with every joint that has a non-finite value (also after the cast to
    float32) or a negative confidence zeroed; and how many joints that was.

    Negative x or y stay: a joint just outside the crop is legitimate and the part pooling
    skips it itself.
    """
    with np.errstate(over="ignore"):
        keypoints = keypoints.astype(np.float32)
    invalid = ~np.isfinite(keypoints).all(axis=1) | (keypoints[:, 2] < 0)
    keypoints[invalid] = 0.0
    return keypoints, int(invalid.sum())


def read_pose(path: Optional[PoseSource], crop_size: Optional[Tuple[float, float]] = None
              ) -> Tuple[np.ndarray, PoseStatus, int]:
    """Read one frame's pose: (float32 [17, 3], status, number of joints cleared as invalid).

    ``path`` is a .pose file, or the frame's COCO detections (``coco_keypoints``), from which
    the person best filling the crop of ``crop_size`` (width, height) is taken.
    Never raises for a bad file: anything but OK comes back as all zeros.
    """
    if isinstance(path, FrameDetections):
        keypoints, cleared = clear_invalid_joints(path.select(crop_size or (0, 0)))
        return keypoints, PoseStatus.OK, cleared
    if path is None:
        return no_joints(), PoseStatus.MISSING, 0
    try:
        if not Path(path).is_file():      # a folder or a FIFO (which would block the read)
            return no_joints(), (PoseStatus.UNREADABLE if Path(path).exists() else PoseStatus.MISSING), 0
        with open(path, "rb") as handle:
            data = handle.read(MAX_POSE_BYTES + 1)
        if len(data) > MAX_POSE_BYTES:
            return no_joints(), PoseStatus.MALFORMED, 0
        text = data.decode("utf-8-sig")
    except FileNotFoundError:
        return no_joints(), PoseStatus.MISSING, 0
    except UnicodeDecodeError:
        return no_joints(), PoseStatus.MALFORMED, 0
    except OSError:
        return no_joints(), PoseStatus.UNREADABLE, 0
    keypoints = _parse_pose(text)
    if keypoints is None:
        return no_joints(), PoseStatus.MALFORMED, 0
    keypoints, cleared = clear_invalid_joints(keypoints)
    return keypoints, PoseStatus.OK, cleared


@dataclass
class PoseTally:
    """Counts of what ``load_pose`` met, for a one-line summary at the end of a run.

    Safe to share between preprocessing threads.
    """
    ok: int = 0
    missing: int = 0
    unreadable: int = 0
    malformed: int = 0
    cleared_joints: int = 0                                  # NaN/inf/negative-confidence joints
    examples: List[str] = field(default_factory=list)        # a few paths of bad files
    max_examples: int = 3
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, path: Optional[PathLike], status: PoseStatus, cleared_joints: int = 0) -> None:
        with self._lock:
            setattr(self, status.value, getattr(self, status.value) + 1)
            self.cleared_joints += cleared_joints
            if status is not PoseStatus.OK and len(self.examples) < self.max_examples:
                self.examples.append(f"{status.value}: {path}")

    @property
    def total(self) -> int:
        return self.ok + self.missing + self.unreadable + self.malformed

    @property
    def without_pose(self) -> int:
        """Frames that ran with no joints because their pose file was missing or bad."""
        return self.missing + self.unreadable + self.malformed

    def summary(self) -> str:
        line = (f"pose files: {self.ok} read, {self.missing} missing, {self.unreadable} unreadable, "
                f"{self.malformed} malformed (frames without a pose: {self.without_pose} of {self.total})")
        if self.cleared_joints:
            line += f"; {self.cleared_joints} joints with NaN/inf or negative confidence cleared"
        if self.examples:
            line += "; e.g. " + ", ".join(self.examples)
        return line


def load_pose(path: Optional[PoseSource], tally: Optional[PoseTally] = None,
              crop_size: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """``read_pose`` that records its status in ``tally`` and returns only the keypoints."""
    keypoints, status, cleared = read_pose(path, crop_size)
    if tally is not None:
        tally.record(path, status, cleared)
    return keypoints
