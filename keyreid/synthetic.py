"""Realistic synthetic clips for tests, benchmarks and the demo (NumPy only, no torch; OpenCV
only to write tracklet folders).

Uniform noise misses the cases that matter for KeypointPartPool, so the poses here look like
OpenPifPaf output on pedestrian crops: a standing skeleton with head joints a few pixels apart,
occluded joints (confidence <= 0.1, or exactly [0, 0, 0] as OpenPifPaf writes undetected ones),
joints just outside the crop, and now and then a body part with no valid joint in any frame.
"""
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from keyreid.contract import CLIP_FRAMES, IMAGE_HEIGHT, IMAGE_WIDTH, JOINT_GROUPS, MEAN_CAMERA, NUM_KEYPOINTS
from keyreid.errors import KeyreidError
from keyreid.lazy import require

MARS_CROP_SIZE = (IMAGE_WIDTH, IMAGE_HEIGHT)          # (width, height) = (128, 256)
# (width, height): MARS, a small low-resolution crop, tall-thin, large, and a wide one.
DEFAULT_CROP_SIZES = (MARS_CROP_SIZE, (64, 128), (90, 300), (170, 411), (128, 64))

# Standing person facing the camera, (x, y) as fractions of the crop (width, height);
# the person's left side is on the image's right. Head joints are offsets from the nose in
# units of the crop width, so they stay within a few pixels of each other.
_NOSE = (0.50, 0.09)
_HEAD_OFFSETS = ((0.0, 0.0), (0.022, -0.012), (-0.022, -0.012), (0.045, -0.004), (-0.045, -0.004))
_BODY = (
    (0.65, 0.20), (0.35, 0.20),     # shoulders (left, right)
    (0.71, 0.35), (0.29, 0.35),     # elbows
    (0.70, 0.48), (0.30, 0.48),     # wrists
    (0.60, 0.52), (0.40, 0.52),     # hips
    (0.60, 0.72), (0.40, 0.72),     # knees
    (0.60, 0.93), (0.40, 0.93),     # ankles
)
_SWINGING = np.array([9, 10, 13, 14, 15, 16])          # wrists, knees, ankles

OCCLUDED_LOW_CONFIDENCE = 0.08      # per joint and frame: confidence in [0, 0.1]
UNDETECTED = 0.06                   # per joint and frame: [0, 0, 0]
JUST_OUTSIDE = 0.04                 # per joint and frame: up to 3 px outside the crop
JUST_LEFT_OF_ZERO = 0.03            # per joint and frame: x in (-1, 0), truncates to pixel 0
MISSING_GROUP = 0.15                # per clip: one body part undetected in every frame


def _standing_pose(rng: np.random.Generator, crop_w: np.ndarray, crop_h: np.ndarray) -> np.ndarray:
    """(x, y) [4, 17, 2] in crop pixels: one person per clip, walking a little between frames."""
    frames = crop_w.shape[0]
    template = np.zeros((NUM_KEYPOINTS, 2))
    template[:5, 0] = _NOSE[0] + np.array([o[0] for o in _HEAD_OFFSETS])
    template[:5, 1] = _NOSE[1] + np.array([o[1] for o in _HEAD_OFFSETS]) * (crop_w[0] / crop_h[0])
    template[5:] = _BODY
    if rng.random() < 0.5:                                  # seen from behind: mirror
        template[:, 0] = 1.0 - template[:, 0]
    scale = rng.uniform(0.85, 1.05)
    shift = rng.uniform([-0.05, -0.03], [0.05, 0.03])
    template = 0.5 + (template - 0.5) * scale + shift
    phase = rng.uniform(0, 2 * np.pi) + np.arange(frames) * rng.uniform(0.3, 0.8)
    pose = np.repeat(template[None], frames, axis=0)
    pose[:, _SWINGING, 0] += (0.05 * np.sin(phase))[:, None] * np.where(_SWINGING % 2, 1, -1)
    pixels = pose * np.stack([crop_w, crop_h], axis=-1)[:, None, :]
    return pixels + rng.normal(0.0, 1.0, pixels.shape)


