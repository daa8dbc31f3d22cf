"""What the Triton model repository (export) and the Triton engine (runtime) both need to agree on.

Triton names element types in two spellings: ``TYPE_UINT8`` in ``config.pbtxt`` and ``UINT8`` on
the wire and in model metadata. The model's own description (heatmap mode, cameras, embedding
length, ...) travels as string ``parameters`` in the model configuration, under the same keys
as the ONNX file's metadata_props, so an engine reads the same facts from either source.
"""
from typing import Dict, Mapping

import numpy as np

# The element types of the contract (docs/contract.md §6), by their Triton wire names.
TRITON_DATATYPES = {
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.float32): "FP32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.int32): "INT32",
}
NUMPY_DATATYPES = {name: dtype for dtype, name in TRITON_DATATYPES.items()}

URL_SCHEMES = ("grpc", "http", "https")
DEFAULT_MODEL_NAME = "keyreid"
DEFAULT_PORTS = {"grpc": 8001, "http": 8000, "https": 443}
DEFAULT_MAX_BATCH = 8            # clips per server-side batch when nothing else says
DEFAULT_QUEUE_DELAY_US = 2000    # longest a request waits on the server for a fuller batch


def preferred_batch_sizes(max_batch: int, optimal_batch: "int | None" = None) -> list:
    """The dynamic batcher's preferred sizes: the largest batch, and the size the engine was
    optimised for (a TensorRT plan's opt profile) when that is smaller."""
    sizes = {max_batch}
    if optimal_batch is not None and 1 <= optimal_batch < max_batch:
        sizes.add(optimal_batch)
    return sorted(sizes)


def wire_dims(shape) -> tuple:
    """The per-clip dims of a contract shape as Triton carries them. Triton needs at least one dim
    per batch item, so a per-clip scalar (``camera``, shape [N]) travels as [N, 1]; config.pbtxt
    reshapes it back to [N] for the model (``reshape: { shape: [ ] }``)."""
    return tuple(shape[1:]) or (1,)


def config_datatype(dtype: np.dtype) -> str:
    """``np.uint8`` -> ``TYPE_UINT8`` (config.pbtxt spelling)."""
    return "TYPE_" + TRITON_DATATYPES[np.dtype(dtype)]


def is_triton_url(location: object) -> bool:
    """True for ``grpc://...``, ``http://...`` and ``https://...`` engine locations."""
    return isinstance(location, str) and location.split("://", 1)[0].lower() in URL_SCHEMES and "://" in location


def parameters_from_config(config: Mapping) -> Dict[str, str]:
    """The string parameters of a model configuration in Triton's JSON form
    (``{"parameters": {"heatmap_mode": {"string_value": "max"}, ...}}``)."""
    parameters = config.get("parameters") or {}
    return {key: str(value.get("string_value", "")) for key, value in parameters.items()
            if isinstance(value, Mapping)}

