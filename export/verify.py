"""Parity of a written ONNX file against the reference model, on sample inputs (ONNX Runtime CPU).

The tolerances are the project's one table (keyreid/tolerances.py): fp32 must reproduce the
checkpoint; fp16 and int8 trade exactness for speed (cosine >= 0.999).
"""
from pathlib import Path

from keyreid.comparator import ComparisonReport, compare_outputs
from keyreid.synthetic import MARS_CROP_SIZE, synthetic_feed
from keyreid.tolerances import TOLERANCES
DEFAULT_SAMPLE_CLIPS = 3


def reference_results(model, inputs: dict, heatmap_mode: str) -> dict:
    from keyreid.export.reference_model import reference_outputs

    return reference_outputs(model, inputs["frames"], inputs["keypoints"], inputs["crop_size"],
                             inputs["camera"], heatmap_mode)


def onnxruntime_results(onnx_path: Path, inputs: dict, threads: int = 0) -> dict:
    from keyreid.runtime.engines import open_engine

    with open_engine(onnx_path, providers=["CPUExecutionProvider"],
                     intra_op_threads=threads or None) as engine:
        return engine.infer(inputs)


def verify_onnx(onnx_path: Path, model, heatmap_mode: str, precision: str,
                num_clips: int = DEFAULT_SAMPLE_CLIPS) -> ComparisonReport:
    # MARS-sized crops: rendering in the model frame is exact there (docs/contract.md §3).
    inputs = synthetic_feed(num_clips, model.config.num_cameras, crop_sizes=[MARS_CROP_SIZE])
    return compare_outputs(onnxruntime_results(onnx_path, inputs),
                           reference_results(model, inputs, heatmap_mode), TOLERANCES[precision])
