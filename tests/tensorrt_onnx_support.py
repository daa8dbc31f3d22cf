"""What TensorRT's ONNX parser supports, from onnx/onnx-tensorrt ``docs/operators.md`` at the
``10.1-GA`` release (commit 96e7811): "TensorRT 10.0 supports operators in the inclusive range of
opset 9 to opset 20". Every operator marked Y there is listed below. The 10.1 table is the
oldest TensorRT 10 table published and a subset of the later ones, so a graph it accepts also
suits JetPack 6's TensorRT 10.3 and every newer 10.x and 11.x parser.
"""
from typing import List

OPSET_RANGE = (9, 20)

SUPPORTED_OPERATORS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# The table's restriction "`axes` must be an initializer" (a constant tensor for Unsqueeze):
# operator -> index of its axes input (opset 18).
AXES_INPUT = {"ReduceL1": 1, "ReduceL2": 1, "ReduceLogSum": 1, "ReduceLogSumExp": 1, "ReduceMax": 1,
              "ReduceMean": 1, "ReduceMin": 1, "ReduceProd": 1, "ReduceSum": 1, "ReduceSumSquare": 1,
              "Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3}


def _body_problems(where: str, nodes, constants: set, custom_ops: set) -> List[str]:
    problems = []
    constants = set(constants)
    for node in nodes:
        if node.op_type == "Constant":
            constants.update(node.output)
        if (node.domain, node.op_type) in custom_ops:
            continue
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: {node.domain}::{node.op_type} is not a standard operator")
        elif node.op_type not in SUPPORTED_OPERATORS:
            problems.append(f"{where}: {node.op_type} is not supported by TensorRT's ONNX parser")
        index = AXES_INPUT.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] and node.input[index] not in constants:
            problems.append(f"{where}: {node.op_type} {node.name!r} takes axes from {node.input[index]!r}, "
                            "not from an initializer or Constant")
    return problems


def parser_problems(model) -> List[str]:
    """Every reason TensorRT's ONNX parser would reject ``model`` by the table: unsupported
    operators in the graph and in local-function bodies (which the parser imports when the
    plugin is not used), non-constant axes, and the opset."""
    problems = []
    opset = {entry.domain: entry.version for entry in model.opset_import}.get("", None)
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset {opset} is outside TensorRT's range {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    functions = {(function.domain, function.name) for function in model.functions}
    initializers = {tensor.name for tensor in model.graph.initializer}
    problems += _body_problems("graph", model.graph.node, initializers, functions)
    for function in model.functions:
        problems += _body_problems(f"function {function.domain}::{function.name}", function.node, set(), functions)
    return problems
