"""The README's appliance example runs as written, without torch."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "### An appliance: tracks in, identities out"


def appliance_example() -> str:
    readme = (REPO / "README.md").read_text()
    assert SECTION in readme
    return re.search(r"```python\n(.*?)```", readme[readme.index(SECTION):], re.S).group(1)


def test_readme_appliance_example_runs_and_matches_across_cameras(reduced_onnx, tmp_path):
    code = "import sys; sys.modules['torch'] = None  # the runtime must not need torch\n" + appliance_example()
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KEYREID_MODEL": str(reduced_onnx)})
    assert result.returncode == 0, result.stderr
    assert "cam1-track3 looks like cam0-track7 (camera 0)" in result.stdout
    assert (tmp_path / "gallery.npz").is_file()
