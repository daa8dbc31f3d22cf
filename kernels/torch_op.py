"""Vectorised torch KeypointPartPool: keypoints -> part weights W [N, 128, 6], batched over clips
and frames, on CPU or CUDA, and exportable to ONNX.

The Gaussian window is separable, so each joint is two 1-D profiles, gy [256] and gx [128],
zero outside the joint's window. Per group:

- "mean": the sum of the group's windows is one batched matmul gyᵀ·gx over its joint slots
  (padded to 5, padding masked out); the number of windows covering each pixel is the same
  matmul on 0/1 indicators. The kernel's 1/sum normalisation is left out: the loader divides
  each channel by its max, so a constant factor cancels.
- "max": per group, the per-pixel max of the outer products gy ⊗ gx of its joints.

The loader transform (divide by channel max, min-max, (x - 0.5) / 0.5) is affine per channel,
so it is applied to the 16x16 patch means instead of to every pixel. Numeric conventions
(float32 scaling, truncation, the 0.1 threshold, non-finite joints) are those documented in
``keyreid.kernels.reference``.

For ONNX export the graph uses only traceable ops and no Python control flow on tensor values;
``mode`` is a Python string, so each mode is its own graph.
"""
import torch
from torch import Tensor

from keyreid.contract import CLIP_FRAMES, NUM_KEYPOINTS, NUM_PARTS, NUM_PATCHES, PATCH_SIZE
from keyreid.kernels.body_parts import (GROUP_SLOTS, JOINT_GROUPS, KERNEL_RADIUS, KERNEL_SIGMA,
                                        MIN_VISIBLE_CONFIDENCE_F32, MINMAX_EPS, RENDER_HEIGHT,
                                        RENDER_WIDTH, SLOT_IS_JOINT)
from keyreid.kernels.reference import check_mode


def _joint_pixels(keypoints: Tensor, crop_size: Tensor):
    """Pixels (px, py) [F, 17] in the render frame, truncated toward zero, and visibility."""
    x, y, confidence = keypoints.unbind(-1)            # F, 17
    crop_w, crop_h = crop_size.unsqueeze(-2).unbind(-1)  # F, 1
    x_r = (x * float(RENDER_WIDTH)) / crop_w
    y_r = (y * float(RENDER_HEIGHT)) / crop_h
    visible = ((confidence >= float(MIN_VISIBLE_CONFIDENCE_F32))   # False for NaN
               & torch.isfinite(x_r) & torch.isfinite(y_r))
    return torch.trunc(x_r), torch.trunc(y_r), visible


def _window_profile(pixel: Tensor, length: int):
    """1-D Gaussian profile g(n - pixel) [F, 17, length] and its 0/1 window indicator."""
    offsets = torch.arange(length, dtype=pixel.dtype, device=pixel.device) - pixel.unsqueeze(-1)
    covered = offsets.abs() <= KERNEL_RADIUS        # False for NaN pixels
    profile = torch.exp(-0.5 * (offsets / KERNEL_SIGMA) ** 2)
    return torch.where(covered, profile, torch.zeros_like(profile)), covered


