"""The CUDA compilers keyreid uses for its kernel: NVRTC through cuda-python, and nvcc.

Looked for only when PTX or a cubin is asked for (``cuda_build``, ``cuda_fatbin``), so nothing
here is needed to import the package.
"""
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from keyreid.errors import KeyreidError

# NVRTC through cuda-python; its major version must not be newer than the driver's CUDA.
NVRTC_HINT = ('install NVRTC with pip install "cuda-python[all]" (major version 12 for a '
              'CUDA 12 driver such as JetPack 6)')
NVCC_ENV = "KEYREID_NVCC"           # path of nvcc, when it is not on PATH


def find_nvcc() -> Optional[str]:
    """nvcc from $KEYREID_NVCC, PATH, $CUDA_HOME/bin or /usr/local/cuda/bin; None if absent."""
    candidates = [os.environ.get(NVCC_ENV), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def run_nvcc(arguments: List[str], what: str) -> subprocess.CompletedProcess:
    nvcc = find_nvcc()
    if nvcc is None:
        raise KeyreidError(f"nvcc was not found: install the CUDA toolkit or set {NVCC_ENV}")
    result = subprocess.run([nvcc, *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise KeyreidError(f"nvcc failed to {what}: {(result.stderr or result.stdout).strip()}")
    return result


@dataclass(frozen=True)
class Nvrtc:
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


def load_nvrtc() -> Optional[Nvrtc]:
    """NVRTC through cuda-python, or None when the bindings or libnvrtc are missing."""
    try:
        from cuda.bindings import nvrtc
        status, major, minor = nvrtc.nvrtcVersion()
    except Exception:       # ImportError, or the bindings cannot load libnvrtc (RuntimeError)
        return None
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return None
    return Nvrtc(nvrtc, (major, minor))


def nvrtc_version() -> Optional[Tuple[int, int]]:
    """(major, minor) of the NVRTC that ``compile_ptx`` would use, or None when none loads."""
    nvrtc = load_nvrtc()
    return nvrtc.version if nvrtc is not None else None


def nvcc_version() -> str:
    """nvcc's release line, e.g. 'release 13.0, V13.0.88'."""
    output = run_nvcc(["--version"], "report its version").stdout
    match = re.search(r"release [^\n]+", output)
    return match.group(0) if match else output.strip().splitlines()[-1]


def nvcc_listed(option: str, prefix: str) -> List[int]:
    """The architectures nvcc ``option`` lists, as numbers: ("--list-gpu-arch", "compute") for
    PTX targets, ("--list-gpu-code", "sm") for cubin targets."""
    listed = run_nvcc([option], "list its architectures").stdout
    return [int(arch) for arch in re.findall(prefix + r"_(\d+)", listed)]


def nvcc_archs() -> List[int]:
    return nvcc_listed("--list-gpu-arch", "compute")


def nvcc_name() -> str:
    """nvcc and its version as one token, e.g. 'nvcc13.0': a cache key and a label."""
    return "nvcc" + re.sub(r"[^0-9.]", "", nvcc_version().split(",")[0])


def nvcc_codes() -> List[int]:
    return nvcc_listed("--list-gpu-code", "sm")
