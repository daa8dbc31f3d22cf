"""keyreid/cpu_features.py reads the ISA classes the inference libraries pick their kernels by."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from keyreid.cpu_features import CPU_CLASSES, OVERRIDE_VARIABLE, cpu_isa, isa_from_cpuid, isa_from_cpuinfo, isa_of_class

# flags lines of the three machine classes this project has run on (trimmed to what matters)
AVX2_EPYC = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx fma avx2 bmi2\n"
VNNI_EPYC = ("model name\t: AMD EPYC 9B14\nflags\t\t: avx fma avx2 avx512f avx512dq avx512bw avx512vl "
             "avx512_bf16 avx512_vnni avx512_bitalg\n")
AMX_XEON = ("model name\t: Intel Xeon Processor\nflags\t\t: avx fma avx2 avx512f avx512bw avx512vl avx512_vnni "
            "avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni\n")


@pytest.mark.parametrize("cpuinfo, cpu_class, bf16", [(AVX2_EPYC, "avx2", False), (VNNI_EPYC, "vnni", True),
                                                      (AMX_XEON, "amx", True)])
def test_cpuinfo_flags_give_the_class_of_each_machine_seen(cpuinfo, cpu_class, bf16):
    isa = isa_from_cpuinfo(cpuinfo)
    assert (isa.cpu_class, isa.bf16, isa.vnni) == (cpu_class, bf16, cpu_class != "avx2")
    assert isa.model in isa.describe() and cpu_class in isa.describe()


def test_avx512_without_vnni_is_an_avx2_class_cpu_for_int8():
    skylake = "flags\t: avx fma avx2 avx512f avx512bw avx512vl avx512cd\n"
    assert isa_from_cpuinfo(skylake).cpu_class == "avx2"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="cpuid is an x86-64 instruction")
def test_cpuid_agrees_with_the_kernel_on_the_class_of_this_machine():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    from_cpuid, from_kernel = isa_from_cpuid(), isa_from_cpuinfo(cpuinfo.read_text())
    assert from_cpuid.source == "cpuid"
    assert (from_cpuid.cpu_class, from_cpuid.bf16) == (from_kernel.cpu_class, from_kernel.bf16)


def test_the_override_variable_sets_the_class_and_rejects_unknown_names(monkeypatch):
    for cpu_class in CPU_CLASSES:
        monkeypatch.setenv(OVERRIDE_VARIABLE, cpu_class)
        assert cpu_isa().cpu_class == cpu_class
    monkeypatch.setenv(OVERRIDE_VARIABLE, "avx9000")
    with pytest.raises(ValueError, match="avx9000"):
        cpu_isa()
    assert isa_of_class("vnni").source == f"{OVERRIDE_VARIABLE}=vnni"


def test_cpu_isa_needs_no_third_party_module():
    code = "import sys; sys.modules['numpy'] = None; from keyreid.cpu_features import cpu_isa; print(cpu_isa().cpu_class)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in CPU_CLASSES
