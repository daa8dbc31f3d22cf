"""Shared fixtures: random upstream-format checkpoints and realistic synthetic inputs.

Nothing here downloads weights or data. The full ViT-B checkpoint (~840 MiB, ~25 s to write and
load) is made once per session and only for the tests that ask for it; most tests use the
reduced-width model, which runs the same code.
"""
import numpy as np
import pytest

from keyreid.export.config import REDUCED, VIT_B
from keyreid.export.random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="session")
def reduced_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "reduced.pth", REDUCED, seed=1)


@pytest.fixture(scope="session")
def small_residual_checkpoint(tmp_path_factory):
    """Reduced model whose residual stream is tiny, so part weights W move the embedding."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "small_residual.pth",
                                   REDUCED, seed=2, residual_scale=1e-3)


@pytest.fixture(scope="session")
def full_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "vit_b.pth", VIT_B, seed=0)


@pytest.fixture(scope="session")
def reduced_model(reduced_checkpoint):
    from keyreid.export.checkpoint import load_reference_model
    return load_reference_model(reduced_checkpoint)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def reduced_onnx(reduced_checkpoint, tmp_path_factory):
    """fp32 ONNX of the reduced checkpoint, heatmap mode max, made by the export CLI (~25 s)."""
    from keyreid.export.to_onnx import main
    output = tmp_path_factory.mktemp("onnx") / "reduced_fp32.onnx"
    assert main([str(reduced_checkpoint), "--output", str(output), "--quiet"]) == 0
    return output
