"""The fused CUDA KeypointPartPool kernel for one device: its source, launch geometry and PTX.

Shared by the torch CUDA op (``keyreid.kernels.cuda_op``), the TensorRT plugin and
``benchmarks/gpu_check.py``. Importing it needs neither torch, nor CUDA, nor a GPU, nor a
compiler: those are looked for only when PTX is asked for (``cuda_compilers``).

- ``kernel_name(mode)`` and ``launch_config(num_clips)``: what a launcher hands the driver.
  Arguments are ``(keypoints, crop_size, num_clips, part_weights)``: inputs, one int32, then
  the output, the order in which a TensorRT AOT plugin passes its tensors and extra arguments.
- ``compile_ptx(compute_capability)``: PTX for one device, with NVRTC (``cuda.bindings.nvrtc``)
  where it imports, else ``nvcc``, cached on disk per source hash, architecture and compiler.
  It compiles on the machine that runs the kernel because PTX from a newer toolkit does not
  load on an older driver (CUDA 13 PTX on a JetPack 6 / CUDA 12 Jetson).
  ``build_nvcc_fallback_image`` is what ``cuda_driver`` loads instead when the driver still
  refuses that PTX (an NVRTC wheel newer than the driver): an nvcc cubin for the device.

Every architecture at once (a fatbin for CI and packaging) is ``cuda_fatbin``.
"""
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from keyreid.contract import HEATMAP_MODES, NUM_PARTS, NUM_PATCHES
from keyreid.errors import KeyreidError
from keyreid.kernels import cuda_compilers
from keyreid.files import write_bytes
from keyreid.kernels.reference import check_mode

KERNEL_DIR = Path(__file__).resolve().parent
HEADER = KERNEL_DIR / "keypoint_part_pool.cuh"
KERNEL_SOURCE = KERNEL_DIR / "keypoint_part_pool.cu"
_INCLUDE = '#include "keypoint_part_pool.cuh"'

# Mirrors of the header's KRP_* launch constants (tests/test_cuda_kernel.py checks them against
# the compiled header): one block per clip and part, one thread per half patch of each frame.
BLOCKS_PER_CLIP = NUM_PARTS                         # 6
THREADS_PER_BLOCK = NUM_PATCHES * 2                 # 256
DYNAMIC_SHARED_BYTES = 0                            # all shared memory is static (4.7 KB)
MODE_INDEX = {"max": 0, "mean": 1, "blank": 2}      # keypoint_part_pool_launch's `mode`
assert tuple(MODE_INDEX) == HEATMAP_MODES

CACHE_ENV = "KEYREID_CACHE_DIR"


def kernel_name(mode: str) -> str:
    """The ``extern "C"`` entry point of one heatmap mode, e.g. ``keypoint_part_pool_max``."""
    check_mode(mode)
    return f"keypoint_part_pool_{mode}"


def launch_config(num_clips: int) -> Tuple[Tuple[int, int, int], Tuple[int, int, int], int]:
    """((grid x, y, z), (block x, y, z), dynamic shared bytes) for ``num_clips`` clips."""
    if int(num_clips) < 1:
        raise KeyreidError(f"the kernel needs at least one clip, got num_clips = {num_clips}")
    return (int(num_clips) * BLOCKS_PER_CLIP, 1, 1), (THREADS_PER_BLOCK, 1, 1), DYNAMIC_SHARED_BYTES


def kernel_source() -> str:
    """The .cu with its header inlined: one self-contained string, ready for NVRTC."""
    source = KERNEL_SOURCE.read_text()
    if _INCLUDE not in source:
        raise KeyreidError(f"{KERNEL_SOURCE} no longer includes its header as {_INCLUDE}")
    return source.replace(_INCLUDE, HEADER.read_text(), 1)


