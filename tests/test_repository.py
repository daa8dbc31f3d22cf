"""The project's promises about itself: the README's commands, CI, a torch-free runtime, and
imports that follow the data flow (checked on every import statement, lazy ones included)."""
import ast
import re
import shutil
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
            "import keyreid.runtime.backends.base, keyreid.runtime.serving.runner; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# The layers and the one table of what each may import (docs/architecture.md). Data flows
# checkpoint -> export -> files -> runtime: export may run a runtime engine to verify its file or
# describe it for Triton, but the runtime reads the files of the steps before it, never their
# code; what several layers share lives in the core (keyreid/), which imports no other layer.
# The ``keyreid`` command and the benchmarks sit above every layer. Any keyreid import not allowed
# here fails, at module level or lazy (inside a function, importlib, keyreid.lazy.require).
CORE, KERNELS, EXPORT, RUNTIME, BENCHMARKS, COMMAND = ("keyreid", "keyreid.kernels", "keyreid.export",
                                                       "keyreid.runtime", "keyreid.benchmarks", "keyreid.command")
ALLOWED_IMPORTS = {
    CORE: {CORE},
    KERNELS: {CORE, KERNELS},
    RUNTIME: {CORE, RUNTIME},
    EXPORT: {CORE, KERNELS, RUNTIME, EXPORT},
    BENCHMARKS: {CORE, KERNELS, RUNTIME, EXPORT, BENCHMARKS},
    COMMAND: {CORE, KERNELS, RUNTIME, EXPORT, BENCHMARKS},
}
# Third-party modules a layer must not import even lazily: a device runs the runtime without torch.
FORBIDDEN_THIRD_PARTY = {CORE: ("torch",), RUNTIME: ("torch",)}


def package_folders():
    """setup.py's import package -> folder table (the same one the install uses)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PACKAGE_FOLDERS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no PACKAGE_FOLDERS")


def layer_of(module: str) -> str:
    """The layer a keyreid module belongs to: the longest table entry it is in."""
    return max((layer for layer in ALLOWED_IMPORTS if module == layer or module.startswith(layer + ".")), key=len)


def source_modules(root: Path = REPO):
    """(module name, path) of every .py file of the package, every subfolder included."""
    for package, folder in package_folders().items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            yield ".".join((package, *parts)), path


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


def import_violations(root: Path = REPO):
    for module, path in source_modules(root):
        layer = layer_of(module)
        for imported in imported_modules(path.read_text()):
            top = imported.split(".")[0]
            if top == "keyreid":
                if layer_of(imported) not in ALLOWED_IMPORTS[layer]:
                    yield f"{path.relative_to(root)} ({layer}) imports {imported} ({layer_of(imported)})"
            elif top in FORBIDDEN_THIRD_PARTY.get(layer, ()):
                yield f"{path.relative_to(root)} ({layer}) imports {imported}"


def test_imports_follow_the_layer_table_including_lazy_ones_and_subfolders():
    assert list(import_violations()) == []


def test_the_layer_check_reads_every_subfolder_and_every_kind_of_import():
    modules = dict(source_modules())
    assert "keyreid.runtime.backends.onnxruntime" in modules and "keyreid.benchmarks.run" in modules
    source = "def f():\n    from keyreid.export.checkpoint import load_checkpoint\n    require('torch')\n"
    assert {"keyreid.export.checkpoint", "torch"} <= set(imported_modules(source))


def test_a_planted_upward_import_fails_the_layer_check(tmp_path):
    """A copy of the tree with one import that runs against the data flow, deep in a subfolder."""
    for folder in list(package_folders().values()) + ["setup.py"]:
        source = REPO / folder
        if source.is_dir():
            shutil.copytree(source, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy(source, tmp_path / folder)
    planted = tmp_path / "runtime" / "backends" / "onnxruntime.py"
    planted.write_text(planted.read_text() + "\n\ndef _export():\n    from keyreid.export.verify import verify_onnx\n")
    (tmp_path / "kernels" / "reference.py").write_text(
        (tmp_path / "kernels" / "reference.py").read_text() + "\nfrom keyreid.runtime import open_engine\n")
    assert sorted(import_violations(tmp_path)) == [
        "kernels/reference.py (keyreid.kernels) imports keyreid.runtime (keyreid.runtime)",
        "kernels/reference.py (keyreid.kernels) imports keyreid.runtime.open_engine (keyreid.runtime)",
        "runtime/backends/onnxruntime.py (keyreid.runtime) imports keyreid.export.verify (keyreid.export)",
        "runtime/backends/onnxruntime.py (keyreid.runtime) imports keyreid.export.verify.verify_onnx "
        "(keyreid.export)"]


def test_module_names_do_not_shadow_imports_of_the_cli_scripts():
    """Scripts run with their folder first on sys.path, so a module there named like a
    dependency (onnx.py, queue.py, ...) would be imported instead of it."""
    shadowing = {"onnx", "onnxruntime", "tensorrt", "torch", "numpy", "cv2", "queue", "io", "json",
                 "types", "logging", "threading", "cuda", "scipy", "PIL", "csv", "select", "signal", "ray",
                 "pyarrow", "lancedb"}
    names = {path.stem for folder in ("export", "runtime", "kernels", "benchmarks")
             for path in (REPO / folder).glob("*.py")}
    assert names & shadowing == set()
