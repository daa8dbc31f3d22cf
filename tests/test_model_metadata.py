"""The metadata schema (keyreid/model_metadata.py): what export writes is what every backend reads,
and a file that does not fit gets one error naming the file and every problem."""
import onnx
import pytest

from keyreid.contract import HeatmapMode
from keyreid.errors import KeyreidError
from keyreid.model_metadata import ModelMetadata, read_metadata
from keyreid.runtime.backends import open_engine
from toy_engine_model import toy_metadata


def entries(**changes):
    values = toy_metadata(width=4, num_cameras=6)
    values.update(changes)
    return {key: value for key, value in values.items() if value is not None}


def test_strings_read_back_as_the_same_typed_metadata():
    metadata = read_metadata(entries(), "toy.onnx")
    assert isinstance(metadata, ModelMetadata) and metadata.heatmap_mode is HeatmapMode.MAX
    assert (metadata.num_cameras, metadata.embed_dim, metadata.clip_frames) == (6, 4, 4)
    assert read_metadata(metadata.to_strings(), "again") == metadata


@pytest.mark.parametrize("changes, problem", [
    ({"heatmap_mode": "gaussian"}, "heatmap_mode 'gaussian' is not one of max, mean, blank"),
    ({"precision": "int4"}, "precision 'int4' is not one of"),
    ({"num_cameras": "0"}, "num_cameras='0' is not a positive integer"),
    ({"clip_frames": "four"}, "clip_frames='four' is not an integer"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"heatmap_mode": None}, "missing key 'heatmap_mode'"),
    ({"embedding_dim": "101"}, "embedding_dim 101 is not embed_dim"),
    ({"num_keypoints": "18"}, "num_keypoints 18"),
])
def test_a_bad_entry_is_named_with_the_file(changes, problem):
    with pytest.raises(KeyreidError) as error:
        read_metadata(entries(**changes), "model.onnx")
    assert str(error.value).startswith("model.onnx: ") and problem in str(error.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(KeyreidError) as error:
        read_metadata(entries(heatmap_mode="gaussian", colour="blue", opset=None), "model.onnx")
    assert all(part in str(error.value) for part in ("gaussian", "colour", "missing key 'opset'"))


def test_the_exported_file_carries_the_schema_and_the_engine_reads_it(reduced_onnx):
    stored = {entry.key: entry.value for entry in onnx.load(str(reduced_onnx), load_external_data=False).metadata_props}
    metadata = read_metadata(stored, reduced_onnx)
    with open_engine(reduced_onnx) as engine:
        assert engine.metadata == metadata
        assert engine.clip_frames == metadata.clip_frames == engine.input_specs[0].shape[1]
        assert engine.embedding_dim == metadata.embedding_dim


def test_a_file_whose_tensors_disagree_with_its_metadata_is_refused(tmp_path):
    from toy_engine_model import build_toy_model

    path = build_toy_model(tmp_path / "toy.onnx")
    model = onnx.load(str(path))
    for entry in model.metadata_props:
        if entry.key in ("clip_frames", "embedding_dim"):
            entry.value = {"clip_frames": "8", "embedding_dim": str(4 * (1 + 6 * 8))}[entry.key]
    onnx.save(model, str(path))
    with pytest.raises(KeyreidError) as error:
        open_engine(path).activate()
    assert "axis 1 of input 'frames' is 4; the contract needs 8" in str(error.value)
