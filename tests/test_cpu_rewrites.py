"""The int8 file's CPU rewrites (export/cpu_rewrites.py) change the graph, never what it computes."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from keyreid.errors import KeyreidError
from keyreid.export.checkpoint import load_checkpoint
from keyreid.export.cpu_rewrites import fuse_attention, gemms_as_matmuls, split_weight_stacks
from keyreid.export.precision import to_int8
from keyreid.synthetic import synthetic_feed

HEAD_TRANSPOSE = [2, 0, 3, 1, 4]


@pytest.fixture(scope="module")
def fp32_model(reduced_onnx):
    return onnx.load(str(reduced_onnx))


@pytest.fixture(scope="module")
def config(reduced_checkpoint):
    return load_checkpoint(reduced_checkpoint).config


@pytest.fixture(scope="module")
def used_blocks(config):
    return config.used_blocks


@pytest.fixture(scope="module")
def feed():
    return synthetic_feed(3, 6, seed=5)


def _copy(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _outputs(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(("embedding", "part_weights"), session.run(["embedding", "part_weights"], feed)))


def _assert_same_outputs(original, rewritten, feed):
    """fp32 rounding apart, the same embedding; the part-weight op is never touched."""
    expected, actual = _outputs(original, feed), _outputs(rewritten, feed)
    assert np.abs(actual["embedding"] - expected["embedding"]).max() <= 1e-5 * np.abs(expected["embedding"]).max()
    np.testing.assert_array_equal(actual["part_weights"], expected["part_weights"])


def _perm(node):
    return [list(attribute.ints) for attribute in node.attribute if attribute.name == "perm"]


def _stack_matmuls(model):
    stacks = {init.name for init in model.graph.initializer if len(init.dims) == 3}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in stacks]


def test_every_backbone_attention_becomes_one_attention_node_computing_the_same(fp32_model, used_blocks, feed):
    rewritten = _copy(fp32_model)
    assert fuse_attention(rewritten) == used_blocks
    attention = [node for node in rewritten.graph.node if node.op_type == "Attention"]
    assert len(attention) == used_blocks and all(node.domain == "com.microsoft" for node in attention)
    assert not any(_perm(node) == [HEAD_TRANSPOSE] for node in rewritten.graph.node)
    assert len(rewritten.graph.node) < len(fp32_model.graph.node) - 14 * used_blocks
    _assert_same_outputs(fp32_model, rewritten, feed)


def test_a_block_spelled_differently_is_left_alone(fp32_model, used_blocks, feed):
    """The matcher checks each step: a softmax over another axis is not self-attention."""
    rewritten = _copy(fp32_model)
    softmax = next(node for node in rewritten.graph.node if node.op_type == "Softmax")
    next(attribute for attribute in softmax.attribute if attribute.name == "axis").i = 2
    assert fuse_attention(rewritten) == used_blocks - 1
    assert sum(_perm(node) == [HEAD_TRANSPOSE] for node in rewritten.graph.node) == 1


def test_per_head_weight_stacks_become_two_dimensional_products_computing_the_same(fp32_model, config, feed):
    stacked = _stack_matmuls(fp32_model)
    assert len(stacked) == 4        # global block keys and values, part block keys and values
    rewritten = _copy(fp32_model)
    head_weights = split_weight_stacks(rewritten)
    heads = {init.name: tuple(init.dims) for init in rewritten.graph.initializer}
    assert len(head_weights) == 4 * config.num_heads
    assert all(len(heads[name]) == 2 for name in head_weights)
    assert _stack_matmuls(rewritten) == []
    _assert_same_outputs(fp32_model, rewritten, feed)


def test_gemms_with_constant_weights_become_matmul_and_add_computing_the_same(fp32_model, feed):
    gemms = [node for node in fp32_model.graph.node if node.op_type == "Gemm"]
    assert gemms       # the exporter spells the global block's 2-D linear layers as Gemm
    rewritten = _copy(fp32_model)
    assert gemms_as_matmuls(rewritten) == len(gemms)
    assert not any(node.op_type == "Gemm" for node in rewritten.graph.node)
    _assert_same_outputs(fp32_model, rewritten, feed)


def test_int8_file_quantises_fused_attention_and_head_weights_and_leaves_its_input_alone(fp32_model, config):
    before = fp32_model.SerializeToString()
    model = to_int8(fp32_model)
    assert fp32_model.SerializeToString() == before
    assert sum(node.op_type == "QAttention" for node in model.graph.node) == config.used_blocks
    assert _stack_matmuls(model) == []
    float_matrices = {init.name for init in model.graph.initializer
                      if len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT}
    assert [node.input[1] for node in model.graph.node if node.op_type in ("MatMul", "Gemm")
            and node.input[1] in float_matrices] == ["patch_weight"]      # all else is int8
    quantised_inputs = {name for node in model.graph.node if node.op_type == "MatMulInteger" for name in node.input}
    assert sum(name.endswith("_quantized") and "_head" in name for name in quantised_inputs) == 4 * config.num_heads


def test_int8_export_says_so_when_the_graph_has_no_attention_to_fuse(fp32_model):
    rewritten = _copy(fp32_model)
    for node in rewritten.graph.node:
        if _perm(node) == [HEAD_TRANSPOSE]:
            del node.attribute[:]
            node.attribute.extend([onnx.helper.make_attribute("perm", [0, 1, 2, 3, 4])])
    with pytest.raises(KeyreidError, match="no self-attention"):
        to_int8(rewritten)


def _give_own_constant(model, node, position, value):
    """Point one input of one node at a fresh initializer (the exporter shares equal constants)."""
    name = f"{node.name}_own_{position}"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    node.input[position] = name


def test_heads_cut_from_windows_or_scaled_otherwise_are_not_fused(fp32_model, config, used_blocks):
    windowed = _copy(fp32_model)       # valid graph, but attention over 43-row windows
    head_dim = config.embed_dim // config.num_heads
    heads = next(node for node in windowed.graph.node if _perm(node) == [HEAD_TRANSPOSE])
    reshape = next(node for node in windowed.graph.node if heads.input[0] in node.output)
    _give_own_constant(windowed, reshape, 1, np.array([-1, 43, 3, config.num_heads, head_dim], np.int64))
    assert fuse_attention(windowed) == used_blocks - 1

    rescaled = _copy(fp32_model)
    scaling = next(node for node in rescaled.graph.node
                   if node.op_type == "Mul" and any(reader.op_type == "Softmax" for reader in rescaled.graph.node
                                                    if node.output[0] in reader.input))
    _give_own_constant(rescaled, scaling, 1, np.array(0.2, np.float32))
    assert fuse_attention(rescaled) == used_blocks - 1


def _tiny_model(nodes, inputs, outputs, initializers, value_info=()):
    graph = onnx.helper.make_graph(nodes, "tiny", inputs, outputs, initializers, value_info=list(value_info))
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


def _tensor(name, shape):
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _run_tiny(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("rows_shape, stack_shape, split", [
    ((3, 5, 4), (3, 4, 2), True), ((3, 5, 4), (1, 4, 2), False), ((1, 5, 4), (3, 4, 2), False)])
def test_weight_stacks_split_only_without_broadcasting(rows_shape, stack_shape, split):
    rng = np.random.default_rng(0)
    stack = onnx.numpy_helper.from_array(rng.standard_normal(stack_shape).astype(np.float32), "stack")
    out_shape = (max(rows_shape[0], stack_shape[0]), rows_shape[1], stack_shape[2])
    model = _tiny_model([onnx.helper.make_node("Transpose", ["x"], ["rows"], perm=[0, 1, 2]),
                         onnx.helper.make_node("MatMul", ["rows", "stack"], ["y"], name="product")],
                        [_tensor("x", rows_shape)], [_tensor("y", out_shape)], [stack],
                        [_tensor("rows", rows_shape)])
    feed = {"x": rng.standard_normal(rows_shape).astype(np.float32)}
    expected = _run_tiny(model, feed)
    assert bool(split_weight_stacks(model)) == split
    np.testing.assert_allclose(_run_tiny(model, feed), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attributes, bias_shape, rewritten", [
    ({"transB": 1}, (3,), True), ({"transB": 0}, (1, 3), True), ({}, (4, 1), True),
    ({"alpha": 2.0}, (3,), False), ({"transA": 1}, (3,), False)])
def test_gemm_rewrite_keeps_the_function_and_leaves_scaled_or_transposed_a_alone(attributes, bias_shape, rewritten):
    rng = np.random.default_rng(1)
    weight_shape = (3, 5) if attributes.get("transB") else (5, 3)
    a_shape = (5, 4) if attributes.get("transA") else (4, 5)
    weight = onnx.numpy_helper.from_array(rng.standard_normal(weight_shape).astype(np.float32), "weight")
    bias = onnx.numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "bias")
    model = _tiny_model([onnx.helper.make_node("Gemm", ["a", "weight", "bias"], ["y"], name="linear", **attributes)],
                        [_tensor("a", a_shape)], [_tensor("y", (4, 3))], [weight, bias])
    feed = {"a": rng.standard_normal(a_shape).astype(np.float32)}
    expected = _run_tiny(model, feed)
    assert gemms_as_matmuls(model) == int(rewritten)
    assert any(node.op_type == "Gemm" for node in model.graph.node) != rewritten
    np.testing.assert_allclose(_run_tiny(model, feed), expected, rtol=1e-6, atol=1e-6)
