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
