"""The table of engine backends: which model kind each runs, its engine class, the CLI flags it takes.

Adding a backend is one row in ``BACKENDS`` (plus its engine module); ``open_engine``, the CLIs'
``--backend`` choices and their check of which flags apply all read this table. Engine modules
are imported only when their backend is chosen, so the optional libraries stay optional.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Tuple, Type

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
            {"--plugin-library": "plugin_libraries"}, "TensorRT .plan/.engine/.trt files on an NVIDIA GPU"),
    Backend("triton", ("triton",), "keyreid.runtime.engine_triton:TritonEngine",
            {"--timeout": "timeout_s"}, "a Triton Inference Server at grpc:// or http(s)://"),
)
_BY_NAME: Dict[str, Backend] = {backend.name: backend for backend in BACKENDS}


def backend_names() -> Tuple[str, ...]:
    """Every backend's name, in table order (``"auto"`` is not one: it chooses among them)."""
    return tuple(_BY_NAME)


# Options only some backends take (the keyword arguments behind their CLI flags).
_SPECIFIC_OPTIONS = frozenset(keyword for backend in BACKENDS for keyword in backend.cli_flags.values())


def auto_backend(kind: ModelKind, options: Iterable[str] = ()) -> Backend:
    """The backend ``auto`` picks for a model kind: the first row of ``BACKENDS`` that runs it and
    takes every backend-specific option asked for (``options``: keyword names); where none takes
    them all, the first row that runs it.

    So a ``.onnx`` file runs on ONNX Runtime, and on OpenVINO when an OpenVINO-only option is
    asked for (``inference_precision``: bf16 is OpenVINO's). Measured reasons, ViT-B, 2 threads
    (benchmarks/RESULTS.md section 7): at the same f32 precision OpenVINO ran 0.96-1.06x ONNX
    Runtime's speed on an AVX-512 VNNI EPYC (interleaved) and 1.05-1.17x on an AMX Xeon, at 3.4x
    the peak memory (4.7 against 1.4 GiB); int8 files run on ONNX Runtime only. What OpenVINO
    adds is bf16, which changes results, so it is asked for, never chosen silently.
    """
    specific = set(options) & _SPECIFIC_OPTIONS
    runs_it = [backend for backend in BACKENDS if kind in backend.kinds]
    # none takes them all: the first, whose refusal of the others then names the flag (cli_args)
    return next((backend for backend in runs_it if specific <= set(backend.cli_flags.values())), runs_it[0])


def choose_backend(kind: ModelKind, requested: Optional[str] = AUTO, location: object = "",
                   options: Iterable[str] = ()) -> Backend:
    """The backend that runs a model of ``kind``: ``requested`` by name, or the automatic choice
    for the options asked for (keyword names, see ``auto_backend``)."""
    if requested in (None, AUTO):
        return auto_backend(kind, options)
    backend = _BY_NAME.get(requested)
    if backend is None:
        raise KeyreidError(f"unknown backend {requested!r}; choose one of {', '.join((AUTO,) + backend_names())}")
    if kind not in backend.kinds:
        fits = [other.name for other in BACKENDS if kind in other.kinds]
        raise KeyreidError(f"{location or 'this model'} is {KIND_NAMES[kind]}, which the {backend.name} backend "
                           f"does not run (choose {' or '.join(fits + [AUTO])})")
    return backend
