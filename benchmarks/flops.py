"""Arithmetic of one clip, counted by walking an ONNX graph (and, for torch models, by torch).

    python benchmarks/flops.py model.onnx [more.onnx ...]

Counted: the matrix products, which are all but ~1% of the work. MatMul and Gemm count 2 FLOPs
per multiply-add; Conv likewise; MatMulInteger (int8 dynamic quantisation) and ONNX Runtime's
DynamicQuantizeMatMul / MatMulIntegerToFloat count int8 multiply-adds (MACs). ONNX Runtime's
fused self-attention (Attention, QAttention in the int8 file) counts its qkv projection (int8
MACs for QAttention) and its two fp32 activation products, q.k^T and the mix of v. Elementwise
ops, reductions, softmax and the KeypointPartPool op are not counted.

Shapes come from ONNX shape inference at N = 1 clip on a weightless copy of the graph (large
weights become inputs of the same shape), so a ViT-B file is counted in seconds.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict

import numpy as np

from keyreid.cli import run_main

FLOAT_PRODUCTS = ("MatMul", "Gemm", "Conv", "FusedMatMul")
INT8_PRODUCTS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
ATTENTION = ("Attention", "QAttention")   # com.microsoft, export/cpu_rewrites.py
SMALL_CONSTANT = 4096      # initializers up to this many elements keep their values (shapes)


def _weightless(model, clips: int):
    """A copy of ``model`` with big initializers turned into typed inputs and N fixed to ``clips``."""
    import onnx

    copy = onnx.ModelProto()
    copy.ir_version, copy.producer_name = model.ir_version, model.producer_name
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    graph = copy.graph
    for node in model.graph.node:
        if node.op_type in ATTENTION:
            # ONNX shape inference does not know the contrib op; its output has its input's shape
            # when the packed qkv weight is three times the input width (checked when counted).
            graph.node.append(onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]]))
        else:
            graph.node.append(node)
    graph.output.extend(model.graph.output)
    for value in model.graph.input:
        fixed = graph.input.add()
        fixed.CopyFrom(value)
        for dim in fixed.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_value = clips
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= SMALL_CONSTANT:
            graph.initializer.append(init)
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return copy


def _shapes(model) -> Dict[str, tuple]:
    import onnx
    from onnx.inliner import inline_local_functions

    # Inlined: a schema registered for the custom op (kernels/graph_op.py) would otherwise stand
    # in for the function body and leave its output without a static shape.
    inferred = onnx.shape_inference.infer_shapes(inline_local_functions(model), data_prop=True)
    shapes = {init.name: tuple(init.dims) for init in inferred.graph.initializer}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(dim.HasField("dim_value") for dim in dims):
            shapes[value.name] = tuple(dim.dim_value for dim in dims)
    return shapes


def _product_macs(a: tuple, b: tuple) -> int:
    """Multiply-adds of numpy-style matmul a @ b (broadcast batch dimensions)."""
    a = (1,) + a if len(a) == 1 else a
    b = b + (1,) if len(b) == 1 else b
    batch = np.broadcast_shapes(a[:-2], b[:-2])
    return int(np.prod(batch, dtype=np.int64)) * a[-2] * a[-1] * b[-1]


def _node_macs(node, shapes) -> int:
    known = [shapes.get(name) for name in node.input]
    if node.op_type == "Gemm":
        attrs = {attr.name: attr.i for attr in node.attribute}
        a, b = known[0], known[1]
        m, k = (a[1], a[0]) if attrs.get("transA") else a
        n = b[0] if attrs.get("transB") else b[1]
        return m * k * n
    if node.op_type == "Conv":
        out, weight = shapes[node.output[0]], known[1]
        return int(np.prod(out, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
    a, b = known[0], known[1]
    if node.op_type == "FusedMatMul":
        attrs = {attr.name: attr.i for attr in node.attribute}
        if attrs.get("transA"):
            a = a[:-2] + (a[-1], a[-2])
        if attrs.get("transB"):
            b = b[:-2] + (b[-1], b[-2])
    return _product_macs(a, b)


def _attention_macs(node, shapes) -> Dict[str, int]:
    """{op label: MACs} of a fused self-attention over input [B, S, C] with qkv weight [C, 3C]."""
    batch, length, width = shapes[node.input[0]]
    if shapes[node.input[1]] != (width, 3 * width):
        raise RuntimeError(f"{node.name} ({node.op_type}): qkv weight {shapes[node.input[1]]} for input width {width}")
    projection = "QAttention qkv" if node.op_type == "QAttention" else "Attention qkv"
    return {projection: batch * length * width * 3 * width, "Attention q.k, p.v": 2 * batch * length * length * width}


def count_model(model, clips: int = 1) -> dict:
    """{"fp32_flops", "int8_macs", "by_op": {op type: FLOPs or MACs}} for ``clips`` clips."""
    light = _weightless(model, clips)
    shapes = _shapes(light)
    by_op: Dict[str, int] = {}
    int8_labels = set(INT8_PRODUCTS) | {"QAttention qkv"}
    for node in model.graph.node:
        if node.op_type in ATTENTION:
            for label, macs in _attention_macs(node, shapes).items():
                by_op[label] = by_op.get(label, 0) + (macs if label in int8_labels else 2 * macs)
            continue
        if node.op_type not in FLOAT_PRODUCTS + INT8_PRODUCTS:
            continue
        missing = [name for name in node.input[:2] if name not in shapes]
        if missing:
            raise RuntimeError(f"{node.name} ({node.op_type}): no static shape for {missing}")
        macs = _node_macs(node, shapes)
        by_op[node.op_type] = by_op.get(node.op_type, 0) + (macs if node.op_type in INT8_PRODUCTS else 2 * macs)
    return {"fp32_flops": sum(v for op, v in by_op.items() if op not in int8_labels),
            "int8_macs": sum(v for op, v in by_op.items() if op in int8_labels), "by_op": by_op}


def count_file(path: Path, clips: int = 1) -> dict:
    import onnx
    return count_model(onnx.load(str(path)), clips)


def count_torch(module, *inputs) -> int:
    """FLOPs of ``module(*inputs)`` as torch's FlopCounterMode counts them (matmuls and convs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return int(counter.get_total_flops())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="ONNX files to count")
    parser.add_argument("--clips", type=int, default=1, help="clips per call (default: 1)")
    args = parser.parse_args(argv)
    for path in args.models:
        counts = count_file(path, args.clips)
        detail = ", ".join(f"{op} {value / 1e9:.3f}" for op, value in sorted(counts["by_op"].items()))
        print(f"{path.name}: {counts['fp32_flops'] / 1e9:.3f} GFLOP fp32 + {counts['int8_macs'] / 1e9:.3f} G int8 MACs "
              f"per {args.clips} clip(s) ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
