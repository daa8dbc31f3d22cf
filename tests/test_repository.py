"""The project's promises about itself: the README's commands, CI, and a torch-free runtime."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands():
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_setup_commands_demo_then_tests():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "keyreid.demo" in commands[0] and "pytest tests" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci_lines


def test_runtime_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import keyreid.runtime, keyreid.kernels; "
            "import keyreid.runtime.engines, keyreid.runtime.runner; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_no_runtime_module_imports_torch_or_the_export_package_at_import_time():
    """compare.py --checkpoint may reach the reference model, lazily, inside a function."""
    offenders = [path.name for path in (REPO / "runtime").glob("*.py")
                 if re.search(r"^\s*(import torch|from torch)|^(from keyreid\.export|import keyreid\.export)",
                              path.read_text(), re.M)]
    assert offenders == []


def test_module_names_do_not_shadow_imports_of_the_cli_scripts():
    """Scripts run with their folder first on sys.path, so a module there named like a
    dependency (onnx.py, queue.py, ...) would be imported instead of it."""
    shadowing = {"onnx", "onnxruntime", "tensorrt", "torch", "numpy", "cv2", "queue", "io", "json",
                 "types", "logging", "threading", "cuda", "scipy", "PIL", "csv", "select", "signal"}
    names = {path.stem for folder in ("export", "runtime", "kernels", "benchmarks")
             for path in (REPO / folder).glob("*.py")}
    assert names & shadowing == set()
