"""Rewrites of the exported graph for ONNX Runtime's CPU provider, applied to the int8 file only.

The fp32 file stays standard ONNX for TensorRT and every runtime. The int8 file is for ONNX
Runtime on CPUs, so it may use ONNX Runtime's fused contrib kernels where they are faster:

- ``fuse_attention``: each backbone block's self-attention, as the exporter spells it (qkv MatMul
  and bias, Reshape to heads, Transpose, three Slice/Squeeze, q.k^T, scale, Softmax, .v,
  Transpose, Reshape), becomes one ``com.microsoft.Attention`` node, which quantisation turns
  into ``QAttention``. The head reshuffles took 13% of the int8 time (benchmarks/RESULTS.md).
- ``split_weight_stacks``: a MatMul of a [h, M, C] activation with a constant [h, C, d] stack of
  per-head weights becomes h two-dimensional MatMuls, which dynamic quantisation then takes.
- ``gemms_as_matmuls``: a Gemm with a constant weight (the exporter's spelling of a 2-D linear
  layer) becomes MatMul + Add: ONNX Runtime's dynamic quantiser takes MatMul but not Gemm.

All three leave the computed function unchanged (fp32 outputs agree to rounding; tests check it).
"""
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np

from keyreid.export.graph_names import FreshNames
from keyreid.lazy import require

CONTRIB_DOMAIN = "com.microsoft"


