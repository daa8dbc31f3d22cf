"""The fused CUDA KeypointPartPool kernel as files: its source, launch geometry and PTX.

Shared by the torch CUDA op (``keyreid.kernels.cuda_op``), the TensorRT plugin and
``benchmarks/gpu_check.py``. Importing it needs neither torch, nor CUDA, nor a GPU, nor a
compiler: those are looked for only when PTX is asked for.

- ``kernel_name(mode)`` and ``launch_config(num_clips)``: what a launcher hands the driver.
  Arguments are ``(keypoints, crop_size, num_clips, part_weights)``: inputs, one int32, then
  the output, the order in which a TensorRT AOT plugin passes its tensors and extra arguments.
- ``compile_ptx(compute_capability)``: PTX for one device, with NVRTC (``cuda.bindings.nvrtc``)
  where it imports, else ``nvcc``, cached on disk per source hash, architecture and compiler.
  It compiles on the machine that runs the kernel because PTX from a newer toolkit does not
  load on an older driver (CUDA 13 PTX on a JetPack 6 / CUDA 12 Jetson).
  ``build_nvcc_fallback_image`` is what ``cuda_driver`` loads instead when the driver still
  refuses that PTX (an NVRTC wheel newer than the driver): an nvcc cubin for the device.
- ``build_fatbin(path)``: PTX and cubins for every architecture in ``ARCHITECTURES`` in one
  ``nvcc`` run, with ptxas's register and spill report (CI fails on a spill);
  ``build_shared_library(path)``: the same with the C launcher ``keypoint_part_pool_launch``.

    python kernels/cuda_build.py build/keypoint_part_pool.fatbin
"""
import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from keyreid.cli import run_main
from keyreid.contract import HEATMAP_MODES, NUM_PARTS, NUM_PATCHES
from keyreid.errors import KeyreidError
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

# (major, minor) compute capabilities built and checked in CI. sm_87 is Jetson Orin, sm_110
# Jetson Thor (CUDA 13's name for what CUDA 12.8 called sm_101). CUDA 13 still builds all of
# them; a toolkit that stops supporting one fails tests/test_cuda_kernel.py rather than
# dropping it silently.
ARCHITECTURES = ((7, 5), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (11, 0), (12, 0))

# NVRTC through cuda-python; its major version must not be newer than the driver's CUDA.
_NVRTC_HINT = ('install NVRTC with pip install "cuda-python[all]" (major version 12 for a '
               'CUDA 12 driver such as JetPack 6)')

CACHE_ENV = "KEYREID_CACHE_DIR"
NVCC_ENV = "KEYREID_NVCC"           # path of nvcc, when it is not on PATH


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


# --- compilers ------------------------------------------------------------------------------