def _render_heatmaps(keypoints: Tensor, crop_size: Tensor, mode: str) -> Tensor:
    """Raw group heatmaps [F, 6, 256, 128] (up to a per-channel constant for "mean")."""
    px, py, visible = _joint_pixels(keypoints, crop_size)
    if mode == "max":
        visible = visible & (px >= 0) & (px < RENDER_WIDTH) & (py >= 0) & (py < RENDER_HEIGHT)
    gy, covered_y = _window_profile(py, RENDER_HEIGHT)
    gx, covered_x = _window_profile(px, RENDER_WIDTH)
    # A skipped joint gets a zero row profile; its column profile is finite, so products are 0.
    gy = torch.where(visible.unsqueeze(-1), gy, torch.zeros_like(gy))

    if mode == "max":
        # One outer product per real joint (17, not 6 x 5 padded slots), max within each group.
        group_maps = []
        for joints in JOINT_GROUPS:
            group_map = gy[:, joints[0]].unsqueeze(-1) * gx[:, joints[0]].unsqueeze(-2)
            for joint in joints[1:]:
                joint_map = gy[:, joint].unsqueeze(-1) * gx[:, joint].unsqueeze(-2)
                group_map = torch.maximum(group_map, joint_map)
            group_maps.append(group_map)
        return torch.stack(group_maps, dim=1)                    # F, 6, 256, 128

    slots = torch.tensor(GROUP_SLOTS, dtype=torch.long, device=keypoints.device)   # 6, 5
    slot_is_joint = torch.tensor(SLOT_IS_JOINT, dtype=gy.dtype, device=gy.device).unsqueeze(-1)
    covers_y = (covered_y & visible.unsqueeze(-1)).to(gy.dtype)[:, slots] * slot_is_joint
    covers_x = covered_x.to(gx.dtype)[:, slots]
    gy_slots, gx_slots = gy[:, slots], gx[:, slots]     # F, 6, 5, 256 and F, 6, 5, 128
    total = torch.matmul((gy_slots * slot_is_joint).transpose(-1, -2), gx_slots)  # F, 6, 256, 128
    count = torch.matmul(covers_y.transpose(-1, -2), covers_x)
    return total / torch.clamp(count, min=1.0)


def _loader_patch_means(heatmaps: Tensor) -> Tensor:
    """Upstream loader transform followed by 16x16 patch means: [F, 6, 256, 128] -> [F, 6, 128]."""
    frames = heatmaps.shape[0]
    channel_max = heatmaps.amax(dim=(-2, -1))          # F, 6
    channel_min = heatmaps.amin(dim=(-2, -1))
    patch_means = heatmaps.reshape(
        frames, NUM_PARTS, RENDER_HEIGHT // PATCH_SIZE, PATCH_SIZE, RENDER_WIDTH // PATCH_SIZE,
        PATCH_SIZE).mean(dim=(3, 5)).reshape(frames, NUM_PARTS, NUM_PATCHES)
    positive = channel_max > 0
    divisor = torch.where(positive, channel_max, torch.ones_like(channel_max))
    zero = torch.zeros_like(channel_max)
    low = torch.where(positive, channel_min / divisor, zero)
    high = torch.where(positive, channel_max / divisor, zero)
    normalised = torch.where(positive.unsqueeze(-1), patch_means / divisor.unsqueeze(-1),
                             torch.zeros_like(patch_means))
    scaled = (normalised - low.unsqueeze(-1)) / (high - low + MINMAX_EPS).unsqueeze(-1)
    return (scaled - 0.5) / 0.5


def part_weights_torch(keypoints: Tensor, crop_size: Tensor, mode: str) -> Tensor:
    """Part weights W [N, 128, 6] float32 from keypoints [N, 4, 17, 3] and crop_size [N, 4, 2].

    Args:
        keypoints: (x, y, confidence) in original-crop pixels, float32.
        crop_size: (width, height) of each frame's original crop, float32.
        mode: "max", "mean" or "blank" (docs/contract.md §3); a Python string, not a tensor.
    """
    check_mode(mode)
    if mode == "blank":
        # Every channel is 0, so the loader maps it to -1 everywhere.
        return keypoints.new_full((keypoints.shape[0], NUM_PATCHES, NUM_PARTS), -1.0)
    frame_keypoints = keypoints.reshape(-1, NUM_KEYPOINTS, 3)     # F = N * 4
    frame_crop_size = crop_size.reshape(-1, 2)
    heatmaps = _render_heatmaps(frame_keypoints, frame_crop_size, mode)
    frame_weights = _loader_patch_means(heatmaps)                 # F, 6, 128
    clip_weights = frame_weights.reshape(-1, CLIP_FRAMES, NUM_PARTS, NUM_PATCHES).mean(dim=1)
    return clip_weights.transpose(1, 2)                           # N, 128, 6


class KeypointPartPool(torch.nn.Module):
    """``part_weights_torch`` as a module for one mode, for export and for the deploy model."""

    def __init__(self, mode: str = "max"):
        super().__init__()
        check_mode(mode)
        self.mode = mode

    def forward(self, keypoints: Tensor, crop_size: Tensor) -> Tensor:
        return part_weights_torch(keypoints, crop_size, self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
