"""The KeypointPartPool op (docs/contract.md §3): COCO keypoints of a clip -> part weights W [N, 128, 6].

Forms of the op, all tested against the NumPy reference:

- ``keyreid.kernels.reference``: plain NumPy loops like upstream (the definition).
- ``keyreid.kernels.torch_op``: vectorised torch, CPU and CUDA, exportable to ONNX.
- ``keyreid.kernels.onnx_function``: the ``keyreid::KeypointPartPool`` ONNX local function.
- ``keyreid.kernels.graph_op``: the torch custom op that exports as that one ONNX node; on
  CUDA tensors it runs the fused kernel (``keyreid.kernels.cuda_op``).
- ``keypoint_part_pool.cu`` / ``.cuh``: the fused CUDA kernel, one entry point per mode.
  ``keyreid.kernels.cuda_build`` holds its launch geometry and builds PTX for one device
  (with ``cuda_compilers``: NVRTC or nvcc); ``cuda_fatbin`` builds every architecture at once;
  ``keyreid.kernels.cuda_driver`` loads and launches it through the CUDA driver API;
  ``keyreid.kernels.host_build`` runs its arithmetic on the CPU, for tests without a GPU.
- ``keyreid.kernels.trt_plugin``: the fused kernel as a TensorRT AOT plugin (its PTX goes into
  the ``.plan``); ``export/to_tensorrt.py --plugin aot`` registers it.

Importing this package does not import torch; ``part_weights`` falls back to the NumPy
reference on machines without it.
"""
import numpy as np

from keyreid.contract import (CLIP_FRAMES, DEFAULT_HEATMAP_MODE, NUM_KEYPOINTS, NUM_PARTS,
                              NUM_PATCHES)
from keyreid.errors import KeyreidError
from keyreid.lazy import require
from keyreid.kernels.reference import check_mode, part_weights_reference

__all__ = ["part_weights", "part_weights_reference"]

# The torch op holds [frames, 6, 256, 128] maps; on CPU, a few clips at a time keep them in
# cache, which measured 3-10x faster per clip than 16 clips at once.
CLIPS_PER_CPU_CHUNK = 2


def _torch_or_none():
    try:
        return require("torch")
    except KeyreidError:
        return None


def part_weights(keypoints, crop_size, mode: str = DEFAULT_HEATMAP_MODE) -> np.ndarray:
    """Part weights W [N, 128, 6] float32 in raster patch order.

    Args:
        keypoints: [N, 4, 17, 3] (x, y, confidence) in original-crop pixels.
        crop_size: [N, 4, 2] original crop (width, height) per frame.
        mode: heatmap mode, "max", "mean" or "blank".

    Uses the vectorised torch op on CPU when torch is importable, else the NumPy reference.
    """
    check_mode(mode)
    # Copies: torch.from_numpy needs writable arrays and the caller's stay untouched.
    keypoints = np.array(keypoints, dtype=np.float32)
    crop_size = np.array(crop_size, dtype=np.float32)
    if keypoints.ndim != 4 or keypoints.shape[1:] != (CLIP_FRAMES, NUM_KEYPOINTS, 3):
        raise KeyreidError(f"keypoints must have shape [N, {CLIP_FRAMES}, {NUM_KEYPOINTS}, 3], "
                           f"got {list(keypoints.shape)}")
    if crop_size.shape != (keypoints.shape[0], CLIP_FRAMES, 2):
        raise KeyreidError(f"crop_size must have shape [N, {CLIP_FRAMES}, 2] with N = "
                           f"{keypoints.shape[0]} as in keypoints, got {list(crop_size.shape)}")
    torch = _torch_or_none()
    if torch is None:
        return part_weights_reference(keypoints, crop_size, mode)
    from keyreid.kernels.torch_op import part_weights_torch
    weights = np.empty((keypoints.shape[0], NUM_PATCHES, NUM_PARTS), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, keypoints.shape[0], CLIPS_PER_CPU_CHUNK):
            chunk = slice(start, start + CLIPS_PER_CPU_CHUNK)
            weights[chunk] = part_weights_torch(torch.from_numpy(keypoints[chunk]),
                                                torch.from_numpy(crop_size[chunk]), mode).numpy()
    return weights
