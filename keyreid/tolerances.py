"""How close each precision stays to the checkpoint's reference model: one table, read by the
export's verification, ``compare.py``, the int8 accuracy gate and the tests.

A file's precision (``--precision`` at export: fp32, fp16, int8) and, where a backend lowers it
at run time, its compute precision (OpenVINO's bf16) pick the row. fp32 must reproduce the
checkpoint. The lowered precisions trade exactness for speed, measured as embedding cosine; the
keypoint op stays fp32 in every one of them except fp16 (GPU kernels), so its part weights keep
fp32's bound there.
"""
from typing import Dict, Optional

from keyreid.comparator import Tolerance

TOLERANCES: Dict[str, Dict[str, Tolerance]] = {
    "fp32": {"embedding": Tolerance(max_rel=1e-4), "part_weights": Tolerance(max_abs=1e-5)},
    "fp16": {"embedding": Tolerance(min_cosine=0.999), "part_weights": Tolerance(max_abs=1e-3)},
    "int8": {"embedding": Tolerance(min_cosine=0.999), "part_weights": Tolerance(max_abs=1e-5)},
    # TensorRT building an fp32 file: its default TF32 matmuls on Ampere and newer GPUs round
    # inputs to 10-bit mantissas (the keypoint op's own arithmetic stays fp32)
    "tf32": {"embedding": Tolerance(max_rel=1e-3), "part_weights": Tolerance(max_abs=1e-5)},
    # OpenVINO computing an fp32 file in bf16 (its keypoint op stays f32: runtime/backends/openvino.py)
    "bf16": {"embedding": Tolerance(min_cosine=0.9995), "part_weights": Tolerance(max_abs=1e-5)},
}

# From exact to loosest: of two engines compared, the looser one's row applies.
_LOOSENESS = ("fp32", "tf32", "bf16", "fp16", "int8")
# Compute precisions a backend lowers an fp32 file to (Engine.compute_precision).
_LOWERED_COMPUTE = ("tf32", "bf16")


def precision_row(file_precision: Optional[str], compute_precision: Optional[str] = None) -> str:
    """The TOLERANCES row of an engine: its file's precision, or the compute precision a backend
    lowers an fp32 file to (TensorRT's tf32, OpenVINO's bf16). A file that does not say (a Triton
    model without keyreid's parameters) is taken as fp32."""
    row = file_precision if file_precision in TOLERANCES else "fp32"
    if compute_precision in _LOWERED_COMPUTE and row == "fp32":
        return compute_precision
    return row


def describe_row(row: str) -> str:
    """A row as words, for --help texts: 'embedding cosine >= 0.999, part_weights max abs <= 1e-05'."""
    return ", ".join(f"{name} {tolerance.describe()}" for name, tolerance in TOLERANCES[row].items())


def looser(first: str, second: str) -> str:
    """The looser of two TOLERANCES rows."""
    return max(first, second, key=_LOOSENESS.index)
