"""The project's promises about itself: the README's commands, CI, a torch-free runtime, and
imports that follow the data flow (checked on every import statement, lazy ones included)."""
import ast
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


# folder -> modules its code must never import, at module level or inside a function. Data flows
# checkpoint -> export -> ONNX -> runtime: export may run a runtime engine to verify its file,
# but the runtime reads the files of the steps before it and never their code; what both share
# lives in keyreid/ and kernels/, which import neither.
FORBIDDEN_IMPORTS = {
    "runtime": ("torch", "keyreid.export"),
    "kernels": ("keyreid.export", "keyreid.runtime"),
    "keyreid": ("torch", "keyreid.export", "keyreid.runtime"),   # the runtime imports keyreid/
}


def imported_modules(source: str):
    """Every module a source file imports: import statements anywhere (lazy ones inside functions
    too) and string arguments of importlib.import_module / keyreid.lazy.require calls."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("import_module", "require", "__import__"):
                yield node.args[0].value


def import_violations(folder: str):
    for path in sorted((REPO / folder).glob("*.py")):
        for module in imported_modules(path.read_text()):
            for forbidden in FORBIDDEN_IMPORTS[folder]:
                if module == forbidden or module.startswith(forbidden + "."):
                    yield f"{folder}/{path.name} imports {module}"


def test_imports_follow_the_data_flow_including_lazy_ones():
    assert [violation for folder in FORBIDDEN_IMPORTS for violation in import_violations(folder)] == []


def test_the_import_check_sees_imports_inside_functions():
    source = "def f():\n    from keyreid.export.checkpoint import load_checkpoint\n    require('torch')\n"
    assert {"keyreid.export.checkpoint", "torch"} <= set(imported_modules(source))


def test_module_names_do_not_shadow_imports_of_the_cli_scripts():
    """Scripts run with their folder first on sys.path, so a module there named like a
    dependency (onnx.py, queue.py, ...) would be imported instead of it."""
    shadowing = {"onnx", "onnxruntime", "tensorrt", "torch", "numpy", "cv2", "queue", "io", "json",
                 "types", "logging", "threading", "cuda", "scipy", "PIL", "csv", "select", "signal", "ray",
                 "pyarrow", "lancedb"}
    names = {path.stem for folder in ("export", "runtime", "kernels", "benchmarks")
             for path in (REPO / folder).glob("*.py")}
    assert names & shadowing == set()
