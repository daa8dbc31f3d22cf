"""The fixed geometry of KeyRe-ID and the I/O contract every engine honours (docs/contract.md
§2, §3, §6).

Everything downstream of a checkpoint (export, engines, runtime) reads these names instead of
repeating numbers, so the contract lives in one place.
"""
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Optional, Tuple, get_args

import numpy as np

from keyreid.errors import KeyreidError

CLIP_FRAMES = 4            # T: frames per clip
IMAGE_HEIGHT = 256
IMAGE_WIDTH = 128
PATCH_SIZE = 16
PATCH_ROWS = IMAGE_HEIGHT // PATCH_SIZE   # 16
PATCH_COLS = IMAGE_WIDTH // PATCH_SIZE    # 8
NUM_PATCHES = PATCH_ROWS * PATCH_COLS     # 128, raster order
NUM_TOKENS = NUM_PATCHES + 1              # [CLS] + patches
NUM_KEYPOINTS = 17                        # COCO
NUM_PARTS = 6                             # head, torso, left arm, right arm, left leg, right leg
PART_NAMES = ("head", "torso", "left_arm", "right_arm", "left_leg", "right_leg")
# COCO joint indices per part, in the order of PART_NAMES (docs/contract.md §3).
JOINT_GROUPS = (
    (0, 1, 2, 3, 4),     # head: nose, eyes, ears
    (5, 6, 11, 12),      # torso: shoulders, hips
    (7, 9),              # left arm: elbow, wrist
    (8, 10),             # right arm
    (13, 15),            # left leg: knee, ankle
    (14, 16),            # right leg
)
# A joint counts iff its confidence is above this, strictly (kernels/body_parts.py says how each
# implementation compares it exactly).
CONFIDENCE_THRESHOLD = 0.1
MAX_CLIPS_PER_TRACKLET = 41               # docs/contract.md §4: at most the first 41 clips are used
MEAN_CAMERA = -1                          # camera index that selects the mean camera embedding



class HeatmapMode(str, Enum):
    """How a part's joint heatmaps combine into its patch weights (docs/contract.md §3). A str
    enum: ``HeatmapMode.MAX == "max"``, so the kernels take either."""
    MAX = "max"
    MEAN = "mean"
    BLANK = "blank"


HEATMAP_MODES: Tuple[str, ...] = tuple(mode.value for mode in HeatmapMode)
DEFAULT_HEATMAP_MODE = HeatmapMode.MAX.value

Precision = Literal["fp32", "fp16", "int8"]          # of an exported model
PRECISIONS: Tuple[str, ...] = get_args(Precision)
DEFAULT_PRECISION: Precision = "fp32"

# The exported graph's default-domain opset: the dynamo exporter's lowest, and what the
# KeypointPartPool function body is written against (newer opsets are accepted).
ONNX_OPSET = 18

OP_DOMAIN = "keyreid"
OP_NAME = "KeypointPartPool"
OP_PLUGIN_VERSION = "1"


def embedding_dim(embed_dim: int = 768, clip_frames: int = CLIP_FRAMES) -> int:
    """Length of one clip embedding: the global feature plus six part features of T*D each."""
    return embed_dim + NUM_PARTS * clip_frames * embed_dim


def camera_problem(camera: int, num_cameras: Optional[int]) -> Optional[str]:
    """Why ``camera`` cannot be fed to a model with ``num_cameras`` cameras, or None if it can.

    Valid: 0..C-1, and MEAN_CAMERA (-1) for an unseen camera. When the model does not say how
    many cameras it knows (``num_cameras`` None), only -1 is safe: an index past the model's
    camera table makes ONNX Runtime fail deep inside and TensorRT read garbage.
    """
    if camera == MEAN_CAMERA:
        return None
    if num_cameras is None:
        if camera < MEAN_CAMERA:
            return f"camera {camera} is out of range: give a 0-based camera index, or {MEAN_CAMERA} for the mean camera"
        return (f"camera {camera} cannot be checked: the model does not record how many cameras it knows; "
                f"give the count (--num-cameras C, or num_cameras=C), or use {MEAN_CAMERA} for the mean camera")
    if not 0 <= camera < num_cameras:
        return (f"camera {camera} is out of range: this model takes 0..{num_cameras - 1}, "
                f"or {MEAN_CAMERA} for the mean camera")
    return None


def checked_camera(value: object, num_cameras: Optional[int]) -> int:
    """``value`` as a camera index for a model with ``num_cameras`` cameras; KeyreidError if it
    is not one integer or is out of range (``camera_problem``)."""
    array = np.asarray(value)
    if array.shape != () or array.dtype.kind not in "iu":
        raise KeyreidError(f"camera must be one integer, got {value!r}")
    reason = camera_problem(int(array), num_cameras)
    if reason:
        raise KeyreidError(reason)
    return int(array)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: Tuple[object, ...]   # "N" marks the dynamic batch axis (clips)
    meaning: str


def input_specs(clip_frames: int = CLIP_FRAMES, image_height: int = IMAGE_HEIGHT,
                image_width: int = IMAGE_WIDTH) -> Tuple[TensorSpec, ...]:
    """The inputs of a model with this clip length and frame size (a file records both, see
    keyreid/model_metadata.py); the defaults are KeyRe-ID's."""
    return (
        TensorSpec("frames", np.dtype(np.uint8), ("N", clip_frames, image_height, image_width, 3),
                   f"RGB frames already resized to {image_height}x{image_width}"),
        TensorSpec("keypoints", np.dtype(np.float32), ("N", clip_frames, NUM_KEYPOINTS, 3),
                   "(x, y, confidence) in original-crop pixels"),
        TensorSpec("crop_size", np.dtype(np.float32), ("N", clip_frames, 2),
                   "original crop (width, height) per frame"),
        TensorSpec("camera", np.dtype(np.int64), ("N",),
                   "camera index 0..C-1, or -1 for the mean camera embedding"),
    )


INPUTS = input_specs()


def output_specs(embed_dim: int = 768, clip_frames: int = CLIP_FRAMES) -> Tuple[TensorSpec, ...]:
    return (
        TensorSpec("embedding", np.dtype(np.float32), ("N", embedding_dim(embed_dim, clip_frames)),
                   "concat(global, part 1..6)"),
        TensorSpec("part_weights", np.dtype(np.float32), ("N", NUM_PATCHES, NUM_PARTS),
                   "part weights W, raster patch order"),
    )


def stack_clips(clips) -> "dict[str, np.ndarray]":
    """Per-clip dicts (``frames`` [4, 256, 128, 3], ``keypoints``, ``crop_size``, ``camera``) ->
    one engine feed laid out as docs/contract.md §6, in the contract's dtypes."""
    if not clips:
        raise ValueError("no clips to stack into a batch")
    return {spec.name: np.stack([np.asarray(clip[spec.name]) for clip in clips]).astype(spec.dtype, copy=False)
            for spec in INPUTS}


OUTPUTS = output_specs(768)
INPUT_NAMES = tuple(spec.name for spec in INPUTS)
OUTPUT_NAMES = tuple(spec.name for spec in OUTPUTS)
