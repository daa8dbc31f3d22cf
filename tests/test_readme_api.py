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


def readme_python_blocks():
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_has_a_runtime_and_an_export_example():
    blocks = readme_python_blocks()
    assert len(blocks) == 2
    assert "from keyreid.runtime import" in blocks[0] and "from keyreid.export import" in blocks[1]


def test_readme_runtime_example_embeds_tracklets_and_a_clip(tmp_path, monkeypatch, capsys):
    build_toy_model(tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    for name in ("alice", "bob"):
        write_synthetic_tracklet(tmp_path / "tracklets" / name, 5, rng)
    clip = random_clip(rng, 0)
    namespace = {"frames": clip["frames"], "keypoints": clip["keypoints"], "crop_size": clip["crop_size"]}
    monkeypatch.chdir(tmp_path)
    exec(readme_python_blocks()[0], namespace)
    assert namespace["run"].features.shape == (2, 100) and namespace["embedding"].shape == (100,)
    assert "['alice', 'bob'] []" in capsys.readouterr().out


def test_readme_export_example_writes_a_model_that_loads(reduced_checkpoint, tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    shutil.copy(reduced_checkpoint, tmp_path / "ckpt.pth")
    monkeypatch.chdir(tmp_path)
    exec(readme_python_blocks()[1], {})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth", "model.onnx"]
    assert {entry.key for entry in onnx.load("model.onnx").metadata_props} >= {"heatmap_mode", "num_cameras"}
