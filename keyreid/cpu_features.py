"""What this x86 CPU can do for inference, read once, in one place.

The int8 and bf16 recipes, the engine that runs them and every benchmark banner depend on a few
instruction-set classes: AVX2 (+FMA), AVX-512, the int8 dot products (AVX-512 VNNI or AVX-VNNI),
AVX-512 BF16 and AMX (int8 / bf16 tiles). They are read with the ``cpuid`` and ``xgetbv``
instructions themselves, which is what ONNX Runtime, OpenVINO and oneDNN read when they pick
their kernels: a CPU feature the OS has not enabled (XCR0) counts as absent, and under
``qemu-x86_64 -cpu Haswell`` the answer is Haswell's, as those libraries see it, while
``/proc/cpuinfo`` still shows the host's flags. Where ``cpuid`` cannot be run (not x86-64, or
no executable memory), ``/proc/cpuinfo`` is the fallback.

``KEYREID_CPU_CLASS`` (avx2, vnni, amx, baseline) overrides the detection: it changes what
keyreid decides (the int8 recipe of ``--target-cpu auto``, the warnings), never what the
libraries run, which always follows the real CPU.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional, Tuple, get_args

CpuClass = Literal["amx", "vnni", "avx2", "baseline"]
CPU_CLASSES: Tuple[str, ...] = get_args(CpuClass)
OVERRIDE_VARIABLE = "KEYREID_CPU_CLASS"


@dataclass(frozen=True)
class CpuIsa:
    """The instruction-set facts that matter to the engines (each one usable: CPU and OS)."""
    avx2: bool = False             # with FMA3: the float kernels of every x86 library since 2013
    avx512: bool = False           # AVX-512 F + BW + VL
    avx512_vnni: bool = False      # int8 dot products into 32-bit sums, 512-bit
    avx_vnni: bool = False         # the same on 256-bit registers (Alder Lake and later)
    avx512_bf16: bool = False      # bf16 dot products (Cooper Lake, Zen 4 and later)
    amx_int8: bool = False         # AMX tiles, int8
    amx_bf16: bool = False         # AMX tiles, bf16
    model: str = ""                # marketing name, for banners
    source: str = "cpuid"          # cpuid, /proc/cpuinfo, or the override variable

    @property
    def vnni(self) -> bool:
        """int8 products accumulate in 32 bits (no 16-bit intermediate to saturate)."""
        return self.avx512_vnni or self.avx_vnni or self.amx_int8

    @property
    def bf16(self) -> bool:
        """bf16 arithmetic in hardware (AMX tiles or AVX-512 BF16)."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def cpu_class(self) -> CpuClass:
        if self.amx_int8:
            return "amx"
        if self.vnni:
            return "vnni"
        if self.avx2:
            return "avx2"
        return "baseline"

    def describe(self) -> str:
        """One line for banners: the class, the flags present, the model name."""
        flags = [field.name for field in fields(self)
                 if field.type in ("bool", bool) and getattr(self, field.name)]
        name = f"{self.model}; " if self.model else ""
        return f"{name}CPU class {self.cpu_class} ({', '.join(flags) or 'no AVX2'}; read from {self.source})"


# --- cpuid / xgetbv through a few bytes of machine code (System V x86-64 calling convention) ---
# void cpuid(uint32 leaf, uint32 subleaf, uint32 out[4])
_CPUID_CODE = bytes([
    0x53,                          # push rbx (callee-saved; cpuid overwrites it)
    0x49, 0x89, 0xD0,              # mov r8, rdx (the out pointer; cpuid overwrites rdx)
    0x89, 0xF8,                    # mov eax, edi
    0x89, 0xF1,                    # mov ecx, esi
    0x0F, 0xA2,                    # cpuid
    0x41, 0x89, 0x00,              # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,        # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,        # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,        # mov [r8+12], edx
    0x5B,                          # pop rbx
    0xC3,                          # ret
])
# uint64 xgetbv(uint32 register)
_XGETBV_CODE = bytes([
    0x89, 0xF9,                    # mov ecx, edi
    0x0F, 0x01, 0xD0,              # xgetbv
    0x48, 0xC1, 0xE2, 0x20,        # shl rdx, 32
    0x48, 0x09, 0xD0,              # or rax, rdx
    0xC3,                          # ret
])

# XCR0 state components the OS must save for a register file to be usable.
_XCR0_AVX = 0b110                  # SSE and AVX (YMM) state
_XCR0_AVX512 = 0b1110_0000         # opmask, ZMM hi-256, hi-16 ZMM
_XCR0_AMX = 0b11 << 17             # XTILECFG, XTILEDATA


def _bit(value: int, bit: int) -> bool:
    return bool(value >> bit & 1)


