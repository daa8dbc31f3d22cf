"""The reference model computes docs/contract.md §2 (checked against an independent literal version)."""
import numpy as np
import pytest
import torch

from keyreid.errors import KeyreidError
from keyreid.export.checkpoint import load_checkpoint, load_reference_model
from keyreid.export.reference_model import reference_outputs, temporal_clip_shift_shuffle
from keyreid.synthetic import synthetic_frames
from spec_model import spec_clip_embedding


def _inputs(rng, clips):
    frames = synthetic_frames(rng, clips)
    part_weights = rng.uniform(-1, 1, (clips, 128, 6)).astype(np.float32)
    return frames, part_weights


def _check_against_spec(checkpoint_path, model, rng, cameras, rtol):
    checkpoint = load_checkpoint(checkpoint_path)
    frames, part_weights = _inputs(rng, len(cameras))
    embedding = reference_outputs(model, frames, None, None, np.array(cameras),
                                  part_weights=part_weights)["embedding"]
    for clip, camera in enumerate(cameras):
        expected = spec_clip_embedding(checkpoint.state_dict, frames[clip],
                                       torch.from_numpy(part_weights[clip]), camera,
                                       checkpoint.config.num_heads, checkpoint.config.used_blocks)
        error = np.abs(embedding[clip] - expected.numpy()).max() / np.abs(expected.numpy()).max()
        assert error < rtol, f"clip {clip}: relative error {error:.2e}"
    return embedding


def test_reduced_model_matches_literal_spec(reduced_checkpoint, reduced_model, rng):
    embedding = _check_against_spec(reduced_checkpoint, reduced_model, rng, [2, -1, 0], 1e-5)
    assert embedding.shape == (3, 25 * 128)


def test_full_vit_b_checkpoint_loads_strictly_and_matches_spec(full_checkpoint, rng):
    model = load_reference_model(full_checkpoint)
    embedding = _check_against_spec(full_checkpoint, model, rng, [3], 1e-5)
    assert embedding.shape == (1, 19200) and np.isfinite(embedding).all()


def test_tcss_row_mapping_follows_the_spec():
    D = 2
    features = torch.arange(4 * 129 * D, dtype=torch.float32).reshape(4, 129, D)
    rows, token = temporal_clip_shift_shuffle(features, clips=1)
    R = features.reshape(129, 4 * D)
    assert torch.equal(token[0, 0], R[0])
    P = torch.cat([R[5:], R[1:5]])
    for i in range(64):
        assert torch.equal(rows[0, 2 * i], P[i]) and torch.equal(rows[0, 2 * i + 1], P[64 + i])


def test_clips_in_a_batch_do_not_affect_each_other(reduced_model, rng):
    frames, part_weights = _inputs(rng, 3)
    cameras = np.array([0, 5, -1])
    batched = reference_outputs(reduced_model, frames, None, None, cameras,
                                part_weights=part_weights)["embedding"]
    for clip in range(3):
        single = reference_outputs(reduced_model, frames[clip:clip + 1], None, None,
                                   cameras[clip:clip + 1],
                                   part_weights=part_weights[clip:clip + 1])["embedding"]
        np.testing.assert_allclose(single[0], batched[clip], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("camera", [6, -2, 100])
def test_out_of_range_camera_is_an_error(reduced_model, rng, camera):
    frames, part_weights = _inputs(rng, 1)
    with pytest.raises(KeyreidError, match=f"camera {camera} is out of range"):
        reference_outputs(reduced_model, frames, None, None, np.array([camera]),
                          part_weights=part_weights)


def test_changing_one_part_column_moves_only_that_part_feature(small_residual_checkpoint, rng):
    model = load_reference_model(small_residual_checkpoint)
    frames, part_weights = _inputs(rng, 1)
    changed = part_weights.copy()
    changed[0, :, 2] = rng.uniform(0, 0.01, 128)  # left arm: near-zero positive weights
    run = lambda weights: reference_outputs(model, frames, None, None, np.array([0]),
                                            part_weights=weights)["embedding"][0]
    before, after = run(part_weights), run(changed)
    D, P = 128, 512
    moved = [np.abs(after[D + p * P: D + (p + 1) * P] - before[D + p * P: D + (p + 1) * P]).max()
             for p in range(6)]
    np.testing.assert_array_equal(after[:D], before[:D])
    assert moved[2] > 1e-3 and max(moved[:2] + moved[3:]) == 0
