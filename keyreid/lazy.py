"""Lazy imports of optional heavy dependencies, with a sentence naming the extra to install."""
import importlib
from types import ModuleType
from typing import Optional, Tuple

from keyreid.errors import KeyreidError

# import name -> (pip extra that provides it, what it is needed for)
_EXTRAS = {
    "torch": ("export", "checkpoint loading and ONNX export"),
    "onnx": ("export", "ONNX export"),
    "onnxscript": ("export", "ONNX export"),
    "onnxruntime": ("runtime", "running .onnx models"),
    "openvino": ("openvino", "running .onnx models on OpenVINO"),
    "cv2": ("runtime", "image decoding"),
    "tensorrt": ("gpu", "building and running TensorRT engines"),
    "cuda.bindings.runtime": ("gpu", "running TensorRT engines"),
    "cuda.bindings.driver": ("gpu", "the fused CUDA KeypointPartPool kernel"),
    "tritonclient.grpc": ("triton", "Triton Inference Server engines and model repositories"),
    "tritonclient.http": ("triton", "Triton Inference Server engines over HTTP"),
    "pytriton.triton": ("triton-server", "serving an engine through PyTriton's bundled Triton server"),
    "faiss": ("gallery", "FAISS gallery search"),
    "ray": ("ray", "batch embedding on Ray (runtime/batch.py)"),
    "ray.data": ("ray", "batch embedding on Ray (runtime/batch.py)"),
    "pyarrow": ("ray", "batch.py's Parquet output"),
    "pyarrow.parquet": ("ray", "batch.py's Parquet output"),
    "lancedb": ("archive", "the archive gallery (LanceDB)"),
    "lancedb.index": ("archive", "the archive gallery (LanceDB)"),
}


def require(module_name: str, needed_for: Optional[Tuple[str, str]] = None) -> ModuleType:
    """Import ``module_name`` or raise KeyreidError saying which extra provides it.

    ``needed_for`` is (pip extra, purpose) where the caller needs the module for something other
    than its usual job (``onnx`` for the OpenVINO engine comes with ``[openvino]``, not ``[export]``).
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        extra, purpose = needed_for or _EXTRAS.get(module_name, (None, None))
        hint = f'pip install "keyreid[{extra}]"' if extra else f"pip install {module_name}"
        needed = f" (needed for {purpose})" if purpose else ""
        raise KeyreidError(f"{module_name} is not installed{needed}: {hint}") from exc