def realistic_keypoints(rng: np.random.Generator, n_clips: int,
                        crop_sizes: Optional[Sequence[Tuple[int, int]]] = None,
                        size_jitter_px: int = 2) -> Tuple[np.ndarray, np.ndarray]:
    """Keypoints [N, 4, 17, 3] and crop_size [N, 4, 2], float32, like OpenPifPaf on person crops.

    Args:
        rng: the random generator (the result depends only on it).
        n_clips: N.
        crop_sizes: (width, height) choices, one drawn per clip; default DEFAULT_CROP_SIZES.
        size_jitter_px: per-frame integer jitter of sizes other than MARS's 128x256 (tracker
            boxes change from frame to frame; MARS crops are all resized to one size).
    """
    sizes = np.asarray(DEFAULT_CROP_SIZES if crop_sizes is None else crop_sizes, dtype=np.float64)
    crop_size = np.repeat(sizes[rng.integers(0, len(sizes), n_clips)][:, None], CLIP_FRAMES, axis=1)
    is_mars = np.all(crop_size == MARS_CROP_SIZE, axis=-1, keepdims=True)
    jitter = rng.integers(-size_jitter_px, size_jitter_px + 1, crop_size.shape)
    crop_size = np.where(is_mars, crop_size, np.maximum(crop_size + jitter, 8))

    keypoints = np.zeros((n_clips, CLIP_FRAMES, NUM_KEYPOINTS, 3))
    for clip in range(n_clips):
        crop_w, crop_h = crop_size[clip, :, 0], crop_size[clip, :, 1]
        keypoints[clip, :, :, :2] = _standing_pose(rng, crop_w, crop_h)
    keypoints[..., 2] = rng.uniform(0.3, 0.98, keypoints.shape[:-1])

    draw = rng.random(keypoints.shape[:-1])
    outside = draw < JUST_OUTSIDE
    left_of_zero = (draw >= JUST_OUTSIDE) & (draw < JUST_OUTSIDE + JUST_LEFT_OF_ZERO)
    low_confidence = (draw >= 0.1) & (draw < 0.1 + OCCLUDED_LOW_CONFIDENCE)
    undetected = (draw >= 0.2) & (draw < 0.2 + UNDETECTED)

    # Just outside: past one of the four borders by up to 3 px, still confidently detected.
    border = rng.integers(0, 4, keypoints.shape[:-1])
    past = rng.uniform(0.01, 3.0, keypoints.shape[:-1])
    limit_w, limit_h = crop_size[..., 0:1], crop_size[..., 1:2]
    keypoints[..., 0] = np.where(outside & (border == 0), -past, keypoints[..., 0])
    keypoints[..., 0] = np.where(outside & (border == 1), limit_w + past - 0.01, keypoints[..., 0])
    keypoints[..., 1] = np.where(outside & (border == 2), -past, keypoints[..., 1])
    keypoints[..., 1] = np.where(outside & (border == 3), limit_h + past - 0.01, keypoints[..., 1])
    keypoints[..., 0] = np.where(left_of_zero, -rng.uniform(0.01, 0.99, draw.shape),
                                 keypoints[..., 0])
    keypoints[..., 2] = np.where(low_confidence, rng.uniform(0.0, 0.1, draw.shape),
                                 keypoints[..., 2])
    keypoints[undetected] = 0.0

    for clip in np.flatnonzero(rng.random(n_clips) < MISSING_GROUP):
        keypoints[clip, :, list(JOINT_GROUPS[rng.integers(0, len(JOINT_GROUPS))])] = 0.0
    return keypoints.astype(np.float32), crop_size.astype(np.float32)


