"""The documentation's code runs as written.

Every ```python block of README.md and docs/*.md is read from the Markdown (never copied here)
and run, in document order, in one empty folder per document: a snippet may read what an
earlier snippet of its page wrote, and nothing else. Each snippet runs in a fresh interpreter
with nothing put in its namespace. Snippets that do not import ``keyreid.export`` run with
torch made unimportable: the runtime API must work without it. ```bash blocks marked with
``<!-- runs in tests/test_doc_snippets.py -->`` run too, line by line as a shell would, from the
same folder (the tool folders are linked there, so ``python runtime/infer.py`` works as from
the repository's root).
"""
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md"] + sorted(str(path.relative_to(REPO)) for path in (REPO / "docs").glob("*.md"))
RUN_MARK = "<!-- runs in tests/test_doc_snippets.py -->"
BLOCK = re.compile(r"(?P<mark><!-- runs in tests/test_doc_snippets\.py -->\n)?```(?P<language>\w+)\n(?P<code>.*?)```",
                   re.S)
TOOL_FOLDERS = ("export", "runtime", "benchmarks")
# Runs a snippet file as __main__, optionally with torch unimportable; the snippet's namespace
# holds only what any script's has.
LAUNCHER = ("import runpy, sys\n"
            "if sys.argv[2] == 'no-torch':\n    sys.modules['torch'] = None\n"
            "runpy.run_path(sys.argv[1], run_name='__main__')\n")

# What a snippet must print, found by a phrase that identifies it (each phrase matches exactly
# one snippet of its page, so a snippet cannot silently leave the docs).
EXPECTED = {
    ("docs/python.md", "export_onnx("): ["[ok]", "6 cameras"],
    ("docs/python.md", "OnlineEncoder("): ["cam1-track3 looks like cam0-track7 (camera 0)"],
    ("docs/python.md", "run_tracklets("): ["['alice', 'bob'] []", "(3200,)"],
}
# Files each page's code leaves in its folder.
WRITES = {
    "docs/python.md": {"ckpt.pth", "model.onnx", "gallery.npz", "tracklets"},
    "docs/usage.md": {"ckpt.pth", "tracklets", "model.onnx", "gallery_features.npz", "report.json", "gallery.npz",
                      "queries.npz", "matches.json"},
}


class Block(NamedTuple):
    language: str
    code: str
    runs: bool          # a python block, or a marked bash block


def blocks(document: str) -> List[Block]:
    text = (REPO / document).read_text(encoding="utf-8")
    return [Block(match["language"], match["code"], match["language"] == "python" or bool(match["mark"]))
            for match in BLOCK.finditer(text)]


def run_python(code: str, folder: Path, scratch: Path, index: int) -> subprocess.CompletedProcess:
    script = scratch / f"snippet_{index}.py"           # outside the folder the snippet works in
    script.write_text(code, encoding="utf-8")
    torch_free = not re.search(r"^\s*(from|import) (keyreid\.export|torch)\b", code, re.M)
    return subprocess.run([sys.executable, "-c", LAUNCHER, str(script), "no-torch" if torch_free else "torch"],
                          cwd=folder, capture_output=True, text=True, timeout=600)


def run_bash(code: str, folder: Path) -> subprocess.CompletedProcess:
    for name in TOOL_FOLDERS:
        if not (folder / name).exists():
            (folder / name).symlink_to(REPO / name, target_is_directory=True)
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=folder, capture_output=True,
                          text=True, timeout=600, env=environment)


def check_library_export_output(stderr: str) -> None:
    """The library's export shows its numbered steps, all of them (fp32: 4), and nothing else:
    no torch exporter warnings."""
    steps = re.findall(r"^\[(\d)/(\d)\] ", stderr, re.M)
    assert steps == [(str(step), "4") for step in range(1, 5)], stderr
    assert [line for line in stderr.splitlines() if not line.startswith(("[", " "))] == [], stderr


def expected_for(document: str, code: str) -> List[str]:
    return [line for (page, phrase), lines in EXPECTED.items() if page == document and phrase in code
            for line in lines]


@pytest.mark.parametrize("document", [document for document in DOCUMENTS
                                      if any(block.runs for block in blocks(document))])
def test_the_documents_code_runs_as_written(document, tmp_path):
    folder, scratch = tmp_path / "work", tmp_path / "scratch"
    folder.mkdir()
    scratch.mkdir()
    for index, block in enumerate(blocks(document)):
        if not block.runs:
            continue
        result = (run_python(block.code, folder, scratch, index) if block.language == "python"
                  else run_bash(block.code, folder))
        where = f"{document} block {index}:\n{block.code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        assert result.returncode == 0, where
        assert "Traceback" not in result.stderr and "torchvision" not in result.stderr, where
        for line in expected_for(document, block.code):
            assert line in result.stdout, where
        if "export_onnx(" in block.code:
            check_library_export_output(result.stderr)
    made = {path.name for path in folder.iterdir()} - set(TOOL_FOLDERS)
    assert made == WRITES.get(document, made)


def test_every_expectation_finds_its_one_snippet():
    for (document, phrase) in EXPECTED:
        assert sum(phrase in block.code for block in blocks(document) if block.runs) == 1, (document, phrase)
    assert set(WRITES) <= set(DOCUMENTS)


def test_the_block_reader_sees_marks_and_languages():
    text = f"x\n```python\nprint(1)\n```\n{RUN_MARK}\n```bash\necho 2\n```\n```bash\necho 3\n```\n"
    found = [(match["language"], match["code"], bool(match["mark"])) for match in BLOCK.finditer(text)]
    assert found == [("python", "print(1)\n", False), ("bash", "echo 2\n", True), ("bash", "echo 3\n", False)]
