"""The ``keyreid`` command: every tool as a subcommand, each imported only when it runs."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from keyreid.command import SUBCOMMANDS

REPO = Path(__file__).resolve().parents[1]


def keyreid(*arguments, check_modules: str = ""):
    """``python -m keyreid.command ARGUMENTS``; with ``check_modules`` a statement run after it
    in the same process (to see what it imported)."""
    code = "; ".join(filter(None, ["import sys", "from keyreid.command import main", "rc = main(sys.argv[1:])",
                                   check_modules, "sys.exit(rc)"]))
    return subprocess.run([sys.executable, "-c", code, *map(str, arguments)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_the_console_script_is_installed_beside_python():
    script = Path(sys.executable).parent / "keyreid"
    assert script.is_file(), "pip install -e . installs the keyreid command (setup.py console_scripts)"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and all(name in result.stdout for name in SUBCOMMANDS)


def test_help_lists_every_subcommand_and_imports_no_tool():
    result = keyreid("--help", check_modules="assert not any(m.startswith(('torch', 'keyreid.runtime', "
                                              "'keyreid.export', 'onnxruntime')) for m in sys.modules), 'imported a tool'")
    assert result.returncode == 0, result.stderr
    for name, command in SUBCOMMANDS.items():
        assert f"  {name}" in result.stdout and command.summary in result.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_is_a_tool_with_a_main_and_a_script(name):
    command = SUBCOMMANDS[name]
    assert callable(importlib.import_module(command.module).main)
    if command.script.endswith(".py"):
        assert (REPO / command.script).is_file()


def test_a_subcommand_shows_its_own_name_and_takes_the_tools_options():
    result = keyreid("infer", "--help", check_modules="assert 'torch' not in sys.modules, 'infer imported torch'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: keyreid infer") and "--engine" in result.stdout


def test_exit_codes_follow_the_tools_usage_2_bad_input_1(tmp_path):
    unknown = keyreid("nonsense")
    assert unknown.returncode == 2 and "unknown subcommand 'nonsense'" in unknown.stderr
    assert keyreid().returncode == 2
    usage = keyreid("infer", "--no-such-flag")
    assert usage.returncode == 2 and "usage: keyreid infer" in usage.stderr
    missing = keyreid("compare", "--engine", tmp_path / "missing.onnx", "--engine", tmp_path / "other.onnx")
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
