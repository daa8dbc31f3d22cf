"""Every command-line tool keeps the same conventions.

- Exit codes: 0 done, 1 bad input or a failed check (one ``error: ...`` line, no traceback),
  2 wrong usage (argparse's message). Each tool runs as a user runs it, ``python
  <folder>/<tool>.py`` in a fresh process, once with a flag it does not have and once with an
  input file that is not what it claims to be.
- A flag means one thing in every tool that has it (``--max-batch``, ``--threads``,
  ``--plugin``), read from each tool's ``--help``.
"""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keyreid.synthetic import write_synthetic_tracklet

REPO = Path(__file__).resolve().parents[1]
NOT_A_FILE_OF_ITS_KIND = b"this is a text file, not what its name says\n"

# tool -> arguments with an input that is bad; {bad_X} is a file of garbage with suffix X,
# {tracklets} a folder of one good tracklet, {out} the test's own (empty) folder.
TOOLS = {
    "export/to_onnx.py": ["{bad_pth}", "-o", "{out}/model.onnx"],
    "export/reference_outputs.py": ["{bad_pth}", "-o", "{out}/ref.npz"],
    "export/to_tensorrt.py": ["{bad_onnx}", "-o", "{out}/model.plan"],
    "export/to_triton.py": ["{bad_onnx}", "--repository", "{out}/models"],
    "export/to_openvino.py": ["{bad_onnx}", "-o", "{out}/model_int8.xml"],
    "runtime/infer.py": ["--engine", "{bad_onnx}", "--tracklets", "{tracklets}", "-o", "{out}/emb.npz"],
    "runtime/batch.py": ["--engine", "{bad_onnx}", "--tracklets", "{tracklets}", "-o", "{out}/batch"],
    "runtime/stream.py": ["--engine", "{bad_onnx}", "--stream", "{bad_npz}", "{bad_npz}", "-o", "{out}/streams"],
    "runtime/compare.py": ["--engine", "{bad_onnx}", "--engine", "{bad_onnx}"],
    "runtime/gallery.py": ["build", "{bad_npz}", "-o", "{out}/gallery.npz"],
    "runtime/serve_triton.py": ["--engine", "{bad_onnx}", "--grpc-port", "1", "--http-port", "2"],
    "keyreid/demo.py": ["{bad_pth}"],                     # a file where the demo's folder goes
    "benchmarks/run.py": ["--checkpoint", "{bad_pth}", "--no-runner", "-o", "{out}/bench"],
}


def run_tool(tool: str, arguments, cwd: Path) -> subprocess.CompletedProcess:
    command = ["-m", "keyreid.demo"] if tool == "keyreid/demo.py" else [str(REPO / tool)]
    return subprocess.run([sys.executable, *command, *arguments], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs")
    places = {"tracklets": root / "tracklets"}
    for suffix in ("pth", "onnx", "npz"):
        places[f"bad_{suffix}"] = root / f"bad.{suffix}"
        places[f"bad_{suffix}"].write_bytes(NOT_A_FILE_OF_ITS_KIND)
    write_synthetic_tracklet(places["tracklets"] / "t1", 4, np.random.default_rng(0))
    return places


def filled(arguments, places, out: Path) -> list:
    """``arguments`` with the places filled in; ``out`` is the test's own output folder."""
    names = {key: str(value) for key, value in places.items()}
    return [argument.format_map({**names, "out": str(out)}) for argument in arguments]


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_an_unknown_flag_is_a_usage_error_exit_2(tool, inputs, tmp_path):
    result = run_tool(tool, filled(TOOLS[tool], inputs, tmp_path) + ["--no-such-flag"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr and "unrecognized arguments: --no-such-flag" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_bad_input_file_is_one_error_line_exit_1(tool, inputs, tmp_path):
    result = run_tool(tool, filled(TOOLS[tool], inputs, tmp_path), tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(inputs["bad_pth"].parent) in errors[0]          # it names the file
    assert [path.name for path in tmp_path.rglob("*") if path.is_file()] == []    # and writes nothing


def test_every_command_line_tool_is_in_the_table():
    """A new tool joins the table (its exit codes are checked) or this fails."""
    tools = {str(path.relative_to(REPO)) for folder in ("export", "runtime")
             for path in (REPO / folder).rglob("*.py") if "def main(" in path.read_text()}
    assert tools - set(TOOLS) == {"export/random_checkpoint.py"}    # takes no input file


# flag -> what its help must say in every tool that has it (argparse wraps lines: whitespace runs
# are compared as one space)
FLAG_MEANINGS = {
    "--max-batch": "largest batch, in clips",
    "--threads": "inference threads",
}
# --plugin is to_tensorrt.py's choice of how a plan runs the keypoint op; a plugin library to
# load is --plugin-library, in the runtime's tools.
PLUGIN_FLAGS = {"export/to_tensorrt.py": "--plugin", "runtime/infer.py": "--plugin-library",
                "runtime/compare.py": "--plugin-library", "runtime/serve_triton.py": "--plugin-library",
                "runtime/stream.py": "--plugin-library", "runtime/batch.py": "--plugin-library"}
HELPED_TOOLS = sorted(set(TOOLS) | {f"benchmarks/{name}.py" for name in (
    "bench_runner", "interleaved", "int8_accuracy", "profile_ops")})


def flag_help(help_text: str, flag: str) -> str:
    """The help paragraph of ``flag`` in argparse's --help output ('' if the tool lacks it)."""
    match = re.search(rf"^  {re.escape(flag)}(?=[\s,]).*?(?=^  -|^\S|\Z)", help_text, re.M | re.S)
    return re.sub(r"\s+", " ", match.group(0)).strip() if match else ""


@pytest.mark.parametrize("tool", HELPED_TOOLS)
def test_a_flag_means_the_same_in_every_tool(tool, tmp_path):
    result = run_tool(tool, ["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for flag, meaning in FLAG_MEANINGS.items():
        described = flag_help(result.stdout, flag)
        assert not described or meaning in described, f"{tool} {flag}: {described}"
    plugin_flags = {flag for flag in ("--plugin", "--plugin-library") if flag_help(result.stdout, flag)}
    assert plugin_flags == ({PLUGIN_FLAGS[tool]} if tool in PLUGIN_FLAGS else set())


def test_the_flag_reader_finds_a_flag_and_only_that_flag():
    text = ("options:\n  --max-batch N  largest batch,\n                 in clips\n  --threads N    x\n"
            "  --plugin-library LIB  a library\n")
    assert flag_help(text, "--max-batch") == "--max-batch N largest batch, in clips"
    assert flag_help(text, "--plugin") == "" and flag_help(text, "--plugin-library") == "--plugin-library LIB a library"