def synthetic_frames(rng: np.random.Generator, n_clips: int) -> np.ndarray:
    """RGB frames uint8 [N, 4, 256, 128, 3]: a shaded background and a two-coloured figure."""
    rows = np.linspace(0.0, 1.0, IMAGE_HEIGHT)[:, None, None]
    cols = np.linspace(-1.0, 1.0, IMAGE_WIDTH)[None, :, None]
    frames = np.empty((n_clips, CLIP_FRAMES, IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8)
    for clip in range(n_clips):
        top_bg, bottom_bg, shirt, trousers = rng.uniform(0, 255, (4, 3))
        background = top_bg * (1 - rows) + bottom_bg * rows
        for frame in range(CLIP_FRAMES):
            centre = rng.normal(0.0, 0.05)
            figure = np.abs(cols - centre) < 0.35 * (1.0 - 0.3 * np.abs(rows - 0.5))
            figure &= (rows > 0.05) & (rows < 0.95)
            colour = np.where(rows < 0.5, shirt, trousers)
            noise = rng.normal(0.0, 8.0, (IMAGE_HEIGHT, IMAGE_WIDTH, 3))
            image = np.where(figure, colour, background) + noise
            frames[clip, frame] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


def synthetic_feed(num_clips: int, num_cameras: Optional[int], seed: int = 0,
                   crop_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> Dict[str, np.ndarray]:
    """An engine feed (docs/contract.md §6) of ``num_clips`` synthetic clips with realistic poses.

    The one source of sample clips for the export's verification, ``compare.py``, the
    benchmarks and the tests. Cameras cycle -1, 0, ..., C-1 (only -1 when ``num_cameras`` is
    None, which is all an engine of unknown camera count accepts).

    Args:
        crop_sizes: (width, height) choices for the keypoints; default DEFAULT_CROP_SIZES.
    """
    rng = np.random.default_rng(seed)
    keypoints, crop_size = realistic_keypoints(rng, num_clips, crop_sizes=crop_sizes)
    camera = (np.arange(num_clips) % ((num_cameras or 0) + 1) + MEAN_CAMERA).astype(np.int64)
    return {"frames": synthetic_frames(rng, num_clips), "keypoints": keypoints,
            "crop_size": crop_size, "camera": camera}


def write_synthetic_tracklet(folder: Path, num_frames: int, rng: np.random.Generator,
                             crop_size: Tuple[int, int] = MARS_CROP_SIZE, size_jitter_px: int = 0,
                             suffix: str = ".jpg", stems: Optional[Sequence[str]] = None,
                             frames: Optional[np.ndarray] = None, without_pose: Sequence[int] = ()) -> Path:
    """One tracklet folder as ``infer.py`` reads it: frame files and same-stem ``.pose`` files.

    The one writer of synthetic tracklet folders for the demo, the benchmarks and the tests.
    Frame i is saved at its own crop size (``crop_size`` jittered by up to ``size_jitter_px``
    per frame, as a tracker's boxes are; MARS's 128x256 is never jittered), with keypoints in
    that frame's pixels.

    Args:
        stems: file names without suffix, one per frame; default 0000, 0001, ...
        frames: RGB uint8 [num_frames, 256, 128, 3] to save (resized to each crop); default
            ``synthetic_frames``.
        without_pose: frame indices that get no ``.pose`` file.
    """
    cv2 = require("cv2")
    clips = -(-num_frames // CLIP_FRAMES)
    if frames is None:
        frames = synthetic_frames(rng, clips).reshape(-1, IMAGE_HEIGHT, IMAGE_WIDTH, 3)
    keypoints, crop_sizes = realistic_keypoints(rng, clips, crop_sizes=[crop_size], size_jitter_px=size_jitter_px)
    keypoints, crop_sizes = keypoints.reshape(-1, NUM_KEYPOINTS, 3), crop_sizes.reshape(-1, 2).astype(int)
    stems = stems or [f"{index:04d}" for index in range(num_frames)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(num_frames):
        width, height = crop_sizes[index]
        frame = frames[index]
        if (width, height) != (IMAGE_WIDTH, IMAGE_HEIGHT):
            frame = cv2.resize(frame, (int(width), int(height)), interpolation=cv2.INTER_AREA)
        if not cv2.imwrite(str(folder / f"{stems[index]}{suffix}"), np.ascontiguousarray(frame[..., ::-1])):
            raise KeyreidError(f"cannot write frame {folder / (stems[index] + suffix)}")
        if index not in without_pose:
            (folder / f"{stems[index]}.pose").write_text(json.dumps(keypoints[index].tolist()))
    return folder