class _MachineCode:
    """Executable copies of the two routines above, freed with the object."""

    def __init__(self):
        size = mmap.PAGESIZE
        self._page = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_CPUID_CODE)
        self._page.seek(64)
        self._page.write(_XGETBV_CODE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                                       ctypes.POINTER(ctypes.c_uint32))(base)
        self._xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(base + 64)

    def cpuid(self, leaf: int, subleaf: int = 0) -> Tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        self._cpuid(leaf, subleaf, out)
        return tuple(out)

    def xgetbv(self, register: int = 0) -> int:
        return self._xgetbv(register)


def _brand(code: _MachineCode) -> str:
    if code.cpuid(0x80000000)[0] < 0x80000004:
        return ""
    raw = b"".join(ctypes.string_at(ctypes.addressof((ctypes.c_uint32 * 4)(*code.cpuid(leaf))), 16)
                   for leaf in (0x80000002, 0x80000003, 0x80000004))
    return raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()


def isa_from_cpuid(code: Optional[_MachineCode] = None) -> CpuIsa:
    """Read the ISA with ``cpuid`` and ``xgetbv`` (x86-64 only; raises OSError elsewhere)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise OSError(f"cpuid needs an x86-64 CPU, this is {platform.machine()}")
    code = code or _MachineCode()
    max_leaf = code.cpuid(0)[0]
    _, _, ecx1, _ = code.cpuid(1)
    os_saves = code.xgetbv(0) if _bit(ecx1, 27) else 0           # OSXSAVE
    avx_state = os_saves & _XCR0_AVX == _XCR0_AVX
    avx512_state = avx_state and os_saves & _XCR0_AVX512 == _XCR0_AVX512
    amx_state = os_saves & _XCR0_AMX == _XCR0_AMX
    ebx7 = ecx7 = edx7 = eax71 = 0
    if max_leaf >= 7:
        _, ebx7, ecx7, edx7 = code.cpuid(7, 0)
        eax71 = code.cpuid(7, 1)[0]
    avx512 = avx512_state and _bit(ebx7, 16) and _bit(ebx7, 30) and _bit(ebx7, 31)    # F, BW, VL
    return CpuIsa(
        avx2=avx_state and _bit(ecx1, 28) and _bit(ecx1, 12) and _bit(ebx7, 5),    # AVX, FMA, AVX2
        avx512=avx512,
        avx512_vnni=avx512 and _bit(ecx7, 11),
        avx_vnni=avx_state and _bit(eax71, 4),
        avx512_bf16=avx512 and _bit(eax71, 5),
        amx_int8=amx_state and _bit(edx7, 24) and _bit(edx7, 25),                  # tile + int8
        amx_bf16=amx_state and _bit(edx7, 24) and _bit(edx7, 22),                  # tile + bf16
        model=_brand(code), source="cpuid")


def isa_from_cpuinfo(text: str) -> CpuIsa:
    """Parse ``/proc/cpuinfo`` (Linux lists only what the kernel enabled)."""
    flags: set = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "model name" and not model:
            model = value.strip()
    avx512 = {"avx512f", "avx512bw", "avx512vl"} <= flags
    return CpuIsa(avx2={"avx2", "fma"} <= flags, avx512=avx512,
                  avx512_vnni=avx512 and "avx512_vnni" in flags, avx_vnni="avx_vnni" in flags,
                  avx512_bf16=avx512 and "avx512_bf16" in flags,
                  amx_int8={"amx_tile", "amx_int8"} <= flags, amx_bf16={"amx_tile", "amx_bf16"} <= flags,
                  model=model, source="/proc/cpuinfo")


def isa_of_class(cpu_class: str, model: str = "") -> CpuIsa:
    """The least ISA of a class: what a file made for that class may assume."""
    if cpu_class not in CPU_CLASSES:
        raise ValueError(f"unknown CPU class {cpu_class!r}: choose one of {', '.join(CPU_CLASSES)}")
    avx2 = cpu_class != "baseline"
    vnni = cpu_class in ("vnni", "amx")
    amx = cpu_class == "amx"
    return CpuIsa(avx2=avx2, avx512=vnni, avx512_vnni=vnni, avx512_bf16=amx, amx_int8=amx, amx_bf16=amx,
                  model=model, source=f"{OVERRIDE_VARIABLE}={cpu_class}")


def _detect() -> CpuIsa:
    try:
        return isa_from_cpuid()
    except (OSError, ValueError, AttributeError):     # no x86-64, or no executable mapping allowed
        cpuinfo = Path("/proc/cpuinfo")
        return isa_from_cpuinfo(cpuinfo.read_text()) if cpuinfo.exists() else CpuIsa(source="unknown")


@lru_cache(maxsize=1)
def _detected() -> CpuIsa:
    return _detect()


def cpu_isa() -> CpuIsa:
    """This CPU's ISA as the inference libraries see it (``KEYREID_CPU_CLASS`` overrides)."""
    forced = os.environ.get(OVERRIDE_VARIABLE, "").strip().lower()
    if forced:
        return isa_of_class(forced, _detected().model)
    return _detected()
