"""The checkpoint loader: every upstream format loads strictly; every bad file gets one sentence."""
import pickle

import numpy as np
import pytest
import torch

from keyreid.errors import KeyreidError
from keyreid.export.checkpoint import load_checkpoint, load_reference_model
from keyreid.export.config import REDUCED, ModelConfig
from keyreid.export.random_checkpoint import random_state_dict, write_random_checkpoint


def test_plain_state_dict_infers_cameras_identities_and_width(reduced_checkpoint):
    checkpoint = load_checkpoint(reduced_checkpoint)
    assert checkpoint.config == REDUCED
    assert len(checkpoint.sha256) == 64


@pytest.mark.parametrize("wrapper,dataparallel", [("model", False), ("state_dict", False),
                                                  ("", True), ("state_dict", True)])
def test_wrapped_and_dataparallel_checkpoints_load_the_same_tensors(tmp_path, reduced_checkpoint,
                                                                      wrapper, dataparallel):
    path = write_random_checkpoint(tmp_path / "wrapped.pth", REDUCED, seed=1, wrapper=wrapper,
                                   dataparallel=dataparallel)
    plain = load_checkpoint(reduced_checkpoint).state_dict
    wrapped = load_checkpoint(path).state_dict
    assert plain.keys() == wrapped.keys()
    assert all(torch.equal(plain[key], wrapped[key]) for key in plain)


def test_ilids_checkpoint_with_two_cameras(tmp_path):
    config = ModelConfig(embed_dim=128, depth=3, num_cameras=2, num_identities=150)
    path = write_random_checkpoint(tmp_path / "ilids.pth", config)
    assert load_checkpoint(path).config == config


def test_every_used_key_is_consumed_and_only_unused_keys_are_dropped(reduced_checkpoint):
    raw = torch.load(reduced_checkpoint, weights_only=True)
    kept = load_checkpoint(reduced_checkpoint).state_dict
    dropped = sorted(set(raw) - set(kept))
    assert all(key.startswith(("block1.", f"base.blocks.{REDUCED.depth - 1}.", "base.norm.",
                               "base.fc.", "classifier")) for key in dropped)
    assert any(key.startswith("block1.") for key in dropped)
    model = load_reference_model(reduced_checkpoint)  # strict=True inside
    assert set(model.state_dict()) == set(kept)
    assert torch.equal(model.b2[0].attn.qkv.weight, raw["block1.attn.qkv.weight"])


def _save(path, obj):
    torch.save(obj, path)
    return path


def _message(path):
    with pytest.raises(KeyreidError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_file_is_named(tmp_path):
    assert "no such file" in _message(tmp_path / "nope.pth")


def test_directory_is_not_a_checkpoint(tmp_path):
    assert "directory" in _message(tmp_path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    assert "not a" in _message(path)


def test_truncated_checkpoint_is_reported(tmp_path, reduced_checkpoint):
    data = reduced_checkpoint.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _message(path)


class NotATensor:
    pass


def test_pickled_python_objects_are_refused_not_executed(tmp_path):
    path = _save(tmp_path / "objects.pth", {"base.cls_token": torch.zeros(1), "x": NotATensor()})
    assert "weights_only" in _message(path)


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_are_not_a_pytorch_checkpoint(tmp_path, seed):
    path = tmp_path / "random.pth"
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    message = _message(path)
    assert "is not a PyTorch checkpoint" in message and "Python objects" not in message


def test_checkpoint_with_zero_cameras_is_refused_when_loaded_naming_it(tmp_path):
    state_dict = random_state_dict(REDUCED)
    state_dict["base.Cam"] = torch.zeros(0, 1, REDUCED.embed_dim)
    path = _save(tmp_path / "no_cameras.pth", state_dict)
    message = _message(path)
    assert str(path) in message and "at least one camera" in message


def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    _message(path)


def test_other_network_is_not_keyreid(tmp_path):
    path = _save(tmp_path / "resnet.pth", {"conv1.weight": torch.zeros(64, 3, 7, 7),
                                           "fc.weight": torch.zeros(10, 512)})
    assert "not a KeyRe-ID checkpoint" in _message(path)


def test_vit_without_keyreid_branches_is_another_architecture(tmp_path):
    state_dict = {key: value for key, value in random_state_dict(REDUCED).items()
                  if key.startswith("base.")}
    message = _message(_save(tmp_path / "vit.pth", state_dict))
    assert "another re-id architecture" in message and "b1.0.norm1.weight" in message


def test_missing_tensors_are_listed(tmp_path):
    state_dict = random_state_dict(REDUCED)
    del state_dict["b1.0.attn.qkv.bias"], state_dict["bottleneck_3.running_var"]
    message = _message(_save(tmp_path / "missing.pth", state_dict))
    assert "missing 2" in message and "b1.0.attn.qkv.bias" in message


def test_tensor_with_wrong_shape_is_named(tmp_path):
    state_dict = random_state_dict(REDUCED)
    state_dict["b2.0.mlp.fc1.weight"] = torch.zeros(10, 512)
    message = _message(_save(tmp_path / "shape.pth", state_dict))
    assert "b2.0.mlp.fc1.weight" in message and "[10, 512]" in message


def test_other_input_size_is_reported(tmp_path):
    state_dict = random_state_dict(REDUCED)
    state_dict["base.pos_embed"] = torch.zeros(1, 211, REDUCED.embed_dim)
    assert "input size" in _message(_save(tmp_path / "size.pth", state_dict))


def test_unexpected_extra_tensors_are_listed(tmp_path):
    state_dict = random_state_dict(REDUCED)
    state_dict["b3.0.weight"] = torch.zeros(3)
    assert "b3.0.weight" in _message(_save(tmp_path / "extra.pth", state_dict))


def test_nan_weights_are_rejected(tmp_path):
    state_dict = random_state_dict(REDUCED)
    state_dict["b1.1.weight"][3] = float("nan")
    assert "NaN" in _message(_save(tmp_path / "nan.pth", state_dict))
