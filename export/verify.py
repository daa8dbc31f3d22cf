"""Parity of a written ONNX file against the reference model, on sample inputs (ONNX Runtime CPU),
and of an int8 OpenVINO IR against the fp32 file it was made from (both in OpenVINO, f32).

The tolerances are the project's one table (keyreid/tolerances.py): fp32 must reproduce the
checkpoint; fp16 and int8 trade exactness for speed (a bound on embedding cosine).
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
    from keyreid.runtime.backends import open_engine

    with open_engine(onnx_path, providers=["CPUExecutionProvider"],
                     threads=threads or None) as engine:
        return engine.infer(inputs)


def verify_onnx(onnx_path: Path, model, heatmap_mode: str, precision: str,
                num_clips: int = DEFAULT_SAMPLE_CLIPS) -> ComparisonReport:
    # MARS-sized crops: rendering in the model frame is exact there (docs/contract.md §3).
    inputs = synthetic_feed(num_clips, model.config.num_cameras, crop_sizes=[MARS_CROP_SIZE])
    return compare_outputs(onnxruntime_results(onnx_path, inputs),
                           reference_results(model, inputs, heatmap_mode), TOLERANCES[precision])


def openvino_results(model_path: Path, inputs: dict, threads: int = 0) -> dict:
    """Outputs of an .onnx file or an IR on OpenVINO's CPU plugin at f32 (never its bf16 default)."""
    from keyreid.runtime.backends import open_engine

    with open_engine(model_path, backend="openvino", inference_precision="f32", threads=threads or None) as engine:
        return engine.infer(inputs)


def verify_openvino_int8(ir_path: Path, fp32_onnx_path: Path, num_cameras, num_clips: int = DEFAULT_SAMPLE_CLIPS,
                         threads: int = 0) -> ComparisonReport:
    """The int8 IR against its fp32 ONNX file, both on OpenVINO f32, with the int8 tolerances.

    The fp32 file reproduces the checkpoint (its own export verified that), so this measures
    what the quantisation alone changed."""
    inputs = synthetic_feed(num_clips, num_cameras, crop_sizes=[MARS_CROP_SIZE])
    return compare_outputs(openvino_results(ir_path, inputs, threads),
                           openvino_results(fp32_onnx_path, inputs, threads), TOLERANCES["int8"])
