"""KeypointPartPool as an ONNX local function: domain "keyreid", name "KeypointPartPool".

The exported model carries one ``keyreid::KeypointPartPool`` node whose body is this function
of standard ONNX ops, so ONNX Runtime runs it with no extra library while TensorRT can swap in
the plugin named by the node's ``plugin_namespace`` / ``plugin_version`` attributes.

The body is not written by hand: ``part_weights_torch`` for one mode is exported alone with
``torch.onnx.export(dynamo=True)`` (dynamic batch), its initializers become Constant nodes and
its graph becomes the function. So the function computes exactly what the tested torch op
computes, and the function is self-contained (its own opset imports, no nested functions).
"""
import functools
import warnings

from keyreid.contract import (CLIP_FRAMES, NUM_KEYPOINTS, ONNX_OPSET, NUM_PARTS, NUM_PATCHES, OP_DOMAIN,
                              OP_NAME, OP_PLUGIN_VERSION)
from keyreid.errors import KeyreidError
from keyreid.kernels.reference import check_mode
from keyreid.lazy import require

INPUT_NAMES = ("keypoints", "crop_size")
OUTPUT_NAME = "part_weights"
FUNCTION_ATTRIBUTES = ("mode", "plugin_namespace", "plugin_version")
MIN_OPSET = ONNX_OPSET
EXPORT_EXAMPLE_CLIPS = 2


def _export_part_pool_graph(mode: str, opset: int):
    """ModelProto of ``KeypointPartPool(mode)`` alone, with a dynamic clip axis."""
    torch = require("torch")
    inliner = require("onnx.inliner")
    require("onnxscript")
    from keyreid.kernels.torch_op import KeypointPartPool

    keypoints = torch.zeros(EXPORT_EXAMPLE_CLIPS, CLIP_FRAMES, NUM_KEYPOINTS, 3)
    crop_size = torch.ones(EXPORT_EXAMPLE_CLIPS, CLIP_FRAMES, 2)
    clips = torch.export.Dim("N")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            KeypointPartPool(mode).eval(), (keypoints, crop_size), dynamo=True,
            opset_version=opset, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_shapes={"keypoints": {0: clips}, "crop_size": {0: clips}}, verbose=False)
    model = inliner.inline_local_functions(program.model_proto)
    exported_opset = {entry.domain: entry.version for entry in model.opset_import}.get("")
    if exported_opset != opset:
        raise KeyreidError(f"the ONNX exporter produced opset {exported_opset}, "
                           f"not the requested {opset}")
    return model


@functools.lru_cache(maxsize=None)
def _part_weight_function_bytes(mode: str, opset: int) -> bytes:
    onnx = require("onnx")
    graph = _export_part_pool_graph(mode, opset).graph
    if [value.name for value in graph.input] != list(INPUT_NAMES) or \
            [value.name for value in graph.output] != [OUTPUT_NAME]:
        raise KeyreidError("the exported KeypointPartPool graph has unexpected input or "
                           "output names")
    constants = [onnx.helper.make_node("Constant", [], [tensor.name], value=tensor,
                                       name=f"const_{tensor.name}")
                 for tensor in graph.initializer]
    nodes = list(graph.node)
    for node in nodes:        # the exporter's per-node torch stack traces: ~90% of the bytes
        node.doc_string = ""
        del node.metadata_props[:]
    function = onnx.helper.make_function(
        OP_DOMAIN, OP_NAME, list(INPUT_NAMES), [OUTPUT_NAME], constants + nodes,
        opset_imports=[onnx.helper.make_opsetid("", opset)],
        attributes=list(FUNCTION_ATTRIBUTES),
        doc_string=f"KeyRe-ID keypoints -> part weights W [N, 128, 6], heatmap mode {mode!r} "
                   "(docs/contract.md section 3). The body is specific to that mode.")
    return function.SerializeToString()


def part_weight_function(mode: str, opset: int = MIN_OPSET):
    """FunctionProto ``keyreid::KeypointPartPool`` for one heatmap mode, standard ops at ``opset``.

    Inputs (keypoints [N, 4, 17, 3], crop_size [N, 4, 2]) float32, output part_weights
    [N, 128, 6] float32. The body is built for ``mode``; a node calling it must carry the same
    ``mode`` attribute. Each call returns a fresh copy (the export is cached per mode and opset).
    """
    check_mode(mode)
    if opset < MIN_OPSET:
        raise KeyreidError(f"KeypointPartPool needs ONNX opset {MIN_OPSET} or newer, got {opset}")
    onnx = require("onnx")
    function = onnx.FunctionProto()
    function.ParseFromString(_part_weight_function_bytes(mode, opset))
    return function


def make_part_pool_node(mode: str, inputs=INPUT_NAMES, output: str = OUTPUT_NAME,
                        name: str = OP_NAME):
    """The ``keyreid::KeypointPartPool`` node with the mode and TensorRT plugin attributes."""
    check_mode(mode)
    onnx = require("onnx")
    return onnx.helper.make_node(OP_NAME, list(inputs), [output], name=name, domain=OP_DOMAIN,
                                 mode=mode, plugin_namespace=OP_DOMAIN,
                                 plugin_version=OP_PLUGIN_VERSION)


def attach_part_pool_function(model, mode: str):
    """Add the function for ``mode`` and the "keyreid" opset import to ``model`` (in place).

    The function uses the model's default-domain opset, so the two always agree.
    """
    onnx = require("onnx")
    opsets = {entry.domain: entry.version for entry in model.opset_import}
    if "" not in opsets:
        raise KeyreidError("the model imports no default ONNX opset to build KeypointPartPool with")
    for existing in model.functions:
        if (existing.domain, existing.name) == (OP_DOMAIN, OP_NAME):
            raise KeyreidError("the model already carries a keyreid::KeypointPartPool function")
    model.functions.append(part_weight_function(mode, opsets[""]))
    if OP_DOMAIN not in opsets:
        model.opset_import.append(onnx.helper.make_opsetid(OP_DOMAIN, 1))
    return model


def make_part_pool_model(mode: str, opset: int = MIN_OPSET):
    """A model whose graph is one ``keyreid::KeypointPartPool`` node, with the function attached.

    Used by tests and as the smallest example of the op for engines; dynamic clip axis "N".
    """
    onnx = require("onnx")
    float32 = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        [make_part_pool_node(mode)], "keypoint_part_pool",
        [onnx.helper.make_tensor_value_info(INPUT_NAMES[0], float32,
                                            ["N", CLIP_FRAMES, NUM_KEYPOINTS, 3]),
         onnx.helper.make_tensor_value_info(INPUT_NAMES[1], float32, ["N", CLIP_FRAMES, 2])],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, float32, ["N", NUM_PATCHES, NUM_PARTS])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   producer_name="keyreid")
    return attach_part_pool_function(model, mode)
