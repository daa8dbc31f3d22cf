"""Plain-NumPy reference of KeypointPartPool (docs/contract.md §3): keypoints -> part weights W.

It loops over groups and joints and slices a clipped window like the upstream generators
(``keypoint/keypoint_to_mask.py`` for "max", ``keypoint/keypoints_to_masks.py`` at 320048a for
"mean"), then applies the upstream loader transform literally. It is slow on purpose: every faster
implementation is tested against it.

Numeric conventions, identical in every implementation:

- Keypoints are float32. They are scaled into the 256x128 render frame in float32 as
  ``x_r = (x * 128) / w`` and ``y_r = (y * 256) / h`` (multiply first, then divide), and the
  joint's pixel is ``(int(x_r), int(y_r))``, truncation toward zero (x_r = -0.5 gives pixel 0).
- A joint counts iff ``conf > 0.1`` in float64, which for float32 confidences equals
  ``conf >= float32(0.1)``. A NaN confidence does not count.
- A joint whose scaled x or y is not finite (NaN or inf keypoint, zero crop size) is skipped.
- "max": kernel / kernel.max(); per pixel the max over the group's joints; a joint whose pixel
  lies outside [0, 128) x [0, 256) is skipped.
- "mean": kernel / kernel.sum(); per pixel the mean over the group's joints whose window covers
  it, 0 where none does. Upstream's slices go wrong for windows partly or wholly off the frame
  (negative stop indices wrap around); here a window is intersected with the frame and skipped
  when the intersection is empty.
- "blank": zeros (what the current upstream generator really writes).
- Loader transform in float32 like upstream (torch float32): divide each channel by its max when
  the max is > 0; min-max ``(x - min) / (max - min + 1e-6)``; ``(x - 0.5) / 0.5``. No resize:
  we render at 256x128. Patch and frame means are taken in float64 and the result cast to float32.
"""
import numpy as np

from keyreid.contract import (CLIP_FRAMES, HEATMAP_MODES, NUM_KEYPOINTS, NUM_PARTS, NUM_PATCHES,
                              PATCH_SIZE)
from keyreid.errors import KeyreidError
from keyreid.kernels.body_parts import (CONFIDENCE_THRESHOLD, JOINT_GROUPS, KERNEL_RADIUS,
                                        KERNEL_SIGMA, MINMAX_EPS, RENDER_HEIGHT, RENDER_WIDTH)


def check_mode(mode: str) -> None:
    if mode not in HEATMAP_MODES:
        raise KeyreidError(f"unknown heatmap mode {mode!r}: expected one of "
                           f"{', '.join(HEATMAP_MODES)}")


def gaussian_kernel(mode: str) -> np.ndarray:
    """The 2-D window [23, 23] in float64, normalised by its max ("max") or its sum ("mean")."""
    offsets = np.arange(-KERNEL_RADIUS, KERNEL_RADIUS + 1, dtype=np.float64)
    window_1d = np.exp(-0.5 * (offsets / KERNEL_SIGMA) ** 2)
    kernel = np.outer(window_1d, window_1d)
    return kernel / (kernel.max() if mode == "max" else kernel.sum())


