"""ONNX Runtime backend: runs an exported ``.onnx`` model on the best execution provider present.

The ``KeypointPartPool`` node carries a local-function body of standard ops (docs/contract.md §6), so
ONNX Runtime needs no extra library for it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from keyreid.cpu_features import cpu_isa
from keyreid.errors import KeyreidError, warn_once
from keyreid.int8_targets import file_recipe, int8_cpu_mismatch, needs_exact_u8u8_path
from keyreid.lazy import require
from keyreid.model_metadata import read_metadata
from keyreid.runtime.backends.declaration import CLIPS_PER_RUN, THREADS, Backend, EngineOption
from keyreid.runtime.backends.base import (Engine, EngineInfo, FoundTensor, check_io, check_model_file,
                                     run_in_pieces)

# Most preferred first; only the ones onnxruntime reports as available are used.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

# ONNX Runtime's session option for its exact u8 x u8 int8 path (keyreid/int8_targets.py says why).
EXACT_INT8_OPTION = "session.x64quantprecision"

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

def parse_providers(text: str) -> List[str]:
    """``"cuda,cpu"`` -> ``["CUDAExecutionProvider", "CPUExecutionProvider"]``; full names pass."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one execution provider")
    return [PROVIDER_ALIASES.get(name.lower(), name) for name in names]



# ONNX Runtime type strings -> NumPy dtypes (only the ones a KeyRe-ID model could plausibly hold).
_ORT_DTYPES = {
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32,
    "tensor(int64)": np.int64, "tensor(float16)": np.float16, "tensor(float)": np.float32,
    "tensor(double)": np.float64, "tensor(bool)": np.bool_,
}

# A provider is a name, or (name, provider options) as onnxruntime accepts it.
Provider = Union[str, Tuple[str, dict]]

# On a CPU, a batch runs as consecutive runs of this many clips. Per clip, one clip per run
# measured fastest for ViT-B (benchmarks/RESULTS.md, 2-core Intel Xeon: int8 12.6 clips/s at
# batch 1 against 9.8 at batch 8; fp32 3.55 against 3.47 at 8 and 3.23 at 32; rechecked on the
# fused-attention int8 file: 1, 2, 4 clips per run 15.0, 15.1, 13.8): a larger batch's
# activations no longer fit in cache. GPU providers run whole batches, which is where they gain.
CPU_CLIPS_PER_RUN = 1


def choose_providers(available: Sequence[str], requested: Optional[Sequence[Provider]] = None) -> list:
    """Providers to hand to onnxruntime: ``requested`` as given (each must be available), or
    else TensorRT, CUDA, CPU in that order, keeping those present."""
    if requested is None:
        chosen = [name for name in PREFERRED_PROVIDERS if name in available]
        return chosen or list(available)
    missing = [entry if isinstance(entry, str) else entry[0] for entry in requested]
    missing = [name for name in missing if name not in available]
    if missing:
        raise KeyreidError(f"execution provider(s) {', '.join(missing)} not available in this "
                           f"onnxruntime build (available: {', '.join(available)})")
    return list(requested)


def _found_tensor(node_arg) -> FoundTensor:
    """Translate an onnxruntime NodeArg (dims are ints, or strings/None when dynamic)."""
    dtype = _ORT_DTYPES.get(node_arg.type)
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else None for dim in node_arg.shape)
    return FoundTensor(node_arg.name, None if dtype is None else np.dtype(dtype), shape)