def source_hash() -> str:
    """A short hash of ``kernel_source()``: the cache key of everything built from it."""
    return hashlib.sha256(kernel_source().encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where built kernels are kept: $KEYREID_CACHE_DIR, else ~/.cache/keyreid/kernels."""
    root = os.environ.get(CACHE_ENV)
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "keyreid" / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyreidError(f"cannot create the kernel cache {path}: {exc.strerror or exc}; "
                           f"set {CACHE_ENV} to a writable folder") from exc
    return path


def _check_capability(compute_capability) -> Tuple[int, int]:
    try:
        major, minor = (int(part) for part in compute_capability)
    except (TypeError, ValueError):
        raise KeyreidError(f"compute capability must be (major, minor), got {compute_capability!r}") from None
    if major < 1 or not 0 <= minor < 10:
        raise KeyreidError(f"compute capability must be (major, minor), got {compute_capability!r}")
    return major, minor


def _best_arch(supported: Sequence[int], major: int, minor: int) -> int:
    """The newest virtual architecture the compiler knows that the device can run (PTX is
    forward compatible), e.g. 90 for an sm_120 device and a compiler that stops at 90."""
    wanted = 10 * major + minor
    usable = [arch for arch in supported if arch <= wanted]
    if not usable:
        raise KeyreidError(f"the CUDA compiler supports none of the architectures up to "
                           f"sm_{wanted} (it knows {', '.join(map(str, sorted(supported)))})")
    return max(usable)


@dataclass(frozen=True)
class KernelImage:
    """What the driver loads: PTX text (JIT-compiled by the driver) or a cubin (loaded as is)."""
    data: bytes
    kind: str           # "ptx" or "cubin"
    compiler: str       # the compiler and its version, e.g. "nvrtc13.0" or "nvcc13.0"


def build_ptx_image(compute_capability: Tuple[int, int], compiler: Optional[str] = None) -> KernelImage:
    """PTX of all three entry points for a device of ``compute_capability`` (major, minor).

    ``compiler`` is "nvrtc" (``cuda.bindings.nvrtc``), "nvcc", or None for NVRTC when it
    loads, else nvcc. The PTX targets the newest architecture the compiler knows that the
    device runs, and is cached in ``cache_dir()`` under the source hash, that architecture and
    the compiler's version, so later calls on a device read one file.
    """
    if compiler not in (None, "nvrtc", "nvcc"):
        raise KeyreidError(f"unknown CUDA compiler {compiler!r}: expected nvrtc or nvcc")
    major, minor = _check_capability(compute_capability)
    nvrtc = cuda_compilers.load_nvrtc() if compiler in (None, "nvrtc") else None
    if nvrtc is not None:
        arch = _best_arch(nvrtc.supported_archs(), major, minor)
        name = f"nvrtc{nvrtc.version[0]}.{nvrtc.version[1]}"
    elif compiler != "nvrtc" and cuda_compilers.find_nvcc() is not None:
        arch = _best_arch(cuda_compilers.nvcc_archs(), major, minor)
        name = cuda_compilers.nvcc_name()
    elif compiler == "nvrtc":
        raise KeyreidError(f"NVRTC is not available: {cuda_compilers.NVRTC_HINT}")
    else:
        raise KeyreidError(f"no CUDA compiler for the fused kernel: {cuda_compilers.NVRTC_HINT}, or install the "
                           f"CUDA toolkit (nvcc, or set {cuda_compilers.NVCC_ENV})")
    cached = cache_dir() / f"keypoint_part_pool-{source_hash()}-compute_{arch}-{name}.ptx"
    if not cached.is_file():
        ptx = nvrtc.compile_ptx(kernel_source(), arch) if nvrtc is not None else _nvcc_ptx(arch)
        write_bytes(cached, ptx.encode())
    return KernelImage(cached.read_bytes(), "ptx", name)


def compile_ptx(compute_capability: Tuple[int, int], compiler: Optional[str] = None) -> str:
    """``build_ptx_image``'s PTX as text (what the TensorRT plugin hands TensorRT)."""
    return build_ptx_image(compute_capability, compiler).data.decode()


def build_nvcc_fallback_image(compute_capability: Tuple[int, int]) -> KernelImage:
    """The image to load when the driver refuses the preferred PTX as too new a PTX ISA (an
    NVRTC newer than the driver): nvcc's cubin for the device's own architecture, which the
    driver loads without reading any PTX (a CUDA 12.x cubin runs on every 12.x driver), else,
    when nvcc does not know that architecture, nvcc's PTX. Cached like the PTX."""
    major, minor = _check_capability(compute_capability)
    if cuda_compilers.find_nvcc() is None:
        raise KeyreidError(f"nvcc was not found: install the CUDA toolkit or set {cuda_compilers.NVCC_ENV}")
    arch = 10 * major + minor
    if arch not in cuda_compilers.nvcc_codes():
        return build_ptx_image(compute_capability, compiler="nvcc")
    name = cuda_compilers.nvcc_name()
    cached = cache_dir() / f"keypoint_part_pool-{source_hash()}-sm_{arch}-{name}.cubin"
    if not cached.is_file():
        write_bytes(cached, _nvcc_output("-cubin", f"-arch=sm_{arch}", "cubin"))
    return KernelImage(cached.read_bytes(), "cubin", name)


def _nvcc_output(kind_flag: str, arch_flag: str, suffix: str) -> bytes:
    """nvcc's output for the kernel source with one output kind (-ptx, -cubin) and one target."""
    with tempfile.TemporaryDirectory(prefix="keyreid-nvcc-") as scratch:
        output = Path(scratch) / f"keypoint_part_pool.{suffix}"
        cuda_compilers.run_nvcc([kind_flag, arch_flag, "-o", str(output), str(KERNEL_SOURCE)],
                                f"compile the kernel with {arch_flag}")
        return output.read_bytes()


def _nvcc_ptx(arch: int) -> str:
    return _nvcc_output("-ptx", f"-arch=compute_{arch}", "ptx").decode()
