"""KeypointPartPool as one node in an exported graph.

In eager torch the op runs ``part_weights_torch`` on CPU tensors and the fused CUDA kernel
(``keyreid.kernels.cuda_op``) on CUDA tensors; the ONNX exporter translates it into a single
``keyreid::KeypointPartPool`` node (attributes mode, plugin_namespace, plugin_version) instead of
inlining its arithmetic, and ``onnx_function.attach_part_pool_function`` then gives the node its
standard-op body. Importing this module registers the torch op and the ONNX schema once.
"""
import torch

from keyreid.contract import NUM_PARTS, NUM_PATCHES, OP_DOMAIN, OP_NAME, OP_PLUGIN_VERSION
from keyreid.kernels.torch_op import part_weights_torch
from keyreid.lazy import require


@torch.library.custom_op("keyreid::keypoint_part_pool", mutates_args=())
def keypoint_part_pool(keypoints: torch.Tensor, crop_size: torch.Tensor, mode: str) -> torch.Tensor:
    # float32 whatever the inputs' dtype, and contiguous, as the CUDA kernel writes and the fake
    # below declares (part_weights_torch's result is a transposed view).
    return part_weights_torch(keypoints.to(torch.float32), crop_size.to(torch.float32), mode).contiguous()


@keypoint_part_pool.register_kernel("cuda")
def _(keypoints, crop_size, mode):
    # The fused CUDA kernel (built on first use); the CPU keeps the vectorised op above.
    from keyreid.kernels.cuda_op import part_weights_fused
    return part_weights_fused(keypoints, crop_size, mode)


@keypoint_part_pool.register_fake
def _(keypoints, crop_size, mode):
    # float32 like both kernels above, not the keypoints' dtype: torch.compile and torch.export
    # trace with this.
    return keypoints.new_empty(keypoints.shape[0], NUM_PATCHES, NUM_PARTS, dtype=torch.float32)


class GraphPartPool(torch.nn.Module):
    """The op for one heatmap mode, as a module the deploy model calls."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, keypoints: torch.Tensor, crop_size: torch.Tensor) -> torch.Tensor:
        return keypoint_part_pool(keypoints, crop_size, self.mode)


def _register_onnx_schema() -> None:
    """The exporter needs a schema to emit a node of a custom domain."""
    onnx = require("onnx")
    OpSchema = onnx.defs.OpSchema
    if onnx.defs.has(OP_NAME, OP_DOMAIN):
        return
    string = OpSchema.AttrType.STRING
    onnx.defs.register_schema(OpSchema(
        OP_NAME, OP_DOMAIN, 1,
        doc="KeyRe-ID keypoints [N,4,17,3] + crop sizes [N,4,2] -> part weights [N,128,6]",
        inputs=[OpSchema.FormalParameter("keypoints", "T"), OpSchema.FormalParameter("crop_size", "T")],
        outputs=[OpSchema.FormalParameter("part_weights", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32 only")],
        attributes=[OpSchema.Attribute("mode", string, "heatmap mode: max, mean or blank"),
                    OpSchema.Attribute("plugin_namespace", string, "TensorRT plugin namespace"),
                    OpSchema.Attribute("plugin_version", string, "TensorRT plugin version")]))


def onnx_translation_table() -> dict:
    """``custom_translation_table`` entry for ``torch.onnx.export(dynamo=True)``."""
    onnxscript = require("onnxscript")
    _register_onnx_schema()
    part_pool = onnxscript.values.Op(onnxscript.values.Opset(OP_DOMAIN, 1), OP_NAME)

    def translate(keypoints, crop_size, mode: str):
        return part_pool(keypoints, crop_size, mode=mode, plugin_namespace=OP_DOMAIN,
                         plugin_version=OP_PLUGIN_VERSION)

    return {torch.ops.keyreid.keypoint_part_pool.default: translate}
