"""NNCF post-training int8 of an fp32 model for OpenVINO: the recipe and the calibration clips.

NNCF's transformer preset (``ModelType.TRANSFORMER``: symmetric int8 weights per channel,
asymmetric activations, SmoothQuant on MatMuls) quantises every product it finds. Three things
are kept out of it (``ignored_scope``), because each costs more accuracy than it buys speed:

- the keypoint op (docs/contract.md §6): every node upstream of ``part_weights`` that depends on
  keypoints/crop_size only. Its part weights must stay within 1e-5 of fp32, which int8 cannot
  give; the op is a small part of the time.
- the patch embedding (the first product on the frames): its 768-long dot products over raw
  pixels cost ONNX Runtime's int8 recipe 5.8e-4 of embedding cosine on their own.
- in the kept recipe, the head (``ignore_head``): every product that does not feed the point
  where the part weights meet the backbone's tokens (the part and global branches and what
  follows). It runs on a few tokens per clip, so f32 costs little time there, while its
  int8 error reaches the embedding undiluted (reduced model: cosine 0.99909 -> 0.99963).

Which recipe is the default, and what each one measured on ViT-B, is benchmarks/RESULTS.md
section 8. Calibration runs on clips one at a time (the batch axis stays dynamic): synthetic
clips with realistic poses, varied crop sizes and every camera, or the user's own tracklets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.lazy import require
from keyreid.runtime.backends.openvino import OUTPUT_PART_WEIGHTS

_NNCF_FOR = ("nncf", "int8 for OpenVINO (pip install keyreid[openvino-int8])")
NETWORK_INPUTS = ("frames", "camera")           # what the keypoint op does not read
PRODUCT_TYPES = ("MatMul", "Convolution")       # what NNCF quantises in this graph
DEFAULT_CALIBRATION_CLIPS = 16
CALIBRATION_SEED = 7                            # apart from the verification's clips (seed 0)


@dataclass(frozen=True)
class OpenVinoInt8Recipe:
    """What stays in f32 and how NNCF smooths activations."""
    name: str
    ignore_keypoint_op: bool = True
    ignore_patch_embedding: bool = True
    ignore_head: bool = False
    # SmoothQuant's alpha for MatMuls: None keeps NNCF's transformer default (0.95); a negative
    # value switches SmoothQuant off.
    smooth_quant_alpha: Optional[float] = None
    fast_bias_correction: bool = True
    # Activation ranges from the calibration clips' plain min and max instead of the transformer
    # preset's outlier-trimming estimate: trimming clips the rare large activations that the
    # embedding depends on (reduced model, 12 varied clips: lowest cosine 0.99875 -> 0.99971).
    min_max_ranges: bool = False


# Every recipe measured (benchmarks/RESULTS.md section 8), kept so that the table can be re-run.
RECIPES: Dict[str, OpenVinoInt8Recipe] = {recipe.name: recipe for recipe in (
    OpenVinoInt8Recipe("nncf-default", ignore_keypoint_op=False, ignore_patch_embedding=False),
    OpenVinoInt8Recipe("f32-op-patch"),
    OpenVinoInt8Recipe("f32-op-patch-sq0.3", smooth_quant_alpha=0.3),
    OpenVinoInt8Recipe("f32-op-patch-no-sq", smooth_quant_alpha=-1.0),
    OpenVinoInt8Recipe("f32-op-patch-head-no-sq", ignore_head=True, smooth_quant_alpha=-1.0),
    OpenVinoInt8Recipe("f32-op-patch-head-sq0.3", ignore_head=True, smooth_quant_alpha=0.3),
    OpenVinoInt8Recipe("f32-op-patch-head-no-sq-minmax", ignore_head=True, smooth_quant_alpha=-1.0,
                       min_max_ranges=True),
)}
DEFAULT_RECIPE = "f32-op-patch-head-no-sq-minmax"


# ----------------------------------------------------------------------------- graph walks
def _producers(op) -> list:
    return [port.get_source_output().get_node() for port in op.inputs()]


def _consumers(op) -> list:
    return [target.get_node() for output in op.outputs() for target in output.get_target_inputs()]


def _walk(starts, neighbours) -> Set[str]:
    """Friendly names of every op reachable from ``starts`` (included) through ``neighbours``."""
    seen: Dict[str, object] = {}
    stack = list(starts)
    while stack:
        op = stack.pop()
        name = op.get_friendly_name()
        if name not in seen:
            seen[name] = op
            stack.extend(neighbours(op))
    return set(seen)


def _parameters(model, names: Sequence[str]) -> list:
    return [parameter for parameter in model.get_parameters()
            if parameter.get_output_tensor(0).get_any_name() in names]


def _part_weights_result(model):
    for result in model.get_results():
        if OUTPUT_PART_WEIGHTS in result.input_value(0).get_names():
            return result
    raise KeyreidError(f"the model has no '{OUTPUT_PART_WEIGHTS}' output")


def keypoint_op_nodes(model) -> Set[str]:
    """Ops that compute ``part_weights`` from keypoints/crop_size alone (constants included)."""
    upstream = _walk([_part_weights_result(model)], _producers)
    network = _walk(_parameters(model, NETWORK_INPUTS), _consumers)
    return upstream - network


def patch_embedding_node(model) -> str:
    """The first product on the frames (in execution order): the patch embedding."""
    downstream = _walk(_parameters(model, ("frames",)), _consumers)
    for op in model.get_ordered_ops():
        if op.get_type_name() in PRODUCT_TYPES and op.get_friendly_name() in downstream:
            return op.get_friendly_name()
    raise KeyreidError("the model has no matrix product on its frames input (not a KeyRe-ID model?)")


def head_nodes(model) -> Set[str]:
    """Products that do not feed the point where the part weights meet the backbone's tokens:
    the part branch, the global branch and the head after them. They run on a few tokens per
    clip, so f32 costs little there, while their error reaches the embedding undiluted."""
    keypoint_op = keypoint_op_nodes(model)
    meeting = [op for op in model.get_ordered_ops() if op.get_friendly_name() not in keypoint_op
               and any(producer.get_friendly_name() in keypoint_op for producer in _producers(op))]
    backbone = _walk(meeting, _producers) - keypoint_op
    return {op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() in PRODUCT_TYPES and op.get_friendly_name() not in backbone | keypoint_op}


def ignored_scope(model, recipe: OpenVinoInt8Recipe):
    """The ``nncf.IgnoredScope`` of ``recipe`` on ``model`` (names of the ops kept in f32)."""
    nncf = require("nncf", needed_for=_NNCF_FOR)
    names: Set[str] = set()
    if recipe.ignore_keypoint_op:
        names |= keypoint_op_nodes(model)
    if recipe.ignore_patch_embedding:
        names.add(patch_embedding_node(model))
    if recipe.ignore_head:
        names |= head_nodes(model)
    # validate=False: constants and shape ops in the set are not nodes NNCF lists
    return nncf.IgnoredScope(names=sorted(names), validate=False)


# ----------------------------------------------------------------------------- calibration
def synthetic_calibration_clips(num_clips: int, num_cameras: Optional[int],
                                seed: int = CALIBRATION_SEED) -> List[Dict[str, np.ndarray]]:
    """``num_clips`` single-clip feeds: realistic poses, the synthetic crop sizes, every camera."""
    from keyreid.synthetic import synthetic_feed

    feed = synthetic_feed(num_clips, num_cameras, seed)
    return [{name: value[index:index + 1] for name, value in feed.items()} for index in range(num_clips)]


def tracklet_calibration_clips(folder: Path, num_clips: int, num_cameras: Optional[int]) -> List[Dict[str, np.ndarray]]:
    """Up to ``num_clips`` single-clip feeds decoded from the tracklets under ``folder``
    (runtime/inputs/tracklets.py's layout); cameras outside the model's range become -1 (mean)."""
    from keyreid.runtime.serving.pipeline import load_tracklet_clips
    from keyreid.runtime.inputs.poses import PoseTally
    from keyreid.runtime.inputs.tracklets import discover_tracklets

    scan = discover_tracklets(folder)
    if not scan.tracklets:
        raise KeyreidError(f"--tracklets {folder}: no tracklets found")
    clips = load_tracklet_clips(scan.tracklets, PoseTally(), limit=num_clips)
    feeds = []
    for clip in clips:
        camera = int(clip["camera"])
        if num_cameras is None or not -1 <= camera < num_cameras:
            camera = -1
        feeds.append({"frames": clip["frames"][None], "keypoints": clip["keypoints"][None].astype(np.float32),
                      "crop_size": clip["crop_size"][None].astype(np.float32),
                      "camera": np.array([camera], dtype=np.int64)})
    return feeds


# ----------------------------------------------------------------------------- quantisation
def quantise(model, clips: Sequence[Dict[str, np.ndarray]], recipe: OpenVinoInt8Recipe):
    """An int8 copy of the OpenVINO ``model`` (``model`` itself is left as it is)."""
    nncf = require("nncf", needed_for=_NNCF_FOR)
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if not clips:
        raise KeyreidError("int8 calibration needs at least one clip")
    options = {}
    if recipe.smooth_quant_alpha is not None:
        options["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=recipe.smooth_quant_alpha)
    if recipe.min_max_ranges:
        options["activations_range_estimator_params"] = RangeEstimatorParametersSet.MINMAX
    advanced = AdvancedQuantizationParameters(**options)
    input_names = [port.get_any_name() for port in model.inputs]
    dataset = nncf.Dataset(list(clips), lambda clip: {name: clip[name] for name in input_names})
    return nncf.quantize(model.clone(), dataset, preset=nncf.QuantizationPreset.MIXED,
                         model_type=nncf.ModelType.TRANSFORMER, subset_size=len(clips),
                         fast_bias_correction=recipe.fast_bias_correction,
                         ignored_scope=ignored_scope(model, recipe), advanced_parameters=advanced)
