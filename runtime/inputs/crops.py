"""The crop rule: a tracker's box in frame pixels -> the person crop and its keypoints in crop
pixels (docs/contract.md §9).

A stream gives whole frames and, per tracked person, a box and COCO keypoints in frame pixels;
the model takes person crops with keypoints in crop pixels (§3). This module is the one place
that turns the first into the second, so the stream path and a folder of crops cut by hand
with ``cut_person`` give the same clips, bit for bit:

- the box's edges are rounded to whole pixels, halves up (``floor(v + 0.5)``), then clipped to
  the frame; the crop is the pixels ``[left, right) x [top, bottom)`` of the decoded frame;
- a box that is not finite, has no area, or lies wholly outside the frame gives no crop;
- keypoints move by ``(-left, -top)`` in float64 and are stored as float32; confidences stay;
  a joint with a non-finite value or a negative confidence is zeroed, the rule ``.pose`` files
  follow (``poses.clear_invalid_joints``). Joints outside the crop keep their coordinates: the
  part pooling skips them (§3).
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from keyreid.contract import NUM_KEYPOINTS
from keyreid.runtime.inputs.poses import clear_invalid_joints


@dataclass(frozen=True)
class CropWindow:
    """Whole-pixel edges of a crop inside its frame: columns [left, right), rows [top, bottom)."""
    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top


@dataclass(frozen=True)
class PersonCrop:
    """One person cut from one frame: pixels (a view of the frame), keypoints in crop pixels."""
    image: np.ndarray                # [height, width, 3], the frame's colour order
    keypoints: Optional[np.ndarray]  # float32 [17, 3] in crop pixels; None when the tracker gave none
    window: CropWindow
    cleared_joints: int              # joints zeroed for NaN/inf or a negative confidence


def _half_up(value: float) -> int:
    return math.floor(value + 0.5)


def crop_window(box: Sequence[float], frame_width: int, frame_height: int) -> Optional[CropWindow]:
    """The box ``(x, y, width, height)``'s whole-pixel window clipped to the frame; None when it
    has no finite area inside the frame (not finite, width or height <= 0, or wholly outside)."""
    x, y, width, height = (float(value) for value in box)
    if not all(math.isfinite(value) for value in (x, y, width, height)) or width <= 0 or height <= 0:
        return None
    left = min(max(_half_up(x), 0), frame_width)
    top = min(max(_half_up(y), 0), frame_height)
    right = min(max(_half_up(x + width), 0), frame_width)
    bottom = min(max(_half_up(y + height), 0), frame_height)
    if right <= left or bottom <= top:
        return None
    return CropWindow(left, top, right, bottom)


def keypoints_in_crop(keypoints: np.ndarray, window: CropWindow) -> Tuple[np.ndarray, int]:
    """Frame-pixel keypoints [17, 3] -> (float32 crop-pixel keypoints, joints cleared)."""
    joints = np.array(keypoints, dtype=np.float64).reshape(NUM_KEYPOINTS, 3)
    with np.errstate(invalid="ignore"):
        joints[:, 0] -= window.left
        joints[:, 1] -= window.top
    return clear_invalid_joints(joints)


def cut_person(frame: np.ndarray, box: Sequence[float], keypoints: Optional[np.ndarray]) -> Optional[PersonCrop]:
    """The crop of ``box`` from ``frame`` ([H, W, 3]) and ``keypoints`` ([17, 3] in frame pixels,
    or None) moved into it; None when the box gives no crop (see ``crop_window``)."""
    window = crop_window(box, frame.shape[1], frame.shape[0])
    if window is None:
        return None
    image = frame[window.top:window.bottom, window.left:window.right]
    if keypoints is None:
        return PersonCrop(image, None, window, 0)
    moved, cleared = keypoints_in_crop(keypoints, window)
    return PersonCrop(image, moved, window, cleared)
