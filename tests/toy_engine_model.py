"""A tiny ONNX model that honours the docs/contract.md §6 I/O contract, for runtime tests.

Its outputs are simple, exactly computable functions of the inputs, so tests can check them
with NumPy and compare batched against single-clip runs with ``np.array_equal``:

- ``embedding[n, j] = mean_pixel[n, j % 12] * 2 ** (j % 3) + 1000 * (camera[n] + 1)``, where
  ``mean_pixel[n]`` is the per-frame, per-channel mean of ``frames[n]`` flattened to 12 values.
  Pixel sums stay below 2**24 and the projection has one non-zero per column, so every float
  operation is exact whatever the batch size.
- ``part_weights[n, i, p] = keypoints[n, 0, p, 0] / crop_size[n, 0, 0] + i / 1024``.

Every graph input passes through a Cast to the contract's type, so a test can declare an input
with another name, dtype or shape and still get a model that loads.
"""
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from keyreid.contract import (CLIP_FRAMES, IMAGE_HEIGHT, IMAGE_WIDTH, INPUTS, NUM_KEYPOINTS, NUM_PARTS, NUM_PATCHES,
                              HeatmapMode, embedding_dim, stack_clips)
from keyreid.model_metadata import ModelMetadata

_ONNX_TYPES = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.float32): TensorProto.FLOAT,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.float64): TensorProto.DOUBLE,
               np.dtype(np.int32): TensorProto.INT32}
_PIXELS_PER_FRAME = 256 * 128          # a power of two: the mean is exact


def _value_info(name: str, elem_type: int, shape: Sequence[object]):
    dims = [dim if isinstance(dim, (int, str)) else None for dim in shape]
    return helper.make_tensor_value_info(name, elem_type, dims)


def projection(length: int) -> np.ndarray:
    """[12, length] with one power of two per column: keeps the MatMul exact."""
    weights = np.zeros((CLIP_FRAMES * 3, length), np.float32)
    columns = np.arange(length)
    weights[columns % 12, columns] = 2.0 ** (columns % 3)
    return weights


def expected_outputs(feed: Dict[str, np.ndarray], width: int = 4) -> Dict[str, np.ndarray]:
    """What the toy model computes, in NumPy."""
    frames = feed["frames"].astype(np.float32)
    mean_pixel = frames.sum(axis=(2, 3)).reshape(len(frames), -1) / np.float32(_PIXELS_PER_FRAME)
    camera_term = (feed["camera"].astype(np.float32)[:, None] + 1) * 1000
    embedding = mean_pixel @ projection(embedding_dim(width)) + camera_term
    ramp = (np.arange(NUM_PATCHES, dtype=np.float32) / 1024)[None, :, None]
    per_part = feed["keypoints"][:, 0, :NUM_PARTS, 0] / feed["crop_size"][:, 0, :1]
    return {"embedding": embedding.astype(np.float32), "part_weights": (per_part[:, None, :] + ramp).astype(np.float32)}


def toy_metadata(width: int, num_cameras: Optional[int]) -> Dict[str, str]:
    """What an exported file records (keyreid/model_metadata.py), for a toy model of width D;
    ``num_cameras`` None leaves that key out (a file the schema refuses)."""
    entries = ModelMetadata(
        heatmap_mode=HeatmapMode.MAX, precision="fp32", num_cameras=num_cameras or 1, embed_dim=width,
        embedding_dim=embedding_dim(width), clip_frames=CLIP_FRAMES,
        num_keypoints=NUM_KEYPOINTS, image_height=IMAGE_HEIGHT, image_width=IMAGE_WIDTH,
        keyreid_version="toy", opset=17, checkpoint_sha256="0" * 64, checkpoint_name="toy").to_strings()
    if num_cameras is None:
        del entries["num_cameras"]
    else:
        entries["num_cameras"] = str(num_cameras)
    return entries


