"""7-bit activations for int8 files meant for CPUs without VNNI (keyreid/int8_targets.py).

ONNX Runtime's dynamic quantiser puts a ``DynamicQuantizeLinear`` before every int8 product: it
maps the activation's range [min(x, 0), max(x, 0)] onto the u8 codes 0..255. On an AVX2-only
CPU a pair of such codes times 8-bit weights can exceed the kernel's saturating 16-bit sum.
This rewrite replaces each of those nodes by the same computation onto 0..127 written in
standard ops, so every pair stays within 2 * 127 * 127 = 32258 and nothing can saturate:

    lo = min(ReduceMin(x), 0), hi = max(ReduceMax(x), 0)
    scale = (hi - lo) / 126                    (126 steps, not 127: see below)
    zero_point = round(-lo / scale)            (0..126)
    y = QuantizeLinear(x, scale, zero_point)   round(x / scale) + zero_point

With 126 steps the largest code is round(hi / scale) + round(-lo / scale) <= 126 + 1 rounding
= 127, whatever the rounding of the two halves; the smallest is >= 0 since rounding is odd-
symmetric. The node's three outputs keep their names, so the products and their scale
arithmetic are untouched. Measured on random ViT-B checkpoints, halving the activation grid
costs far less than halving the weight grid would (benchmarks/RESULTS.md section 7).
"""
import numpy as np

from keyreid.export.graph_names import FreshNames
from keyreid.int8_targets import NARROW_ACTIVATION_MAX
from keyreid.lazy import require

STEPS = NARROW_ACTIVATION_MAX - 1   # 126: one step of headroom for the rounding of both halves
SMALLEST_SCALE = np.float32(1e-30)   # an all-zero activation quantises to its zero point, not NaN


def narrow_dynamic_quantisation(model) -> int:
    """Rewrite every DynamicQuantizeLinear of ``model`` (in place) onto 0..127; returns how many."""
    onnx = require("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    graph = model.graph
    names = FreshNames(graph)
    constants = {
        "zero": np.float32(0), "steps": np.float32(STEPS), "smallest": SMALLEST_SCALE,
    }
    constant_names = {key: names.fresh(f"narrow_activation_{key}") for key in constants}
    rewritten, new_nodes = 0, []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        rewritten += 1
        (source,), (codes, scale, zero_point) = node.input, node.output
        fresh = {key: names.fresh(f"{node.name}_{key}")
                 for key in ("min", "max", "lo", "hi", "range", "steps_scale", "neg_lo", "zp_float")}

        def make(op, inputs, output, **attributes):
            new_nodes.append(helper.make_node(op, inputs, [output], name=names.fresh(f"{node.name}_{op}"),
                                              **attributes))

        make("ReduceMin", [source], fresh["min"], keepdims=0)
        make("ReduceMax", [source], fresh["max"], keepdims=0)
        make("Min", [fresh["min"], constant_names["zero"]], fresh["lo"])
        make("Max", [fresh["max"], constant_names["zero"]], fresh["hi"])
        make("Sub", [fresh["hi"], fresh["lo"]], fresh["range"])
        make("Div", [fresh["range"], constant_names["steps"]], fresh["steps_scale"])
        make("Max", [fresh["steps_scale"], constant_names["smallest"]], scale)
        make("Neg", [fresh["lo"]], fresh["neg_lo"])
        make("Div", [fresh["neg_lo"], scale], fresh["zp_float"])
        rounded = names.fresh(f"{node.name}_zp_rounded")
        make("Round", [fresh["zp_float"]], rounded)
        make("Cast", [rounded], zero_point, to=onnx.TensorProto.UINT8)
        make("QuantizeLinear", [source, scale, zero_point], codes)
    if rewritten:
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.initializer.extend(numpy_helper.from_array(np.asarray(value), constant_names[key])
                                 for key, value in constants.items())
    return rewritten
