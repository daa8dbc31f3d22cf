"""Precision variants of an exported fp32 model.

fp16: matmul weights are stored in fp16 and every MatMul runs on fp16 inputs, with Casts around
it; LayerNorm, softmax, residual adds, the part-weight op and the outputs stay fp32. The types are
in the graph, so a strongly typed TensorRT build runs fp16 matmuls without builder flags.

int8: for ONNX Runtime on CPUs. The graph is first rewritten for ONNX Runtime's CPU kernels
(export/cpu_rewrites.py: fused self-attention; per-head weight stacks and Gemms as 2-D MatMuls), then
dynamically quantised: per-channel int8 weights, activations quantised at run time, for every
product with a constant 2-D weight except the patch embedding. The custom node and its function
body are left as they are. The activation codes follow the target CPU class
(keyreid/int8_targets.py): 0..127 for AVX2-only CPUs, whose 16-bit pair sums full codes can
saturate (export/narrow_activations.py), 0..255 for VNNI and AMX.
"""
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from keyreid.contract import OP_DOMAIN, OP_NAME
from keyreid.cpu_features import cpu_isa
from keyreid.errors import KeyreidError
from keyreid.int8_targets import FULL_ACTIVATION_MAX, RECIPES, check_target, target_for
from keyreid.export.graph_names import FreshNames
from keyreid.lazy import require


def to_fp16(model):
    """Rewrite every main-graph MatMul to fp16 inputs and an fp32 output (docs/contract.md §6 I/O kept)."""
    require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    names = FreshNames(graph)
    initializers = {init.name: init for init in graph.initializer}
    fp16_initializers, fp16_casts = {}, {}   # one fp16 copy per weight, one Cast per activation
    new_nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        inputs = []
        for name in node.input:
            init = initializers.get(name)
            if init is not None and init.data_type == TensorProto.FLOAT:
                if name not in fp16_initializers:
                    half = numpy_helper.to_array(init).astype(np.float16)
                    fp16_initializers[name] = numpy_helper.from_array(half, names.fresh(name + "_fp16"))
                inputs.append(fp16_initializers[name].name)
            else:
                if name not in fp16_casts:
                    fp16_casts[name] = names.fresh(name + "_to_fp16")
                    new_nodes.append(helper.make_node("Cast", [name], [fp16_casts[name]],
                                                      to=TensorProto.FLOAT16, name=fp16_casts[name]))
                inputs.append(fp16_casts[name])
        half_out = names.fresh(node.output[0] + "_fp16")
        new_nodes.append(helper.make_node("MatMul", inputs, [half_out], name=node.name))
        new_nodes.append(helper.make_node("Cast", [half_out], [node.output[0]], to=TensorProto.FLOAT,
                                          name=half_out + "_to_fp32"))
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [init for init in fp16_initializers.values()])
    # Intermediate type annotations from the fp32 export no longer hold; shape inference redoes them.
    del graph.value_info[:]
    return model


# Weights kept in fp32 by measurement (benchmarks/RESULTS.md sections 2 and 6): a group of products
# stays fp32 when quantising it alone costs more than 1e-4 of embedding cosine on ViT-B. Only the
# patch embedding does (5.8e-4: its error runs through all eleven blocks; 0.7% of the arithmetic);
# the [CLS] branches cost 0 to 3e-5, their per-head key/value weights 9e-7 (global) and 1.1e-5
# (parts). benchmarks/int8_accuracy.py checks the result on six checkpoints.
FP32_WEIGHTS = ("patch_weight",)
QUANTISED_OPS = ("MatMul", "Attention")     # ONNX Runtime's dynamic quantiser takes no Gemm