class OrtEngine(Engine):
    """An ``.onnx`` model on ONNX Runtime. ``session.run`` is thread-safe, so one engine may be
    shared by several threads."""

    backend = "onnxruntime"

    def __init__(self, path: "str | Path", *, providers: Optional[Sequence[Provider]] = None,
                 threads: Optional[int] = None, inter_op_threads: Optional[int] = None,
                 max_batch: Optional[int] = None, num_cameras: Optional[int] = None,
                 clips_per_run: Optional[int] = None):
        """
        Args:
            path: the ``.onnx`` file.
            providers: execution providers in order of preference (names or (name, options));
                default TensorRT, CUDA, CPU, whichever are available.
            threads: threads inside one operator; None lets onnxruntime decide.
            inter_op_threads: threads across operators; None lets onnxruntime decide.
            max_batch: most clips per call; None for no limit (the model's batch is dynamic).
            num_cameras: overrides the model's ``num_cameras`` metadata.
            clips_per_run: clips per ``session.run``; a bigger batch runs in pieces of this
                size. None: CPU_CLIPS_PER_RUN when the session runs on the CPU provider alone,
                else whole batches.
        """
        super().__init__(path, num_cameras=num_cameras)
        if max_batch is not None and max_batch < 1:
            raise KeyreidError(f"max_batch must be at least 1, got {max_batch}")
        if clips_per_run is not None and clips_per_run < 1:
            raise KeyreidError(f"clips_per_run must be at least 1, got {clips_per_run}")
        self._requested_clips_per_run = clips_per_run
        self._clips_per_run: Optional[int] = None      # None: whole batches
        self._requested_providers = None if providers is None else list(providers)
        self._threads = threads
        self._inter_op_threads = inter_op_threads
        self._max_batch = max_batch
        self._session = None
        self._output_names: list = []

    @property
    def providers(self) -> list:
        """The providers the active session really uses, most preferred first."""
        if self._session is None:
            raise KeyreidError(f"{self.path}: engine is not active")
        return self._session.get_providers()

    @property
    def clips_per_run(self) -> Optional[int]:
        """Clips per ``session.run`` of the active session; None when batches run whole."""
        self._active_info()
        return self._clips_per_run

    def activate_impl(self) -> EngineInfo:
        ort = require("onnxruntime")
        check_model_file(self.path)
        options = ort.SessionOptions()
        options.log_severity_level = 3          # errors only; we report problems ourselves
        if self._threads is not None:
            options.intra_op_num_threads = self._threads
        if self._inter_op_threads is not None:
            options.inter_op_num_threads = self._inter_op_threads
        providers = choose_providers(ort.get_available_providers(), self._requested_providers)
        session = self._load(ort, options, providers)
        metadata = read_metadata(session.get_modelmeta().custom_metadata_map, self.path)
        isa = cpu_isa()
        if needs_exact_u8u8_path(file_recipe(metadata), isa):
            # The recipe is in the file's metadata, which only a loaded session reads: load once more
            # with the exact kernel (an int8 file for VNNI CPUs on an AVX2-only one; rare and explained).
            options.add_session_config_entry(EXACT_INT8_OPTION, "1")
            session = self._load(ort, options, providers)

        input_specs, output_specs = check_io(
            self.path, [_found_tensor(arg) for arg in session.get_inputs()],
            [_found_tensor(arg) for arg in session.get_outputs()], metadata)
        mismatch = int8_cpu_mismatch(metadata, isa, self.path)
        if mismatch:
            warn_once(mismatch)
        self._session = session
        self._output_names = [spec.name for spec in output_specs]
        on_cpu_only = session.get_providers() == ["CPUExecutionProvider"]
        self._clips_per_run = self._requested_clips_per_run or (CPU_CLIPS_PER_RUN if on_cpu_only else None)
        return EngineInfo(input_specs, output_specs, self._max_batch, metadata.num_cameras, metadata)

    def _load(self, ort, options, providers):
        try:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:   # onnxruntime raises its own pybind exception types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KeyreidError(f"{self.path}: cannot be loaded as an ONNX model "
                               f"(truncated or not a model?): {reason}") from exc

    def infer_impl(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return run_in_pieces(self._run, feed, self._clips_per_run)

    def _run(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return dict(zip(self._output_names, self._session.run(self._output_names, feed)))

    def deactivate_impl(self) -> None:
        self._session = None
        self._output_names = []


PROVIDERS = EngineOption(
    "--providers", "providers", "ONNX Runtime execution providers, most preferred first, comma-separated "
    "(full names or cpu, cuda, tensorrt; default: TensorRT, CUDA, CPU, whichever this onnxruntime "
    "build has)", type=parse_providers, metavar="LIST")

BACKEND = Backend(
    name="onnxruntime", kinds=("onnx",), engine_class=OrtEngine, options=(PROVIDERS, THREADS, CLIPS_PER_RUN),
    summary="ONNX Runtime, any .onnx file (fp32, fp16, int8); CPU or GPU providers",
    device="the CPU, or an NVIDIA GPU through the CUDA and TensorRT providers")