def find_nvcc() -> Optional[str]:
    """nvcc from $KEYREID_NVCC, PATH, $CUDA_HOME/bin or /usr/local/cuda/bin; None if absent."""
    candidates = [os.environ.get(NVCC_ENV), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def _run_nvcc(arguments: List[str], what: str) -> subprocess.CompletedProcess:
    nvcc = find_nvcc()
    if nvcc is None:
        raise KeyreidError(f"nvcc was not found: install the CUDA toolkit or set {NVCC_ENV}")
    result = subprocess.run([nvcc, *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise KeyreidError(f"nvcc failed to {what}: {(result.stderr or result.stdout).strip()}")
    return result


@dataclass(frozen=True)
class _Nvrtc:
    module: object
    version: Tuple[int, int]

    def call(self, function, *args):
        """cuda-python returns (status, *results); raise on a bad status."""
        status, *results = function(*args)
        if status != self.module.nvrtcResult.NVRTC_SUCCESS:
            _, message = self.module.nvrtcGetErrorString(status)
            raise KeyreidError(f"NVRTC {function.__name__} failed: {message.decode()}")
        return results[0] if len(results) == 1 else results

    def supported_archs(self) -> List[int]:
        return list(self.call(self.module.nvrtcGetSupportedArchs))

    def compile_ptx(self, source: str, arch: int) -> str:
        nvrtc = self.module
        program = self.call(nvrtc.nvrtcCreateProgram, source.encode(), b"keypoint_part_pool.cu", 0, [], [])
        try:
            options = [f"--gpu-architecture=compute_{arch}".encode(), b"--std=c++17"]
            status, = nvrtc.nvrtcCompileProgram(program, len(options), options)
            if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                log = bytearray(self.call(nvrtc.nvrtcGetProgramLogSize, program))
                self.call(nvrtc.nvrtcGetProgramLog, program, log)
                raise KeyreidError(f"NVRTC could not compile the kernel for compute_{arch}: "
                                   f"{bytes(log).decode(errors='replace').strip(chr(0)).strip()}")
            ptx = bytearray(self.call(nvrtc.nvrtcGetPTXSize, program))
            self.call(nvrtc.nvrtcGetPTX, program, ptx)
            return bytes(ptx).rstrip(b"\0").decode()
        finally:
            nvrtc.nvrtcDestroyProgram(program)


def _load_nvrtc() -> Optional[_Nvrtc]:
    """NVRTC through cuda-python, or None when the bindings or libnvrtc are missing."""
    try:
        from cuda.bindings import nvrtc
        status, major, minor = nvrtc.nvrtcVersion()
    except Exception:       # ImportError, or the bindings cannot load libnvrtc (RuntimeError)
        return None
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return None
    return _Nvrtc(nvrtc, (major, minor))


def nvrtc_version() -> Optional[Tuple[int, int]]:
    """(major, minor) of the NVRTC that ``compile_ptx`` would use, or None when none loads."""
    nvrtc = _load_nvrtc()
    return nvrtc.version if nvrtc is not None else None


def nvcc_version() -> str:
    """nvcc's release line, e.g. 'release 13.0, V13.0.88'."""
    output = _run_nvcc(["--version"], "report its version").stdout
    match = re.search(r"release [^\n]+", output)
    return match.group(0) if match else output.strip().splitlines()[-1]


def _nvcc_listed(option: str, prefix: str) -> List[int]:
    """The architectures nvcc ``option`` lists, as numbers: ("--list-gpu-arch", "compute") for
    PTX targets, ("--list-gpu-code", "sm") for cubin targets."""
    listed = _run_nvcc([option], "list its architectures").stdout
    return [int(arch) for arch in re.findall(prefix + r"_(\d+)", listed)]


def _nvcc_archs() -> List[int]:
    return _nvcc_listed("--list-gpu-arch", "compute")


@dataclass(frozen=True)
class KernelImage:
    """What the driver loads: PTX text (JIT-compiled by the driver) or a cubin (loaded as is)."""
    data: bytes
    kind: str           # "ptx" or "cubin"
    compiler: str       # the compiler and its version, e.g. "nvrtc13.0" or "nvcc13.0"


def _nvcc_name() -> str:
    """nvcc and its version as one token, e.g. 'nvcc13.0': a cache key and a label."""
    return "nvcc" + re.sub(r"[^0-9.]", "", nvcc_version().split(",")[0])


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
    nvrtc = _load_nvrtc() if compiler in (None, "nvrtc") else None
    if nvrtc is not None:
        arch = _best_arch(nvrtc.supported_archs(), major, minor)
        name = f"nvrtc{nvrtc.version[0]}.{nvrtc.version[1]}"
    elif compiler != "nvrtc" and find_nvcc() is not None:
        arch = _best_arch(_nvcc_archs(), major, minor)
        name = _nvcc_name()
    elif compiler == "nvrtc":
        raise KeyreidError(f"NVRTC is not available: {_NVRTC_HINT}")
    else:
        raise KeyreidError(f"no CUDA compiler for the fused kernel: {_NVRTC_HINT}, or install the "
                           f"CUDA toolkit (nvcc, or set {NVCC_ENV})")
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
    if find_nvcc() is None:
        raise KeyreidError(f"nvcc was not found: install the CUDA toolkit or set {NVCC_ENV}")
    arch = 10 * major + minor
    if arch not in _nvcc_codes():
        return build_ptx_image(compute_capability, compiler="nvcc")
    name = _nvcc_name()
    cached = cache_dir() / f"keypoint_part_pool-{source_hash()}-sm_{arch}-{name}.cubin"
    if not cached.is_file():
        write_bytes(cached, _nvcc_output("-cubin", f"-arch=sm_{arch}", "cubin"))
    return KernelImage(cached.read_bytes(), "cubin", name)


def _nvcc_codes() -> List[int]:
    return _nvcc_listed("--list-gpu-code", "sm")


def _nvcc_output(kind_flag: str, arch_flag: str, suffix: str) -> bytes:
    """nvcc's output for the kernel source with one output kind (-ptx, -cubin) and one target."""
    with tempfile.TemporaryDirectory(prefix="keyreid-nvcc-") as scratch:
        output = Path(scratch) / f"keypoint_part_pool.{suffix}"
        _run_nvcc([kind_flag, arch_flag, "-o", str(output), str(KERNEL_SOURCE)],
                  f"compile the kernel with {arch_flag}")
        return output.read_bytes()


def _nvcc_ptx(arch: int) -> str:
    return _nvcc_output("-ptx", f"-arch=compute_{arch}", "ptx").decode()


# --- every architecture at once (CI, packaging) ----------------------------------------------

@dataclass(frozen=True)
class KernelResources:
    """ptxas's report on one entry point for one architecture."""
    arch: str
    function: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+\w*)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas_report(text: str) -> List[KernelResources]:
    """The resources of each (entry point, architecture) in ``nvcc -Xptxas -v`` output."""
    found, current, frame = [], None, None
    for line in text.splitlines():
        if (match := _PTXAS_ENTRY.search(line)):
            current, frame = (match.group(2), match.group(1)), None
        elif current and (match := _PTXAS_FRAME.search(line)):
            frame = tuple(int(value) for value in match.groups())
        elif current and frame and (match := _PTXAS_REGISTERS.search(line)):
            stack, stores, loads = frame
            found.append(KernelResources(current[0], current[1], int(match.group(1)), stores, loads, stack))
            current = None
    return found


def build_fatbin(output: Path, architectures=ARCHITECTURES, threads: int = 1) -> List[KernelResources]:
    """A fatbin with a cubin and the PTX of every architecture, written whole to ``output``,
    and ptxas's report on each entry point (registers, spills).

    ``threads`` above 1 runs ptxas jobs in parallel, whose report lines can interleave and be
    credited to the wrong (architecture, entry); the default keeps the report exact."""
    output = Path(output)
    gencode = []
    for major, minor in architectures:
        arch = f"{major}{minor}"
        gencode += ["-gencode", f"arch=compute_{arch},code=[sm_{arch},compute_{arch}]"]
    with tempfile.TemporaryDirectory(prefix="keyreid-fatbin-") as scratch:
        built = Path(scratch) / output.name
        result = _run_nvcc(["-fatbin", *gencode, "-Xptxas", "-v", "--threads", str(threads),
                            "-o", str(built), str(KERNEL_SOURCE)],
                           "compile the kernel for every architecture")
        write_bytes(output, built.read_bytes())
    return parse_ptxas_report(result.stdout + result.stderr)


def build_shared_library(output: Path, architectures=ARCHITECTURES, threads: int = 2) -> Path:
    """A shared library exporting the C launcher ``keypoint_part_pool_launch`` (and the three
    kernels, cubins and PTX for ``architectures``), for C++ users; written whole to ``output``."""
    output = Path(output)
    gencode = [f"-gencode=arch=compute_{major}{minor},code=[sm_{major}{minor},compute_{major}{minor}]"
               for major, minor in architectures]
    with tempfile.TemporaryDirectory(prefix="keyreid-launcher-") as scratch:
        built = Path(scratch) / output.name
        _run_nvcc(["-shared", "-Xcompiler", "-fPIC", *gencode, "--threads", str(threads),
                   "-o", str(built), str(KERNEL_SOURCE)], "build the launcher library")
        write_bytes(output, built.read_bytes())
    return output


def resource_table(resources: Sequence[KernelResources]) -> str:
    lines = [f"{'arch':<8} {'entry point':<26} {'registers':>9} {'spill st/ld':>12} {'stack':>6}"]
    for item in resources:
        lines.append(f"{item.arch:<8} {item.function:<26} {item.registers:>9} "
                     f"{item.spill_stores:>5}/{item.spill_loads:<6} {item.stack_bytes:>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the fused KeypointPartPool kernel for every "
                                                 "supported GPU architecture (PTX and cubins in one fatbin).")
    parser.add_argument("output", type=Path, help="fatbin to write, e.g. build/keypoint_part_pool.fatbin")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="parallel compile jobs, nvcc's --threads (default: 1; more is faster but can mix "
                             "up the spill report). Not inference threads, which the runtime's --threads sets")
    args = parser.parse_args(argv)
    resources = build_fatbin(args.output, threads=args.jobs)
    print(resource_table(resources))
    spilling = [f"{item.function} on {item.arch}" for item in resources if item.spill_stores or item.spill_loads]
    if spilling:
        raise KeyreidError(f"registers spill in {', '.join(spilling)}")
    print(f"wrote {args.output} ({nvcc_version()}, source {source_hash()})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
