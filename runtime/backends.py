"""The table of engine backends: which model kind each runs, its engine class, the CLI flags it takes.

Adding a backend is one row in ``BACKENDS`` (plus its engine module); ``open_engine``, the CLIs'
``--backend`` choices and their check of which flags apply all read this table. Engine modules
are imported only when their backend is chosen, so the optional libraries stay optional.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Type

from keyreid.errors import KeyreidError
from keyreid.model_kinds import KIND_NAMES, ModelKind

AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    name: str                        # what --backend and open_engine(backend=...) call it
    kinds: Tuple[ModelKind, ...]     # the models it runs
    engine_class: str                # "module:Class", imported when chosen
    cli_flags: Mapping[str, str]     # command-line flag -> keyword argument of the engine class
    summary: str                     # one phrase for --help

    def load_class(self) -> Type:
        module_name, class_name = self.engine_class.split(":")
        return getattr(importlib.import_module(module_name), class_name)


BACKENDS: Tuple[Backend, ...] = (
    Backend("onnxruntime", ("onnx",), "keyreid.runtime.engine_ort:OrtEngine",
            {"--providers": "providers", "--threads": "intra_op_threads", "--clips-per-run": "clips_per_run"},
            "ONNX Runtime, any .onnx file (fp32, fp16, int8); CPU or GPU providers"),
    Backend("openvino", ("onnx", "openvino"), "keyreid.runtime.engine_openvino:OpenVinoEngine",
            {"--threads": "threads", "--clips-per-run": "clips_per_run",
             "--inference-precision": "inference_precision"},
            "OpenVINO on the CPU, fp32 and fp16 .onnx files and int8 .xml IR (to_openvino.py)"),
    Backend("tensorrt", ("tensorrt",), "keyreid.runtime.engine_trt:TrtEngine",
            {"--plugin": "plugin_libraries"}, "TensorRT .plan/.engine/.trt files on an NVIDIA GPU"),
    Backend("triton", ("triton",), "keyreid.runtime.engine_triton:TritonEngine",
            {"--timeout": "timeout_s"}, "a Triton Inference Server at grpc:// or http(s)://"),
)
_BY_NAME: Dict[str, Backend] = {backend.name: backend for backend in BACKENDS}


def backend_names() -> Tuple[str, ...]:
    """Every backend's name, in table order (``"auto"`` is not one: it chooses among them)."""
    return tuple(_BY_NAME)


def auto_backend(kind: ModelKind) -> Backend:
    """The backend ``auto`` picks for a model kind: the first row that runs it.

    This is the one place for a speed rule (for example OpenVINO on CPUs where benchmarks show it
    faster than ONNX Runtime); until measurements decide one, ``.onnx`` files run on ONNX Runtime,
    as they always did.
    """
    return next(backend for backend in BACKENDS if kind in backend.kinds)


def choose_backend(kind: ModelKind, requested: Optional[str] = AUTO, location: object = "") -> Backend:
    """The backend that runs a model of ``kind``: ``requested`` by name, or the automatic choice."""
    if requested in (None, AUTO):
        return auto_backend(kind)
    backend = _BY_NAME.get(requested)
    if backend is None:
        raise KeyreidError(f"unknown backend {requested!r}; choose one of {', '.join((AUTO,) + backend_names())}")
    if kind not in backend.kinds:
        fits = [other.name for other in BACKENDS if kind in other.kinds]
        raise KeyreidError(f"{location or 'this model'} is {KIND_NAMES[kind]}, which the {backend.name} backend "
                           f"does not run (choose {' or '.join(fits + [AUTO])})")
    return backend
