"""keyreid.runtime.backends: what runs a model file, behind one ``Engine`` interface.

- ``base``: the ``Engine`` interface and the contract checks every backend shares.
- ``declaration``: what a backend declares about itself (formats, options and flags, device).
- ``formats``: the model formats by file suffix or URL scheme (the one place reading suffixes).
- ``registry``: the table of backends, ``open_engine`` and the ``auto`` choice.
- one module per backend: ``onnxruntime``, ``openvino`` (with ``openvino_ir``), ``tensorrt``,
  ``triton``; each imports its library only when an engine activates.
"""
from keyreid.runtime.backends.base import Engine
from keyreid.runtime.backends.declaration import Backend, EngineOption
from keyreid.runtime.backends.formats import model_kind
from keyreid.runtime.backends.registry import (AUTO, BACKENDS, backend_named, backend_names, choose_backend,
                                               open_engine)

__all__ = ["Engine", "Backend", "EngineOption", "model_kind", "AUTO", "BACKENDS", "backend_named", "backend_names",
           "choose_backend", "open_engine"]