class _GraphIndex:
    """Producers, consumers and constant values of a graph's tensors."""

    def __init__(self, graph):
        numpy_helper = require("onnx.numpy_helper")
        self.producer = {output: node for node in graph.node for output in node.output}
        self.consumers: Dict[str, list] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {value.name for value in graph.output}
        self._declared = {value.name: value for value in list(graph.value_info) + list(graph.input)
                          + list(graph.output)}
        self._initializers = {init.name: init for init in graph.initializer}
        self._to_array = numpy_helper.to_array

    def _constant_tensor(self, name: str):
        if name in self._initializers:
            return self._initializers[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return node.attribute[0].t
        return None

    def constant(self, name: str) -> Optional[np.ndarray]:
        tensor = self._constant_tensor(name)
        return None if tensor is None else self._to_array(tensor)

    def constant_dims(self, name: str) -> Optional[tuple]:
        """Shape of a constant without converting it (ViT-B weights are up to 151 MB)."""
        tensor = self._constant_tensor(name)
        return None if tensor is None else tuple(tensor.dims)

    def only_consumer(self, name: str, op_type: str):
        """The single node reading ``name`` if it is an ``op_type`` and ``name`` is internal."""
        readers = self.consumers.get(name, [])
        if len(readers) == 1 and readers[0].op_type == op_type and name not in self.outputs:
            return readers[0]
        return None

    def shape(self, name: str) -> Optional[tuple]:
        """A tensor's declared shape (the exporter's value_info): ints, names of symbolic dims, None."""
        value = self._declared.get(name)
        if value is None or not value.type.tensor_type.HasField("shape"):
            return None
        return tuple(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
                     for dim in value.type.tensor_type.shape.dim)


def _attribute(node, name: str, default=None):
    helper = require("onnx.helper")
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _slice_index(index: _GraphIndex, node) -> Optional[int]:
    """k for ``Slice(x, [k], [k+1], axes=[0])`` (steps absent or 1), else None."""
    if node.op_type != "Slice" or len(node.input) < 4:
        return None
    starts, ends, axes = (index.constant(name) for name in node.input[1:4])
    steps = index.constant(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1)
    if any(value is None or value.size != 1 for value in (starts, ends, axes, steps)):
        return None
    if int(axes.item()) != 0 or int(steps.item()) != 1 or int(ends.item()) != int(starts.item()) + 1:
        return None
    return int(starts.item())


def _match_attention(index: _GraphIndex, head_transpose):
    """The nodes of one exported self-attention around its [2, 0, 3, 1, 4] head Transpose.

    Returns (nodes to remove, Attention inputs, output name, num_heads) or None when any step
    differs from the exporter's spelling, in which case the block is left as it is.
    """
    reshape = index.producer.get(head_transpose.input[0])
    if reshape is None or reshape.op_type != "Reshape" or index.only_consumer(reshape.output[0], "Transpose") is None:
        return None
    head_shape = index.constant(reshape.input[1])
    if head_shape is None or head_shape.size != 5 or int(head_shape[2]) != 3:
        return None
    num_heads, head_dim = int(head_shape[3]), int(head_shape[4])
    length = int(head_shape[1])
    bias_add = index.producer.get(reshape.input[0])
    if bias_add is None or bias_add.op_type != "Add" or index.only_consumer(bias_add.output[0], "Reshape") is None:
        return None
    matmul = next((index.producer.get(name) for name in bias_add.input
                   if index.producer.get(name) is not None and index.producer[name].op_type == "MatMul"), None)
    bias_name = next((name for name in bias_add.input if index.constant_dims(name) is not None), None)
    if matmul is None or bias_name is None or index.only_consumer(matmul.output[0], "Add") is None:
        return None
    weight = index.constant_dims(matmul.input[1])
    width = 3 * num_heads * head_dim
    if weight is None or len(weight) != 2 or weight[1] != width or index.constant_dims(bias_name) != (width,):
        return None
    # Attention takes [batch, sequence, width] and attends over the whole sequence: the heads
    # must be cut from that layout, [-1, sequence, 3, h, d], and not from windows of it.
    rows = index.shape(matmul.input[0])
    if rows is None or len(rows) != 3 or rows[1] != length or int(head_shape[0]) != -1:
        return None

    slices = index.consumers.get(head_transpose.output[0], [])
    by_index = {_slice_index(index, node): node for node in slices}
    if len(slices) != 3 or set(by_index) != {0, 1, 2} or head_transpose.output[0] in index.outputs:
        return None
    squeezes = [index.only_consumer(by_index[k].output[0], "Squeeze") for k in range(3)]
    if any(node is None for node in squeezes):
        return None
    query, key, value = (node.output[0] for node in squeezes)
    key_transpose = index.only_consumer(key, "Transpose")
    scores = index.only_consumer(query, "MatMul")
    if key_transpose is None or list(_attribute(key_transpose, "perm", [])) != [0, 1, 3, 2] or scores is None \
            or list(scores.input) != [query, key_transpose.output[0]]:
        return None
    scaling = index.only_consumer(scores.output[0], "Mul")
    scale = None if scaling is None else index.constant(
        next((name for name in scaling.input if name != scores.output[0]), ""))
    # Attention's default scale; QAttention, which quantisation makes of it, has no scale attribute.
    if scale is None or scale.size != 1 or not np.isclose(float(scale.item()), head_dim ** -0.5, rtol=1e-6):
        return None
    softmax = index.only_consumer(scaling.output[0], "Softmax")
    if softmax is None or _attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    mixed = index.only_consumer(softmax.output[0], "MatMul")
    if mixed is None or list(mixed.input) != [softmax.output[0], value] or len(index.consumers[value]) != 1:
        return None
    heads_back = index.only_consumer(mixed.output[0], "Transpose")
    if heads_back is None or list(_attribute(heads_back, "perm", [])) != [0, 2, 1, 3]:
        return None
    merge = index.only_consumer(heads_back.output[0], "Reshape")
    merged_shape = None if merge is None else index.constant(merge.input[1])
    if merged_shape is None or [int(value) for value in merged_shape] != [-1, length, num_heads * head_dim]:
        return None
    removed = [matmul, bias_add, reshape, head_transpose, *by_index.values(), *squeezes, key_transpose, scores,
               scaling, softmax, mixed, heads_back, merge]
    return removed, [matmul.input[0], matmul.input[1], bias_name], merge.output[0], num_heads


def fuse_attention(model) -> int:
    """Replace each exported self-attention by ``com.microsoft.Attention``; returns how many."""
    helper = require("onnx.helper")
    graph = model.graph
    index = _GraphIndex(graph)
    names = FreshNames(graph)
    removed_ids, replacement = set(), {}       # id(last node of a match) -> its Attention node
    for node in graph.node:
        if node.op_type != "Transpose" or list(_attribute(node, "perm", [])) != [2, 0, 3, 1, 4]:
            continue
        match = _match_attention(index, node)
        if match is None:
            continue
        removed, inputs, output, num_heads = match
        removed_ids.update(id(part) for part in removed)
        replacement[id(removed[-1])] = helper.make_node(
            "Attention", inputs, [output], name=names.fresh("attention"), domain=CONTRIB_DOMAIN,
            num_heads=num_heads)
    if not replacement:
        return 0
    kept = []
    for node in graph.node:       # the Attention node takes the merge Reshape's place: inputs ready
        if id(node) in replacement:
            kept.append(replacement[id(node)])
        elif id(node) not in removed_ids:
            kept.append(node)
    _replace_nodes(graph, kept, [])
    if CONTRIB_DOMAIN not in {entry.domain for entry in model.opset_import}:
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return len(replacement)


def split_weight_stacks(model) -> List[str]:
    """Rewrite MatMul([h, M, C], constant [h, C, d]) as h 2-D MatMuls; returns the new weights' names."""
    helper, numpy_helper = require("onnx.helper"), require("onnx.numpy_helper")
    graph = model.graph
    index = _GraphIndex(graph)
    names = FreshNames(graph)
    new_nodes, new_initializers, head_weights, head_axis = [], [], [], None
    for node in graph.node:
        is_stack = node.op_type == "MatMul" and len(node.input) == 2 and len(index.constant_dims(node.input[1]) or ()) == 3
        stack = index.constant(node.input[1]) if is_stack else None
        rows = index.shape(node.input[0])
        # Only a batch of h matrices against h weights: no broadcasting either way.
        if stack is None or stack.ndim != 3 or stack.shape[0] < 2 or rows is None or len(rows) != 3 \
                or rows[0] != stack.shape[0]:
            new_nodes.append(node)
            continue
        if head_axis is None:
            head_axis = numpy_helper.from_array(np.zeros(1, dtype=np.int64), names.fresh("head_axis"))
            new_initializers.append(head_axis)
        head_outputs = []
        for head, head_weight in enumerate(stack):
            position = numpy_helper.from_array(np.array(head, dtype=np.int64), names.fresh(f"{node.name}_head{head}"))
            weight = numpy_helper.from_array(np.ascontiguousarray(head_weight),
                                             names.fresh(f"{node.input[1]}_head{head}"))
            new_initializers += [position, weight]
            head_weights.append(weight.name)
            head_rows, product, unsqueezed = (names.fresh(f"{node.output[0]}_{part}{head}")
                                              for part in ("rows", "product", "head"))
            new_nodes += [
                helper.make_node("Gather", [node.input[0], position.name], [head_rows], axis=0, name=head_rows),
                helper.make_node("MatMul", [head_rows, weight.name], [product], name=product),
                helper.make_node("Unsqueeze", [product, head_axis.name], [unsqueezed], name=unsqueezed)]
            head_outputs.append(unsqueezed)
        new_nodes.append(helper.make_node("Concat", head_outputs, [node.output[0]], axis=0,
                                          name=names.fresh(f"{node.name}_heads")))
    if head_weights:
        _replace_nodes(graph, new_nodes, new_initializers)
    return head_weights


def gemms_as_matmuls(model) -> int:
    """Rewrite Gemm(A, constant B, C) (alpha = beta = 1, A not transposed) as MatMul + Add; returns how many."""
    helper, numpy_helper = require("onnx.helper"), require("onnx.numpy_helper")
    graph = model.graph
    index = _GraphIndex(graph)
    names = FreshNames(graph)
    new_nodes, new_initializers = [], []
    for node in graph.node:
        weight = index.constant(node.input[1]) if node.op_type == "Gemm" else None
        if weight is None or weight.ndim != 2 or _attribute(node, "transA", 0) \
                or _attribute(node, "alpha", 1.0) != 1.0 or _attribute(node, "beta", 1.0) != 1.0:
            new_nodes.append(node)
            continue
        if _attribute(node, "transB", 0):
            weight = np.ascontiguousarray(weight.T)
        matrix = numpy_helper.from_array(weight, names.fresh(f"{node.input[1]}_matrix"))
        new_initializers.append(matrix)
        has_bias = len(node.input) > 2 and node.input[2]
        product = names.fresh(f"{node.output[0]}_product") if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], matrix.name], [product], name=names.fresh(node.name)))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                              name=names.fresh(f"{node.name}_bias")))
    if new_initializers:
        _replace_nodes(graph, new_nodes, new_initializers)
    return len(new_initializers)


def _replace_nodes(graph, nodes: list, new_initializers: list) -> None:
    """Install the rewritten node list and the weights it added; drop constants nothing reads."""
    used = {name for node in nodes for name in node.input} | {value.name for value in graph.output}
    del graph.node[:]
    graph.node.extend(node for node in nodes if node.op_type != "Constant" or node.output[0] in used)
    graph.initializer.extend(new_initializers)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