def build_toy_model(path: Path, *, width: int = 4, num_cameras: Optional[int] = 6,
                    inputs: Optional[Dict[str, dict]] = None,
                    embedding_length: Optional[int] = None, dynamic_embedding_length: bool = False,
                    drop_outputs: Sequence[str] = (), extra_output: bool = False) -> Path:
    """Write the toy model to ``path``.

    Args:
        width: model width D; the embedding has 25 * D floats.
        num_cameras: written to metadata_props ``num_cameras`` (with the rest of the schema);
            None leaves that key out.
        inputs: per contract input name, overrides of how the graph declares it:
            ``{"frames": {"name": "images", "dtype": np.float32, "shape": [1, 4, 256, 128, 3]}}``.
        embedding_length: overrides the embedding length (default 25 * D).
        dynamic_embedding_length: hide the length from shape inference (a runtime Reshape), so
            the model declares ``embedding`` as [N, E] with E dynamic.
        drop_outputs: contract outputs the graph does not declare.
        extra_output: also declare an output ``debug`` outside the contract.
    """
    inputs = inputs or {}
    length = embedding_length or embedding_dim(width)
    nodes, graph_inputs = [], []
    for spec in INPUTS:
        declared = inputs.get(spec.name, {})
        name = declared.get("name", spec.name)
        dtype = np.dtype(declared.get("dtype", spec.dtype))
        shape = declared.get("shape", spec.shape)
        graph_inputs.append(_value_info(name, _ONNX_TYPES[dtype], shape))
        nodes.append(helper.make_node("Cast", [name], [f"{spec.name}_in"], to=_ONNX_TYPES[spec.dtype]))

    constants = [
        numpy_helper.from_array(np.array([2, 3], np.int64), "pixel_axes"),
        numpy_helper.from_array(np.array(1.0 / _PIXELS_PER_FRAME, np.float32), "inv_pixels"),
        numpy_helper.from_array(np.array([-1, CLIP_FRAMES * 3], np.int64), "flat_shape"),
        numpy_helper.from_array(projection(length), "projection"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(1000.0, np.float32), "thousand"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "start0"),
        numpy_helper.from_array(np.array([NUM_PARTS], np.int64), "end_parts"),
        numpy_helper.from_array(np.array([1, NUM_PATCHES, NUM_PARTS], np.int64), "pw_shape"),
        numpy_helper.from_array((np.arange(NUM_PATCHES, dtype=np.float32) / 1024)[:, None], "ramp"),
    ]
    nodes += [
        helper.make_node("Cast", ["frames_in"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["pixels", "pixel_axes"], ["pixel_sums"], keepdims=0),
        helper.make_node("Mul", ["pixel_sums", "inv_pixels"], ["pixel_means"]),
        helper.make_node("Reshape", ["pixel_means", "flat_shape"], ["flat_means"]),
        helper.make_node("MatMul", ["flat_means", "projection"], ["projected"]),
        helper.make_node("Cast", ["camera_in"], ["camera_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["camera_f", "axis1"], ["camera_col"]),
        helper.make_node("Add", ["camera_col", "one"], ["camera_shifted"]),
        helper.make_node("Mul", ["camera_shifted", "thousand"], ["camera_term"]),
        helper.make_node("Add", ["projected", "camera_term"], ["embedding_raw"]),
        helper.make_node("Gather", ["keypoints_in", "zero"], ["first_frame"], axis=1),     # [N,17,3]
        helper.make_node("Gather", ["first_frame", "zero"], ["joint_x"], axis=2),          # [N,17]
        helper.make_node("Slice", ["joint_x", "start0", "end_parts", "axis1"], ["part_x"]),  # [N,6]
        helper.make_node("Gather", ["crop_size_in", "zero"], ["first_crop"], axis=1),      # [N,2]
        helper.make_node("Slice", ["first_crop", "start0", "axis1", "axis1"], ["crop_w"]),  # [N,1]
        helper.make_node("Div", ["part_x", "crop_w"], ["part_scaled"]),
        helper.make_node("Unsqueeze", ["part_scaled", "axis1"], ["part_row"]),            # [N,1,6]
        helper.make_node("Expand", ["part_row", "pw_shape"], ["part_rows"]),               # [N,128,6]
        helper.make_node("Add", ["part_rows", "ramp"], ["part_weights"]),
        helper.make_node("Identity", ["camera_f"], ["debug"]),
    ]
    if dynamic_embedding_length:    # reshape to a shape computed at run time: [N, -1]
        nodes += [helper.make_node("Shape", ["embedding_raw"], ["raw_shape"], end=1),
                  helper.make_node("Concat", ["raw_shape", "minus_one"], ["runtime_shape"], axis=0),
                  helper.make_node("Reshape", ["embedding_raw", "runtime_shape"], ["embedding"])]
        constants.append(numpy_helper.from_array(np.array([-1], np.int64), "minus_one"))
    else:
        nodes.append(helper.make_node("Identity", ["embedding_raw"], ["embedding"]))
    declared_length = "E" if dynamic_embedding_length else length
    outputs = [_value_info("embedding", TensorProto.FLOAT, ("N", declared_length)),
               _value_info("part_weights", TensorProto.FLOAT, ("N", NUM_PATCHES, NUM_PARTS))]
    outputs = [output for output in outputs if output.name not in drop_outputs]
    if extra_output:
        outputs.append(_value_info("debug", TensorProto.FLOAT, ("N",)))

    graph = helper.make_graph(nodes, "toy_keyreid", graph_inputs, outputs, initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    helper.set_model_props(model, toy_metadata(width, num_cameras))
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def random_clip(rng: np.random.Generator, camera: int = 0) -> dict:
    """One clip request with realistic-looking values (frames uint8, keypoints in crop pixels)."""
    crop = np.array([128.0, 256.0], np.float32)
    keypoints = rng.uniform(0, 1, (CLIP_FRAMES, 17, 3)).astype(np.float32) * np.array([128, 256, 1], np.float32)
    return {"frames": rng.integers(0, 256, (CLIP_FRAMES, 256, 128, 3), dtype=np.uint8),
            "keypoints": keypoints,
            "crop_size": np.tile(crop, (CLIP_FRAMES, 1)),
            "camera": camera}


batch_feed = stack_clips       # the tests' name for it
