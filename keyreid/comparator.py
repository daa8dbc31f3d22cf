"""One comparator for engine outputs, used by tests, the export's parity table and compare.py.

Errors are reported per output: max / mean / 99th-percentile absolute error, relative error
(max |actual - expected| over max |expected|, per row, worst row), and the worst row's cosine
similarity. fp16 outputs are cast up before comparing. A failed check says what tolerance would
have passed.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Bounds an output must meet; None skips that check."""
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None
    min_cosine: Optional[float] = None

    def describe(self) -> str:
        parts = [f"abs <= {self.max_abs:g}" if self.max_abs is not None else "",
                 f"rel <= {self.max_rel:g}" if self.max_rel is not None else "",
                 f"cosine >= {self.min_cosine:g}" if self.min_cosine is not None else ""]
        return ", ".join(part for part in parts if part) or "none"


@dataclass
class OutputComparison:
    name: str
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    min_cosine: float
    tolerance: Tolerance
    failures: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def _rows(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == np.float16 or array.dtype.kind != "f":
        array = array.astype(np.float32)
    return array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)


def compare_output(name: str, actual, expected, tolerance: Tolerance = Tolerance()) -> OutputComparison:
    actual_rows, expected_rows = _rows(actual), _rows(expected)
    if actual_rows.shape != expected_rows.shape:
        raise ValueError(f"{name}: shapes differ, {list(np.shape(actual))} vs {list(np.shape(expected))}")
    actual_rows = actual_rows.astype(np.float64)
    expected_rows = expected_rows.astype(np.float64)
    difference = np.abs(actual_rows - expected_rows)
    if not np.isfinite(actual_rows).all():
        difference = np.where(np.isfinite(actual_rows), difference, np.inf)
    scale = np.maximum(np.abs(expected_rows).max(axis=1), np.finfo(np.float32).tiny)
    relative = difference.max(axis=1) / scale
    norms = np.linalg.norm(actual_rows, axis=1) * np.linalg.norm(expected_rows, axis=1)
    cosine = np.where(norms > 0, (actual_rows * expected_rows).sum(axis=1) / np.maximum(norms, 1e-300),
                      np.where(difference.max(axis=1) == 0, 1.0, 0.0))
    result = OutputComparison(name, float(difference.max()), float(difference.mean()),
                              float(np.percentile(difference, 99)), float(relative.max()),
                              float(cosine.min()), tolerance)
    if tolerance.max_abs is not None and not result.max_abs <= tolerance.max_abs:
        result.failures.append(f"max abs error {result.max_abs:.3g} > {tolerance.max_abs:g}")
    if tolerance.max_rel is not None and not result.max_rel <= tolerance.max_rel:
        result.failures.append(f"relative error {result.max_rel:.3g} > {tolerance.max_rel:g}")
    if tolerance.min_cosine is not None and not result.min_cosine >= tolerance.min_cosine:
        result.failures.append(f"cosine {result.min_cosine:.6f} < {tolerance.min_cosine:g}")
    return result


@dataclass
class ComparisonReport:
    outputs: Dict[str, OutputComparison]

    @property
    def passed(self) -> bool:
        return all(output.passed for output in self.outputs.values())

    def failures(self) -> List[str]:
        return [f"{name}: {failure}" for name, output in self.outputs.items() for failure in output.failures]

    def table(self) -> str:
        header = f"{'output':<14}{'max abs':>11}{'mean abs':>11}{'p99 abs':>11}{'max rel':>11}{'cosine':>11}  tolerance"
        lines = [header, "-" * len(header)]
        for name, out in self.outputs.items():
            verdict = "ok" if out.passed else "FAIL"
            lines.append(f"{name:<14}{out.max_abs:>11.3g}{out.mean_abs:>11.3g}{out.p99_abs:>11.3g}"
                         f"{out.max_rel:>11.3g}{out.min_cosine:>11.6f}  {out.tolerance.describe()} [{verdict}]")
        return "\n".join(lines)


def compare_outputs(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                    tolerances: Optional[Mapping[str, Tolerance]] = None,
                    default: Tolerance = Tolerance()) -> ComparisonReport:
    """Compare every output present in ``expected``; missing outputs in ``actual`` are an error."""
    tolerances = tolerances or {}
    missing = [name for name in expected if name not in actual]
    if missing:
        raise ValueError(f"outputs missing from the actual results: {', '.join(missing)}")
    return ComparisonReport({name: compare_output(name, actual[name], expected[name],
                                                  tolerances.get(name, default))
                             for name in expected})
