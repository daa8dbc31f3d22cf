"""The README's Python API examples run as written (in a folder holding the files they name)."""
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from keyreid.synthetic import write_synthetic_tracklet

from toy_engine_model import build_toy_model, random_clip

REPO = Path(__file__).resolve().parents[1]


RUNTIME_EXAMPLE = "from keyreid.runtime import PoseTally"
EXPORT_EXAMPLE = "from keyreid.export import"


def readme_example(first_line: str) -> str:
    """The one README Python block that starts with ``first_line``."""
    blocks = [block for block in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
              if block.startswith(first_line)]
    assert len(blocks) == 1, f"{len(blocks)} README examples start with {first_line!r}"
    return blocks[0]


def test_readme_has_a_runtime_and_an_export_example():
    assert "run_tracklets" in readme_example(RUNTIME_EXAMPLE)
    assert "export_model" in readme_example(EXPORT_EXAMPLE)


def test_readme_runtime_example_embeds_tracklets_and_a_clip(tmp_path, monkeypatch, capsys):
    build_toy_model(tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    for name in ("alice", "bob"):
        write_synthetic_tracklet(tmp_path / "tracklets" / name, 5, rng)
    clip = random_clip(rng, 0)
    namespace = {"frames": clip["frames"], "keypoints": clip["keypoints"], "crop_size": clip["crop_size"]}
    monkeypatch.chdir(tmp_path)
    exec(readme_example(RUNTIME_EXAMPLE), namespace)
    assert namespace["run"].features.shape == (2, 100) and namespace["embedding"].shape == (100,)
    assert "['alice', 'bob'] []" in capsys.readouterr().out


def test_readme_export_example_writes_a_model_that_loads(reduced_checkpoint, tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    shutil.copy(reduced_checkpoint, tmp_path / "ckpt.pth")
    monkeypatch.chdir(tmp_path)
    exec(readme_example(EXPORT_EXAMPLE), {})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth", "model.onnx"]
    assert {entry.key for entry in onnx.load("model.onnx").metadata_props} >= {"heatmap_mode", "num_cameras"}