def scaled_joint_pixel(x: np.float32, y: np.float32, crop_w: np.float32, crop_h: np.float32):
    """The joint's pixel in the render frame, or None when the scaled position is not finite."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x_r = (np.float32(x) * np.float32(RENDER_WIDTH)) / np.float32(crop_w)
        y_r = (np.float32(y) * np.float32(RENDER_HEIGHT)) / np.float32(crop_h)
    if not (np.isfinite(x_r) and np.isfinite(y_r)):
        return None
    return int(x_r), int(y_r)


def render_heatmaps_reference(keypoints, crop_wh, mode: str) -> np.ndarray:
    """Raw group heatmaps [6, 256, 128] float64 of one frame, before the loader transform.

    keypoints: [17, 3] (x, y, confidence) in crop pixels; crop_wh: (width, height) of the crop.
    """
    check_mode(mode)
    keypoints = np.asarray(keypoints, dtype=np.float32).reshape(NUM_KEYPOINTS, 3)
    crop_w, crop_h = np.asarray(crop_wh, dtype=np.float32).reshape(2)
    heatmaps = np.zeros((NUM_PARTS, RENDER_HEIGHT, RENDER_WIDTH), dtype=np.float64)
    if mode == "blank":
        return heatmaps
    kernel = gaussian_kernel(mode)
    r = KERNEL_RADIUS

    for part, joints in enumerate(JOINT_GROUPS):
        total = np.zeros((RENDER_HEIGHT, RENDER_WIDTH))
        count = np.zeros((RENDER_HEIGHT, RENDER_WIDTH))
        for joint in joints:
            x, y, confidence = keypoints[joint]
            # float64 compare, as upstream under NumPy 1.x; NumPy 2 would compare a float32
            # scalar with 0.1 in float32 and drop a confidence of exactly float32(0.1).
            if not float(confidence) > CONFIDENCE_THRESHOLD:
                continue
            pixel = scaled_joint_pixel(x, y, crop_w, crop_h)
            if pixel is None:
                continue
            px, py = pixel
            if mode == "max" and not (0 <= px < RENDER_WIDTH and 0 <= py < RENDER_HEIGHT):
                continue
            top, bottom = max(0, py - r), min(RENDER_HEIGHT, py + r + 1)
            left, right = max(0, px - r), min(RENDER_WIDTH, px + r + 1)
            if top >= bottom or left >= right:      # the window misses the frame
                continue
            sub_kernel = kernel[top - py + r:bottom - py + r, left - px + r:right - px + r]
            if mode == "max":
                window = total[top:bottom, left:right]
                total[top:bottom, left:right] = np.maximum(window, sub_kernel)
            else:
                total[top:bottom, left:right] += sub_kernel
                count[top:bottom, left:right] += 1
        if mode == "mean":
            total = np.where(count > 0, total / np.maximum(count, 1), 0.0)
        heatmaps[part] = total
    return heatmaps


def loader_transform_reference(heatmaps: np.ndarray) -> np.ndarray:
    """Upstream's heatmap loader on one frame [6, 256, 128], in float32 like its torch tensors."""
    maps = np.asarray(heatmaps, dtype=np.float32).copy()
    for channel in range(maps.shape[0]):
        channel_max = maps[channel].max()
        maps[channel] = maps[channel] / channel_max if channel_max > 0 else 0.0
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    scaled = (maps - low) / (high - low + np.float32(MINMAX_EPS))
    return (scaled - np.float32(0.5)) / np.float32(0.5)


def patch_means_reference(maps: np.ndarray) -> np.ndarray:
    """Mean of each 16x16 patch per channel: [6, 256, 128] -> [128, 6], raster patch order."""
    channels, height, width = maps.shape
    patches = maps.astype(np.float64).reshape(
        channels, height // PATCH_SIZE, PATCH_SIZE, width // PATCH_SIZE, PATCH_SIZE)
    return patches.mean(axis=(2, 4)).reshape(channels, -1).T


def part_weights_reference(keypoints, crop_size, mode: str) -> np.ndarray:
    """Part weights W [N, 128, 6] float32 from keypoints [N, 4, 17, 3] and crop_size [N, 4, 2]."""
    check_mode(mode)
    keypoints = np.asarray(keypoints, dtype=np.float32)
    crop_size = np.asarray(crop_size, dtype=np.float32)
    num_clips = keypoints.shape[0]
    weights = np.zeros((num_clips, CLIP_FRAMES, NUM_PATCHES, NUM_PARTS))
    for clip in range(num_clips):
        for frame in range(CLIP_FRAMES):
            raw = render_heatmaps_reference(keypoints[clip, frame], crop_size[clip, frame], mode)
            weights[clip, frame] = patch_means_reference(loader_transform_reference(raw))
    return weights.mean(axis=1).astype(np.float32)