def quantisable_products(model) -> list:
    """Names of the MatMul / Attention nodes whose weight is a 2-D constant, bar ``FP32_WEIGHTS``.

    The backbone blocks hold ~90% of the arithmetic; the [CLS]-only branches' products (query,
    per-head key and value weights once split into 2-D, output projection, MLP) are also
    quantised; the activation x activation products (attention scores and mixing) stay fp32.
    """
    matrices = {init.name for init in model.graph.initializer if len(init.dims) == 2}
    unknown = [name for name in FP32_WEIGHTS if name not in matrices]
    if unknown:     # a renamed buffer would otherwise be quantised without a word
        raise KeyreidError(f"int8 quantisation: weight(s) {', '.join(unknown)} to keep in fp32 are not in "
                           "the exported graph (exporter changed?)")
    names = []
    for node in model.graph.node:
        if node.op_type not in QUANTISED_OPS or len(node.input) < 2:
            continue
        if node.input[1] in matrices and node.input[1] not in FP32_WEIGHTS:
            names.append(node.name)
    return names


def resolve_int8_target(target_cpu: Optional[str] = None) -> str:
    """``target_cpu`` checked, or for None / "auto" the class of the CPU this runs on."""
    if target_cpu in (None, "auto"):
        return target_for(cpu_isa())
    try:
        return check_target(target_cpu)
    except ValueError as exc:
        raise KeyreidError(f"{exc} (or auto)") from None


def to_int8(model, target_cpu: Optional[str] = None):
    """The int8 file: ``model`` rewritten for ONNX Runtime's CPU kernels (export/cpu_rewrites.py,
    on a copy), then dynamically quantised (int8 weights, activations quantised at run time).

    Args:
        model: the fp32 ModelProto (left unchanged).
        target_cpu: one of keyreid.int8_targets.TARGET_CPUS (avx2: 7-bit activations; vnni, amx:
            8-bit), or None / "auto" for this machine's class. Record it with
            ``stamp_metadata(..., int8_target=...)``.
    """
    onnx = require("onnx")
    quantization = require("onnxruntime.quantization")
    from keyreid.export.cpu_rewrites import fuse_attention, gemms_as_matmuls, split_weight_stacks
    from keyreid.export.narrow_activations import narrow_dynamic_quantisation
    from keyreid.export.quiet_logs import quantiser_hint_dropped

    recipe = RECIPES[resolve_int8_target(target_cpu)]
    functions = list(model.functions)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)       # the caller's fp32 model stays as it was
    if not fuse_attention(rewritten):
        raise KeyreidError("int8 export found no self-attention to fuse for ONNX Runtime (exporter changed?)")
    split_weight_stacks(rewritten)
    gemms_as_matmuls(rewritten)
    model = rewritten
    targets = quantisable_products(model)
    if not targets:
        raise KeyreidError("int8 quantisation found no MatMul with a constant weight (exporter changed?)")
    with tempfile.TemporaryDirectory() as scratch:
        source, target = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        onnx.save_model(model, str(source))
        try:
            # Full 8-bit weights (reduce_range=False) for every target: the AVX2 target narrows the
            # activations instead, which measured far cheaper (keyreid/int8_targets.py).
            with quantiser_hint_dropped():
                quantization.quantize_dynamic(
                    str(source), str(target), weight_type=quantization.QuantType.QInt8,
                    op_types_to_quantize=list(QUANTISED_OPS), per_channel=True, reduce_range=False,
                    nodes_to_quantize=targets,
                    # attention's activation x activation products stay fp32; contrib ops have no
                    # ONNX type inference
                    extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        except Exception as exc:  # the quantiser raises bare exceptions on graphs it cannot handle
            raise KeyreidError(f"int8 quantisation failed: {exc}") from exc
        quantized = onnx.load_model(str(target))
    if recipe.activation_max != FULL_ACTIVATION_MAX and not narrow_dynamic_quantisation(quantized):
        raise KeyreidError("int8 quantisation left no DynamicQuantizeLinear to narrow (quantiser changed?)")
    present = {(function.domain, function.name) for function in quantized.functions}
    for function in functions:
        if (function.domain, function.name) not in present:
            quantized.functions.append(function)
    if not any(node.domain == OP_DOMAIN and node.op_type == OP_NAME for node in quantized.graph.node):
        raise KeyreidError("int8 quantisation dropped the KeypointPartPool node")
    if OP_DOMAIN not in {entry.domain for entry in quantized.opset_import}:
        quantized.opset_import.append(onnx.helper.make_opsetid(OP_DOMAIN, 1))
    return quantized
