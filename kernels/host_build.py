"""The fused kernel's arithmetic on the CPU: keypoint_part_pool.cuh built with a host C++
compiler and called through ctypes.

This is how CI, which has no GPU, checks the CUDA kernel's maths against the NumPy reference:
``keypoint_part_pool_host.cpp`` runs the kernel's blocks and threads one after another with the
header's own functions. The library is built once per source hash and compiler into
``cuda_build.cache_dir()``, never into the repository.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from keyreid.contract import CLIP_FRAMES, NUM_KEYPOINTS, NUM_PARTS, NUM_PATCHES
from keyreid.errors import KeyreidError
from keyreid.files import write_bytes
from keyreid.kernels.cuda_build import HEADER, KERNEL_DIR, MODE_INDEX, cache_dir
from keyreid.kernels.reference import check_mode

HOST_SOURCE = KERNEL_DIR / "keypoint_part_pool_host.cpp"
# No fast-math and no fused multiply-add: the host build keeps IEEE float32 semantics.
CXX_FLAGS = ("-O2", "-std=c++14", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")


def find_cxx() -> str:
    """The host C++ compiler: $CXX, else g++ or clang++ on PATH."""
    for candidate in (os.environ.get("CXX"), "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise KeyreidError("no C++ compiler found for the host build of the kernel: install g++ or set CXX")


def build_host_library() -> Path:
    """Compile the host build (cached) and return the shared library's path."""
    cxx = find_cxx()
    digest = hashlib.sha256()
    for part in (HEADER.read_bytes(), HOST_SOURCE.read_bytes(), cxx.encode(), " ".join(CXX_FLAGS).encode()):
        digest.update(part)
    library = cache_dir() / f"keypoint_part_pool_host-{digest.hexdigest()[:16]}.so"
    if library.is_file():
        return library
    with tempfile.TemporaryDirectory(prefix="keyreid-host-") as scratch:
        built = Path(scratch) / library.name
        result = subprocess.run([cxx, *CXX_FLAGS, "-o", str(built), str(HOST_SOURCE)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise KeyreidError(f"{cxx} could not build the kernel's host arithmetic: "
                               f"{(result.stderr or result.stdout).strip()}")
        write_bytes(library, built.read_bytes())     # whole, so a concurrent build never
    return library                                   # loads half a library


_FLOATS = ctypes.POINTER(ctypes.c_float)


@lru_cache(maxsize=1)
def host_library() -> ctypes.CDLL:
    library = ctypes.CDLL(str(build_host_library()))
    library.keypoint_part_pool_host.argtypes = [ctypes.c_int, _FLOATS, _FLOATS, _FLOATS, ctypes.c_int]
    library.keypoint_part_pool_host.restype = ctypes.c_int
    library.keypoint_part_pool_host_constant.argtypes = [ctypes.c_char_p]
    library.keypoint_part_pool_host_constant.restype = ctypes.c_double
    library.keypoint_part_pool_host_group_joint.argtypes = [ctypes.c_int, ctypes.c_int]
    library.keypoint_part_pool_host_group_joint.restype = ctypes.c_int
    return library


def header_constant(name: str) -> float:
    """The value of the header's ``KRP_<name>`` as the compiler sees it."""
    value = host_library().keypoint_part_pool_host_constant(name.encode())
    if np.isnan(value):
        raise KeyreidError(f"the host build does not export the constant {name}")
    return value


def header_group_joint(part: int, slot: int) -> int:
    """COCO joint index of slot ``slot`` of part ``part`` in the header, -1 for none."""
    return host_library().keypoint_part_pool_host_group_joint(part, slot)


def part_weights_host(keypoints, crop_size, mode: str) -> np.ndarray:
    """Part weights W [N, 128, 6] float32 from the kernel's arithmetic run on the CPU."""
    check_mode(mode)
    keypoints = np.ascontiguousarray(keypoints, dtype=np.float32)
    crop_size = np.ascontiguousarray(crop_size, dtype=np.float32)
    num_clips = keypoints.shape[0]
    if keypoints.shape != (num_clips, CLIP_FRAMES, NUM_KEYPOINTS, 3) or \
            crop_size.shape != (num_clips, CLIP_FRAMES, 2):
        raise KeyreidError(f"expected keypoints [N, 4, 17, 3] and crop_size [N, 4, 2], got "
                           f"{list(keypoints.shape)} and {list(crop_size.shape)}")
    weights = np.full((num_clips, NUM_PATCHES, NUM_PARTS), np.nan, dtype=np.float32)
    status = host_library().keypoint_part_pool_host(
        MODE_INDEX[mode], keypoints.ctypes.data_as(_FLOATS), crop_size.ctypes.data_as(_FLOATS),
        weights.ctypes.data_as(_FLOATS), num_clips)
    if status != 0:
        raise KeyreidError(f"the host build of the kernel rejected its arguments (status {status})")
    return weights
