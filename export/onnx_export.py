"""Checkpoint -> ONNX model honouring docs/contract.md §6, with the KeypointPartPool node and body.

Steps (each a function, so tests and the CLI compose them): build the deploy model, export it
with the dynamo exporter (the op becomes one custom node), attach the op's standard-op body,
convert precision, stamp metadata, check, and write the file whole.
"""
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from keyreid import __version__
from keyreid.contract import (CLIP_FRAMES, IMAGE_HEIGHT, IMAGE_WIDTH, INPUT_NAMES, NUM_KEYPOINTS, ONNX_OPSET,
                              OUTPUT_NAMES, HeatmapMode)
from keyreid.errors import KeyreidError
from keyreid.model_metadata import ModelMetadata
from keyreid.files import check_writable, write_bytes
from keyreid.lazy import require

DEFAULT_OPSET = ONNX_OPSET
EXPORT_EXAMPLE_CLIPS = 2
PROTOBUF_LIMIT = 2 ** 31 - 1


def build_deploy_model(checkpoint, heatmap_mode: str):
    from keyreid.export.deploy_model import DeployKeyReID
    from keyreid.kernels.graph_op import GraphPartPool
    from keyreid.kernels.reference import check_mode

    check_mode(heatmap_mode)
    return DeployKeyReID(checkpoint.state_dict, checkpoint.config, GraphPartPool(heatmap_mode))


def example_inputs(num_clips: int = EXPORT_EXAMPLE_CLIPS):
    torch = require("torch")
    from keyreid.synthetic import realistic_keypoints, synthetic_frames

    rng = np.random.default_rng(0)
    keypoints, crop_size = realistic_keypoints(rng, num_clips)
    return (torch.from_numpy(synthetic_frames(rng, num_clips)), torch.from_numpy(keypoints),
            torch.from_numpy(crop_size), torch.zeros(num_clips, dtype=torch.int64))


def export_fp32(checkpoint, heatmap_mode: str, opset: int = DEFAULT_OPSET):
    """The fp32 ModelProto: deploy graph + ``keyreid::KeypointPartPool`` with its function."""
    torch = require("torch")
    require("onnxscript")
    from keyreid.kernels.graph_op import onnx_translation_table
    from keyreid.export.quiet_logs import exporter_logs_quietened
    from keyreid.kernels.onnx_function import attach_part_pool_function

    model = build_deploy_model(checkpoint, heatmap_mode)
    clips = torch.export.Dim("N", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad(), exporter_logs_quietened():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, example_inputs(), dynamo=True, opset_version=opset, verbose=False,
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            dynamic_shapes={name: {0: clips} for name in INPUT_NAMES},
            custom_translation_table=onnx_translation_table(), optimize=True)
    proto = program.model_proto
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    with exporter_logs_quietened():     # the op's function body is exported by torch.onnx too
        return attach_part_pool_function(proto, heatmap_mode)


def stamp_metadata(model, checkpoint, heatmap_mode: str, precision: str, opset: int,
                   int8_target: Optional[str] = None) -> None:
    """metadata_props the runtime reads back (cameras, an int8 file's target CPU) and a user
    audits (provenance). ``int8_target`` is required for an int8 model: the one ``to_int8`` used."""
    from keyreid.int8_targets import recipe_metadata

    config = checkpoint.config
    metadata = ModelMetadata(
        heatmap_mode=HeatmapMode(heatmap_mode), precision=precision, num_cameras=config.num_cameras,
        embed_dim=config.embed_dim, embedding_dim=config.embedding_dim, clip_frames=CLIP_FRAMES,
        num_keypoints=NUM_KEYPOINTS, image_height=IMAGE_HEIGHT, image_width=IMAGE_WIDTH,
        keyreid_version=__version__, opset=opset, checkpoint_sha256=checkpoint.sha256,
        checkpoint_name=checkpoint.path.name)
    if precision == "int8":
        if int8_target is None:
            raise KeyreidError("an int8 model's metadata needs the target CPU its weights were made for")
        metadata = metadata.replace(**recipe_metadata(int8_target))
    entries = metadata.to_strings()
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name, model.producer_version = "keyreid", __version__
    model.doc_string = (f"KeyRe-ID re-identification, {precision}, heatmap mode {heatmap_mode}: "
                        "frames/keypoints/crop_size/camera -> embedding, part_weights")


def check_model(model) -> None:
    onnx = require("onnx")
    if model.ByteSize() < PROTOBUF_LIMIT:
        onnx.checker.check_model(model, full_check=True)
    else:
        raise KeyreidError("the exported model is over 2 GB; keyreid writes single-file models only")


def write_model_atomically(model, output: Path) -> Path:
    """Serialise ``model`` and write it whole: no partial model is ever left at ``output``."""
    return write_bytes(check_writable(output, "model"), model.SerializeToString())
