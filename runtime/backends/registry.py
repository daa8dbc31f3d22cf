"""The registry of engine backends: every backend module's declaration, in one table.

Adding a backend is one module (an ``Engine`` subclass and its ``BACKEND`` declaration, see
``declaration.py``) and one line in ``BACKEND_MODULES``. ``open_engine``, the command-line tools'
``--backend`` choices, flags and their check (runtime/cli_args.py), ``compare.py``, the Triton
repository writer and the benchmarks all read this table. Backend modules import their optional
libraries (onnxruntime, openvino, tensorrt, tritonclient) only when an engine activates, so
reading the table needs none of them.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

from keyreid.errors import KeyreidError
from keyreid.runtime.backends.base import Engine, check_model_file
from keyreid.runtime.backends.declaration import Backend
from keyreid.runtime.backends.formats import KIND_NAMES, ModelKind, known_model_kind

# Table order matters: ``auto`` takes the first backend that runs a model (see auto_backend).
BACKEND_MODULES = ("onnxruntime", "openvino", "tensorrt", "triton")

AUTO = "auto"

BACKENDS: Tuple[Backend, ...] = tuple(
    importlib.import_module(f"{__package__}.{module}").BACKEND for module in BACKEND_MODULES)
_BY_NAME: Dict[str, Backend] = {backend.name: backend for backend in BACKENDS}


def backend_named(name: str) -> Backend:
    """The registered backend called ``name`` (KeyreidError naming the choices otherwise)."""
    if name not in _BY_NAME:
        raise KeyreidError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}")
    return _BY_NAME[name]


def backend_names() -> Tuple[str, ...]:
    """Every backend's name, in table order (``"auto"`` is not one: it chooses among them)."""
    return tuple(_BY_NAME)


# Options only some backends take (the keyword arguments behind their CLI flags).
_SPECIFIC_OPTIONS = frozenset(keyword for backend in BACKENDS for keyword in backend.keywords)


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
    return next((backend for backend in runs_it if specific <= set(backend.keywords)), runs_it[0])


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


def open_engine(path: "str | Path", backend: str = AUTO, **options) -> Engine:
    """Return an (inactive) engine for ``path``: the model format comes from the file suffix or the
    URL scheme (``formats.py``), the backend from ``backend``: a name from ``backend_names()``, or
    ``"auto"``, which picks by the format and the options given (``auto_backend``:
    ``inference_precision`` means OpenVINO). ``options`` go to that backend's engine class.
    Activate it with a with-block, ``activate()`` or by handing it to a Runner.
    """
    kind = known_model_kind(path)
    chosen = choose_backend(kind, backend, path, options)
    if kind != "triton":
        path = check_model_file(Path(path))
    return chosen.engine_class(path, **options)
