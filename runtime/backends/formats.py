"""What kind of model a path or address names: the one place that reads file suffixes.

The runtime picks an engine by it (``open_engine``), the CLIs check which options apply by it,
``compare.py`` pairs a TensorRT plan with the ONNX file it was built from by it, and the Triton
repository writer picks the Triton platform by it. A new suffix is added here once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Literal, Optional, Tuple, Union

from keyreid.errors import KeyreidError
from keyreid.triton import is_triton_url

ModelKind = Literal["onnx", "openvino", "tensorrt", "triton"]

ONNX_SUFFIXES: Tuple[str, ...] = (".onnx",)
TENSORRT_SUFFIXES: Tuple[str, ...] = (".plan", ".engine", ".trt")
# An OpenVINO IR is two files: the graph (.xml), named by the user, and its weights beside it
# with the same stem (OPENVINO_WEIGHTS_SUFFIX), which OpenVINO finds on its own.
OPENVINO_SUFFIXES: Tuple[str, ...] = (".xml",)
OPENVINO_WEIGHTS_SUFFIX = ".bin"
# model kind -> the file suffixes that hold it (a Triton model is an address, not a file)
FILE_SUFFIXES: Dict[str, Tuple[str, ...]] = {"onnx": ONNX_SUFFIXES, "openvino": OPENVINO_SUFFIXES,
                                             "tensorrt": TENSORRT_SUFFIXES}
KIND_NAMES: Dict[str, str] = {"onnx": "an ONNX model", "openvino": "an OpenVINO IR model (.xml with its .bin)",
                              "tensorrt": "a TensorRT engine", "triton": "a model on a Triton server"}


def model_kind(location: Union[str, Path]) -> Optional[ModelKind]:
    """``"triton"`` for a grpc:// or http(s):// address, ``"onnx"``, ``"openvino"`` or
    ``"tensorrt"`` by the file suffix (any case), None for any other suffix."""
    if is_triton_url(location):
        return "triton"
    suffix = Path(location).suffix.lower()
    for kind, suffixes in FILE_SUFFIXES.items():
        if suffix in suffixes:
            return kind       # type: ignore[return-value]
    return None


def known_model_kind(location: Union[str, Path]) -> ModelKind:
    """``model_kind``, or a KeyreidError listing the suffixes keyreid reads."""
    kind = model_kind(location)
    if kind is None:
        known = [suffix for suffixes in FILE_SUFFIXES.values() for suffix in suffixes]
        raise KeyreidError(f"{location}: unknown engine file type '{Path(location).suffix}'; expected "
                           + ", ".join(known))
    return kind
