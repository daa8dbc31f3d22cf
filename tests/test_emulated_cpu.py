"""The real ONNX Runtime kernels, as an AVX2-only CPU (no AVX-512, no VNNI) runs them, on any
machine: Debian's qemu-user emulates ``-cpu Haswell``'s CPUID and instructions, so ONNX Runtime
picks its AVX2 int8 kernels, whose 16-bit pair sums can saturate (keyreid/int8_targets.py).
Files are exported natively; only ``runtime/compare.py`` runs emulated (~10 s a run here).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from keyreid.export.checkpoint import load_checkpoint
from keyreid.export.onnx_export import DEFAULT_OPSET, stamp_metadata, write_model_atomically
from keyreid.export.precision import to_int8
from keyreid.export.reference_outputs import main as write_reference

REPO = Path(__file__).resolve().parents[1]
EMULATOR, EMULATOR_PACKAGE, EMULATED_CPU = "qemu-x86_64", "qemu-user", "Haswell"
INT8_GATE = ("--tolerance-rel", "none", "--tolerance-cosine", "0.999", "--part-weights-abs", "1e-5")


def debian_tool(command: str, package: str) -> str:
    """The path of ``command``; outside CI a missing one skips the test with the package to
    install, in CI (``CI=true``, where .ci/run installs it) it fails the test."""
    path = shutil.which(command)
    if path is None:
        message = f"{command} is not installed: apt-get install {package} (Debian)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; .ci/run installs it before the tests")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def emulated_compare():
    """Run runtime/compare.py as an AVX2-only CPU: (return code, stdout + stderr)."""
    emulator = debian_tool(EMULATOR, EMULATOR_PACKAGE)
    if os.uname().machine != "x86_64":
        pytest.skip("qemu-x86_64 emulates an x86-64 CPU; this test runs the x86-64 wheels on one")

    def run(*arguments, env=None):
        command = [emulator, "-cpu", EMULATED_CPU, sys.executable, str(REPO / "runtime" / "compare.py"), *arguments]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env={**os.environ, **(env or {})})
        # qemu's TCG lists the host-only features it leaves out; they are not ours to report
        printed = "\n".join(line for line in (result.stdout + result.stderr).splitlines()
                            if "TCG doesn't support" not in line)
        return result.returncode, printed
    return run


@pytest.fixture(scope="module")
def files(reduced_checkpoint, reduced_onnx, tmp_path_factory):
    folder = tmp_path_factory.mktemp("emulated")
    checkpoint, fp32 = load_checkpoint(reduced_checkpoint), onnx.load(str(reduced_onnx))
    paths = {"reference": folder / "reference.npz"}
    assert write_reference([str(reduced_checkpoint), "-o", str(paths["reference"]), "--clips", "3", "-q"]) == 0
    for target in ("avx2", "vnni"):
        model = to_int8(fp32, target)
        stamp_metadata(model, checkpoint, "max", "int8", DEFAULT_OPSET, target)
        paths[target] = write_model_atomically(model, folder / f"int8_{target}.onnx")
    return paths


def _embedding_cosine(printed: str) -> float:
    row = next(line for line in printed.splitlines() if line.startswith("embedding"))
    return float(row.split()[5])


def test_the_emulated_cpu_is_avx2_class_as_onnx_runtime_sees_it(emulated_compare):
    code = "from keyreid.cpu_features import cpu_isa; print(cpu_isa().cpu_class)"
    result = subprocess.run([shutil.which(EMULATOR), "-cpu", EMULATED_CPU, sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "avx2", result.stderr


def test_the_avx2_file_holds_the_int8_gate_on_avx2_kernels(emulated_compare, files):
    returncode, printed = emulated_compare("--engine", str(files["avx2"]), "--reference", str(files["reference"]),
                                           *INT8_GATE)
    assert returncode == 0, printed
    assert "warning" not in printed and _embedding_cosine(printed) >= 0.999


def test_a_vnni_file_stays_exact_on_avx2_kernels_and_says_it_is_slower_there(emulated_compare, files):
    returncode, printed = emulated_compare("--engine", str(files["vnni"]), "--reference", str(files["reference"]),
                                           *INT8_GATE)
    assert returncode == 0, printed
    assert printed.count("warning:") == 1 and "--target-cpu avx2" in printed
    native = subprocess.run([sys.executable, str(REPO / "runtime" / "compare.py"), "--engine", str(files["vnni"]),
                             "--reference", str(files["reference"]), *INT8_GATE], capture_output=True, text=True,
                            timeout=300)
    # exact integer sums: the emulated AVX2 run equals this CPU's run
    assert np.isclose(_embedding_cosine(printed), _embedding_cosine(native.stdout), atol=2e-6)


def test_without_the_exact_path_the_vnni_file_saturates_on_avx2_kernels(emulated_compare, files):
    """The control: told it has VNNI, the engine leaves ONNX Runtime's fast u8 x s8 kernel on,
    and the 16-bit sums clip (this is what every int8 file did on AVX2-only CPUs before)."""
    returncode, printed = emulated_compare("--engine", str(files["vnni"]), "--reference", str(files["reference"]),
                                           "--tolerance-rel", "none", "--tolerance-cosine", "none",
                                           "--part-weights-abs", "1e-5", env={"KEYREID_CPU_CLASS": "vnni"})
    assert returncode == 0, printed
    with_exact_path = emulated_compare("--engine", str(files["vnni"]), "--reference", str(files["reference"]),
                                       *INT8_GATE)[1]
    assert _embedding_cosine(printed) < _embedding_cosine(with_exact_path) - 5e-5


def test_an_openvino_int8_ir_on_avx2_kernels_says_it_loses_accuracy_there(emulated_compare, files, reduced_onnx,
                                                                             tmp_path):
    """OpenVINO has no exact path for full 8-bit codes: on the emulated AVX2 CPU the engine says so
    once (the accuracy drop itself is recorded in benchmarks/RESULTS.md section 8, not gated)."""
    pytest.importorskip("nncf")
    from keyreid.export.to_openvino import export_openvino_int8

    ir = export_openvino_int8(reduced_onnx, tmp_path / "int8.xml", calibration_clips=4, verify=False).xml_path
    returncode, printed = emulated_compare("--engine", str(ir), "--reference", str(files["reference"]),
                                           "--tolerance-rel", "none", "--tolerance-cosine", "none",
                                           "--part-weights-abs", "1e-5")
    assert returncode == 0, printed
    assert printed.count("warning:") == 1 and "no VNNI" in printed and "--target-cpu avx2" in printed
