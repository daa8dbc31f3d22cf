"""Would an int8 file's products saturate on a CPU without VNNI? An emulation, on any CPU.

ONNX Runtime's AVX2 int8 kernel multiplies u8 activations by s8 weights with ``vpmaddubsw``:
neighbouring products along the reduction axis (k = 2j and 2j + 1) are added in a signed
16-bit register that saturates, and only then widened to 32 bits (keyreid/int8_targets.py).
This module replays exactly that first step in NumPy, on a file's real quantised weights and on
the u8 activations the file itself computes for real clips, and counts the pair sums that would
clip. It needs no AVX2-only CPU: the sums are integers, the same everywhere.

    report = saturation_report(model_path, feed)    # one row per quantised product
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.int8_targets import INT16_MAX
from keyreid.lazy import require

INT16_MIN = -INT16_MAX - 1
# The products ONNX Runtime runs on its int8 GEMM: (op type, activation input, weight input).
INT8_PRODUCTS = {"MatMulInteger": (0, 1), "QAttention": (0, 1)}
ROWS_PER_CHUNK = 64      # bounds the [rows, K/2, N] int32 pair-sum buffer (ViT-B: ~57 MB)


@dataclass(frozen=True)
class ProductSaturation:
    """One quantised product: how many of its 16-bit pair sums clipped on the given clips."""
    node: str
    pair_sums: int          # rows * K/2 * N sums computed
    saturated: int          # of those, outside [-32768, 32767]
    largest: int            # largest |pair sum|
    weight_range: Tuple[int, int]


def pair_sum_saturation(activations: np.ndarray, weights: np.ndarray) -> Tuple[int, int, int]:
    """(sums computed, sums that saturate a signed 16-bit register, largest |sum|) for
    ``activations`` u8 [M, K] times ``weights`` s8 [K, N], pairs (2j, 2j+1) along K."""
    if activations.dtype != np.uint8 or weights.dtype != np.int8:
        raise KeyreidError(f"expected u8 activations and s8 weights, got {activations.dtype} and {weights.dtype}")
    rows, depth = activations.shape
    if weights.shape[0] != depth:
        raise KeyreidError(f"activations [.., {depth}] do not meet weights {list(weights.shape)}")
    if depth % 2:       # an odd K pairs its last product with a zero, as the packed kernel does
        activations = np.pad(activations, ((0, 0), (0, 1)))
        weights = np.pad(weights, ((0, 1), (0, 0)))
    even_weights, odd_weights = weights[0::2].astype(np.int32), weights[1::2].astype(np.int32)
    saturated, largest = 0, 0
    for start in range(0, rows, ROWS_PER_CHUNK):
        chunk = activations[start:start + ROWS_PER_CHUNK].astype(np.int32)
        # rows, K/2, N
        sums = chunk[:, 0::2, None] * even_weights[None] + chunk[:, 1::2, None] * odd_weights[None]
        saturated += int(np.count_nonzero((sums > INT16_MAX) | (sums < INT16_MIN)))
        largest = max(largest, int(np.abs(sums).max(initial=0)))
    return rows * (activations.shape[1] // 2) * weights.shape[1], saturated, largest


def int8_products(model) -> List[Tuple[str, str, np.ndarray]]:
    """(node name, u8 activation tensor name, s8 weight [K, N]) of every int8 GEMM in ``model``."""
    numpy_helper = require("onnx.numpy_helper")
    initializers = {init.name: init for init in model.graph.initializer}
    products = []
    for node in model.graph.node:
        if node.op_type not in INT8_PRODUCTS:
            continue
        activation_index, weight_index = INT8_PRODUCTS[node.op_type]
        weight = initializers.get(node.input[weight_index])
        if weight is None:
            continue        # activation x activation products are not quantised (export/precision.py)
        products.append((node.name, node.input[activation_index], numpy_helper.to_array(weight)))
    return products


def _activations(model, names: Sequence[str], feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Run ``model`` in ONNX Runtime with the u8 tensors ``names`` added as outputs."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None)
                              for name in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    collected: Dict[str, list] = {name: [] for name in names}
    for clip in range(len(feed["camera"])):     # one clip per run, as the CPU engine runs them
        values = session.run(list(names), {key: value[clip:clip + 1] for key, value in feed.items()})
        for name, value in zip(names, values):
            collected[name].append(value.reshape(-1, value.shape[-1]))
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def saturation_report(model_path: Path, feed: Dict[str, np.ndarray]) -> List[ProductSaturation]:
    """One row per int8 product of the file at ``model_path``, on the clips of ``feed``."""
    onnx = require("onnx")
    model = onnx.load_model(str(model_path))
    products = int8_products(model)
    if not products:
        raise KeyreidError(f"{model_path}: no int8 products (MatMulInteger, QAttention) to check")
    activations = _activations(model, sorted({name for _, name, _ in products}), feed)
    report = []
    for node, activation, weights in products:
        computed, saturated, largest = pair_sum_saturation(activations[activation], weights)
        report.append(ProductSaturation(node, computed, saturated, largest,
                                        (int(weights.min()), int(weights.max()))))
    return report
