"""The CUDA implementation of ``keyreid::keypoint_part_pool``: the fused kernel, launched on
torch's current stream without synchronising.

``keyreid.kernels.graph_op`` registers it for CUDA tensors, so the deploy model on a GPU runs
one kernel where the vectorised op (still the CPU implementation) renders 6 x 256 x 128 maps
per frame; the ONNX export is the same single node either way. The kernel is built on first
use per device (``cuda_build.compile_ptx``: NVRTC or nvcc, cached on disk). Where it cannot be
built or loaded (no cuda-python, no compiler), the op says why once and runs the vectorised op
on the GPU instead.
"""
import logging
from typing import Dict

import torch

from keyreid.contract import CLIP_FRAMES, NUM_KEYPOINTS, NUM_PARTS, NUM_PATCHES
from keyreid.errors import KeyreidError
from keyreid.kernels.cuda_driver import FusedKernel, fused_kernel
from keyreid.kernels.reference import check_mode
from keyreid.kernels.torch_op import part_weights_torch

log = logging.getLogger(__name__)
_UNAVAILABLE: Dict[int, str] = {}       # device ordinal -> why the fused kernel is not used


def _kernel_for(ordinal: int):
    if ordinal in _UNAVAILABLE:
        return None
    try:
        return fused_kernel(ordinal)
    except KeyreidError as exc:
        _UNAVAILABLE[ordinal] = str(exc)
        log.warning("keypoint_part_pool on cuda:%d runs the unfused torch op: %s", ordinal, exc)
        return None


def fused_kernel_unavailable(ordinal: int) -> str:
    """Why the fused kernel is not used on device ``ordinal`` ('' when it is, or untried)."""
    return _UNAVAILABLE.get(ordinal, "")


def part_weights_fused(keypoints: torch.Tensor, crop_size: torch.Tensor, mode: str) -> torch.Tensor:
    """Part weights W [N, 128, 6] float32 of CUDA tensors keypoints [N, 4, 17, 3] and
    crop_size [N, 4, 2], by the fused kernel on the current stream."""
    check_mode(mode)
    num_clips = keypoints.shape[0] if keypoints.dim() else 0
    if tuple(keypoints.shape) != (num_clips, CLIP_FRAMES, NUM_KEYPOINTS, 3) or \
            tuple(crop_size.shape) != (num_clips, CLIP_FRAMES, 2):
        raise KeyreidError(f"keypoints must be [N, {CLIP_FRAMES}, {NUM_KEYPOINTS}, 3] and crop_size "
                           f"[N, {CLIP_FRAMES}, 2], got {list(keypoints.shape)} and {list(crop_size.shape)}")
    if crop_size.device != keypoints.device:
        raise KeyreidError(f"keypoints are on {keypoints.device} but crop_size is on {crop_size.device}")
    device = keypoints.device
    ordinal = device.index if device.index is not None else torch.cuda.current_device()
    keypoints = keypoints.to(torch.float32).contiguous()
    crop_size = crop_size.to(torch.float32).contiguous()
    kernel = _kernel_for(ordinal)
    if kernel is None:
        return part_weights_torch(keypoints, crop_size, mode)
    weights = torch.empty((num_clips, NUM_PATCHES, NUM_PARTS), dtype=torch.float32, device=device)
    if num_clips:
        launch(kernel, mode, keypoints, crop_size, weights)
    return weights


def launch(kernel: FusedKernel, mode: str, keypoints: torch.Tensor, crop_size: torch.Tensor,
           weights: torch.Tensor) -> None:
    """The kernel on contiguous float32 CUDA tensors, writing into ``weights``, on the current
    stream of their device."""
    stream = torch.cuda.current_stream(weights.device).cuda_stream
    kernel.launch(mode, keypoints.data_ptr(), crop_size.data_ptr(), weights.data_ptr(),
                  keypoints.shape[0], stream)
