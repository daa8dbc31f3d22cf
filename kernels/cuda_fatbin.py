"""The fused kernel for every supported GPU architecture at once (CI, packaging).

- ``build_fatbin(path)``: PTX and cubins for every architecture in ``ARCHITECTURES`` in one
  ``nvcc`` run, with ptxas's register and spill report (CI fails on a spill);
  ``build_shared_library(path)``: the same with the C launcher ``keypoint_part_pool_launch``.

    python kernels/cuda_fatbin.py build/keypoint_part_pool.fatbin
"""
import argparse
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

from keyreid.cli import program_name, run_main
from keyreid.errors import KeyreidError
from keyreid.files import write_bytes
from keyreid.kernels import cuda_compilers
from keyreid.kernels.cuda_build import KERNEL_SOURCE, source_hash

# (major, minor) compute capabilities built and checked in CI. sm_87 is Jetson Orin, sm_110
# Jetson Thor (CUDA 13's name for what CUDA 12.8 called sm_101). CUDA 13 still builds all of
# them; a toolkit that stops supporting one fails tests/test_cuda_kernel.py rather than
# dropping it silently.
ARCHITECTURES = ((7, 5), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (11, 0), (12, 0))


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
        result = cuda_compilers.run_nvcc(["-fatbin", *gencode, "-Xptxas", "-v", "--threads", str(threads),
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
        cuda_compilers.run_nvcc(["-shared", "-Xcompiler", "-fPIC", *gencode, "--threads", str(threads),
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
    parser = argparse.ArgumentParser(prog=program_name("cuda_fatbin.py"), description="Build the fused KeypointPartPool kernel for every "
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
    print(f"wrote {args.output} ({cuda_compilers.nvcc_version()}, source {source_hash()})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
