"""OpenVINO backend: an ``.onnx`` file (fp32 or fp16) or an int8 OpenVINO IR (``.xml`` + ``.bin``,
made by export/to_openvino.py) on OpenVINO's CPU plugin.

An IR is read as OpenVINO wrote it (runtime/backends/openvino_ir.py): its keyreid metadata is in the
model's rt_info, its functions were inlined before it was quantised.

Loading. OpenVINO's ONNX frontend does not inline ONNX local functions, and the exported
``keyreid::KeypointPartPool`` node is one ("No conversion rule for keyreid.KeypointPartPool").
So the file is read with ``onnx``, its local functions are inlined in memory
(``onnx.inliner.inline_local_functions``), the opset imports of their domains are dropped, and
the bytes go to ``Core.read_model``. Nothing is written beside the user's file. While loading,
the model is held about three times (the ONNX proto, its bytes, OpenVINO's graph): about 2.4 GiB
for ViT-B fp32, freed once compiled.

The int8 file does not load: its ``com.microsoft.QAttention`` / ``MatMulInteger`` recipe is ONNX
Runtime's. It is refused by its metadata before any work.

Precision (``inference_precision``, OpenVINO's own term). OpenVINO's CPU plugin silently runs
bf16 on CPUs with AMX unless ``INFERENCE_PRECISION_HINT`` is set, so it is always set:
- ``"f32"`` (default): exact; matches ONNX Runtime on the same file to about 1e-6.
- ``"bf16"``: only where the CPU has bf16 arithmetic (``cpu_isa().bf16``: AMX or AVX-512 BF16);
  elsewhere a KeyreidError naming the CPU class.
- ``"auto"``: bf16 on AMX CPUs (``cpu_isa().amx_bf16``), f32 everywhere else. On AMX the tiles
  make bf16 products much faster and ViT-B's embedding kept cosine 0.99995 to f32 (measured by a
  colleague); AVX-512 BF16 without AMX gains less, so it stays f32 until a benchmark says otherwise.
  The part weights never run in bf16: under the bf16 hint OpenVINO would lower the keypoint op's
  own matrix products too (mode mean moved ``part_weights`` by up to 0.06 on the reduced test
  models), and OpenVINO's Python API has no per-node way to keep them in f32. So in bf16 the
  graph is cut at ``part_weights``: the keypoint op compiles alone in f32, the network in bf16
  with the part weights as an input, and each call runs the two in turn. ``part_weights`` then
  equal f32's; only the embedding carries bf16's rounding.

Threads: the engine holds one ``InferRequest`` behind a lock, so ``infer`` is thread-safe and
concurrent calls run one after another. The model is compiled with the LATENCY hint (one
stream using every thread), where one request at a time is what the plugin runs anyway.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from keyreid.cpu_features import cpu_isa
from keyreid.errors import KeyreidError, warn_once
from keyreid.int8_targets import int8_cpu_mismatch
from keyreid.lazy import require
from keyreid.model_metadata import read_metadata
from keyreid.runtime.backends.formats import model_kind
from keyreid.runtime.backends import openvino_ir
from keyreid.runtime.backends.declaration import CLIPS_PER_RUN, THREADS, Backend, EngineOption
from keyreid.runtime.backends.base import (Engine, EngineInfo, FoundTensor, check_io, check_model_file,
                                     run_in_pieces)

INFERENCE_PRECISIONS = ("f32", "bf16", "auto")
# Where the bf16 graph is cut (the keypoint op's inputs and output, docs/contract.md §6).
PART_WEIGHT_INPUTS = ("keypoints", "crop_size")
OUTPUT_PART_WEIGHTS = "part_weights"
_ONNX_FOR_OPENVINO = ("openvino", "inlining the model's ONNX functions for OpenVINO")
# File precisions (ONNX metadata ``precision``) OpenVINO cannot read, and why.
UNSUPPORTED_FILE_PRECISIONS = {
    "int8": "its quantised attention (com.microsoft.QAttention) is an ONNX Runtime contrib op",
}

# OpenVINO element type names -> NumPy dtypes. By name, because ``Type.to_dtype()`` maps bf16 to
# float16, which would hide a bf16 tensor from the contract check.
_OV_DTYPES = {
    "u8": np.uint8, "i8": np.int8, "i32": np.int32, "i64": np.int64, "f16": np.float16,
    "f32": np.float32, "f64": np.float64, "boolean": np.bool_,
}


def resolve_inference_precision(requested: str) -> str:
    """``"f32"`` or ``"bf16"`` for a requested precision on this CPU (see the module's rule)."""
    if requested not in INFERENCE_PRECISIONS:
        raise KeyreidError(f"inference_precision must be one of {', '.join(INFERENCE_PRECISIONS)}, "
                           f"got {requested!r}")
    isa = cpu_isa()
    if requested == "auto":
        return "bf16" if isa.amx_bf16 else "f32"
    if requested == "bf16" and not isa.bf16:
        raise KeyreidError(f"inference precision bf16 needs a CPU with AMX or AVX-512 BF16, and this one "
                           f"has neither ({isa.describe()}); use f32")
    return requested


def _found_tensor(port) -> FoundTensor:
    """Translate an OpenVINO model port (a PartialShape's dynamic dims become None)."""
    dtype = _OV_DTYPES.get(port.get_element_type().get_type_name())
    partial_shape = port.get_partial_shape()
    shape = () if partial_shape.rank.is_dynamic else tuple(
        dim.get_length() if dim.is_static else None for dim in partial_shape)
    return FoundTensor(port.get_any_name(), None if dtype is None else np.dtype(dtype), shape)


def _first_line(exc: Exception) -> str:
    """The line of an OpenVINO/onnx exception that says what failed (not where in C++)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if line.startswith("-- ") or "conversion rule" in line]
    return (useful or lines or [type(exc).__name__])[0].lstrip("- ")


def inlined_onnx_bytes(path: Path):
    """The file's ONNX model with its local functions inlined, serialised, and its metadata.

    Returns (bytes, metadata dict). Raises KeyreidError for a file that is not an ONNX model or
    whose precision OpenVINO cannot run (checked before the inlining work).
    """
    onnx = require("onnx", needed_for=_ONNX_FOR_OPENVINO)
    inliner = require("onnx.inliner", needed_for=_ONNX_FOR_OPENVINO)
    try:
        model = onnx.load(str(path))
    except Exception as exc:    # protobuf's DecodeError and onnx's own errors
        raise KeyreidError(f"{path}: cannot be loaded as an ONNX model (truncated or not a model?): "
                           f"{_first_line(exc)}") from exc
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    precision = metadata.get("precision")
    if precision in UNSUPPORTED_FILE_PRECISIONS:
        raise KeyreidError(f"{path}: its metadata says precision {precision}, which OpenVINO cannot run "
                           f"({UNSUPPORTED_FILE_PRECISIONS[precision]}); use the ONNX Runtime backend "
                           "(--backend onnxruntime) or the fp32 file")
    function_domains = {function.domain for function in model.functions}
    model = inliner.inline_local_functions(model)
    kept = [opset for opset in model.opset_import if opset.domain not in function_domains]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model.SerializeToString(), metadata


def part_weight_model(ov, model):
    """The keypoint op alone: keypoints, crop_size -> part_weights (a new graph, ``model`` kept)."""
    clone = model.clone()
    parameters = {parameter.get_output_tensor(0).get_any_name(): parameter for parameter in clone.get_parameters()}
    results = [result for result in clone.get_results() if OUTPUT_PART_WEIGHTS in result.input_value(0).get_names()]
    return ov.Model(results, [parameters[name] for name in PART_WEIGHT_INPUTS], "keyreid_part_weights")


def network_model(ov, model):
    """Everything but the keypoint op: frames, camera, part_weights -> embedding, part_weights
    arriving as an input (a new graph, ``model`` kept)."""
    clone = model.clone()
    part_weights_result = next(result for result in clone.get_results()
                               if OUTPUT_PART_WEIGHTS in result.input_value(0).get_names())
    produced = part_weights_result.input_value(0)
    fed = ov.opset13.parameter(produced.get_partial_shape(), produced.get_element_type(), name=OUTPUT_PART_WEIGHTS)
    fed.output(0).set_names({OUTPUT_PART_WEIGHTS})
    for target in produced.get_target_inputs():
        if target.get_node() != part_weights_result:
            target.replace_source_output(fed.output(0))
    parameters = [parameter for parameter in clone.get_parameters()
                  if parameter.get_output_tensor(0).get_any_name() not in PART_WEIGHT_INPUTS]
    results = [result for result in clone.get_results() if result != part_weights_result]
    return ov.Model(results, parameters + [fed], "keyreid_network")


def read_openvino_model(core, path: Path):
    """(OpenVINO model, keyreid metadata) of an ``.onnx`` file (functions inlined) or an IR."""
    try:
        if model_kind(path) == "openvino":
            model = openvino_ir.read_ir(core, path)
            return model, openvino_ir.read_metadata(model)
        model_bytes, metadata = inlined_onnx_bytes(path)
        return core.read_model(model=model_bytes), metadata
    except KeyreidError:
        raise
    except Exception as exc:   # OpenVINO raises RuntimeError with the frontend's report
        raise KeyreidError(f"{path}: OpenVINO cannot read this model: {_first_line(exc)}") from exc


class OpenVinoEngine(Engine):
    """An ``.onnx`` model (fp32 or fp16) or an int8 IR on OpenVINO's CPU plugin. Thread-safe: one infer
    request behind a lock (see the module docstring)."""

    backend = "openvino"

    def __init__(self, path: "str | Path", *, inference_precision: str = "f32", threads: Optional[int] = None,
                 max_batch: Optional[int] = None, num_cameras: Optional[int] = None,
                 clips_per_run: Optional[int] = None):
        """
        Args:
            path: the ``.onnx`` file (fp32 or fp16; int8 .onnx files are ONNX Runtime's) or an
                int8 IR's ``.xml`` (its ``.bin`` beside it).
            inference_precision: "f32" (exact, default), "bf16" (CPUs with bf16 arithmetic) or
                "auto" (bf16 on AMX CPUs, else f32); always pinned, never OpenVINO's default.
            threads: ``INFERENCE_NUM_THREADS``; None lets OpenVINO use every core.
            max_batch: most clips per call; None for no limit (the model's batch is dynamic).
            num_cameras: overrides the model's ``num_cameras`` metadata.
            clips_per_run: clips per inference request; a bigger batch runs in pieces of this
                size. None: whole batches.
        """
        super().__init__(path, num_cameras=num_cameras)
        self._pinned_precision = resolve_inference_precision(inference_precision)
        for name, value in (("threads", threads), ("max_batch", max_batch), ("clips_per_run", clips_per_run)):
            if value is not None and value < 1:
                raise KeyreidError(f"{name} must be at least 1, got {value}")
        self._threads = threads
        self._max_batch = max_batch
        self._clips_per_run = clips_per_run
        self._lock = threading.Lock()
        self._requests: list = []     # (infer request, its input names), run in order
        self._output_names: list = []
        self._precision = ""

    @property
    def compute_precision(self) -> str:
        """``"f32"`` or ``"bf16"``: what the compiled model reports it runs in."""
        self._active_info()
        return self._precision

    def activate_impl(self) -> EngineInfo:
        ov = require("openvino")
        properties = require("openvino.properties")
        hints = require("openvino.properties.hint")
        check_model_file(self.path)
        core = ov.Core()
        model, entries = read_openvino_model(core, self.path)
        metadata = read_metadata(entries, self.path)
        input_specs, output_specs = check_io(self.path, [_found_tensor(port) for port in model.inputs],
                                             [_found_tensor(port) for port in model.outputs], metadata)
        mismatch = int8_cpu_mismatch(metadata, cpu_isa(), self.path, exact_path=False)
        if mismatch:
            warn_once(mismatch)
        config = {hints.performance_mode: hints.PerformanceMode.LATENCY}
        if self._threads is not None:
            config[properties.inference_num_threads] = self._threads
        if self._pinned_precision == "bf16":
            stages = [(part_weight_model(ov, model), ov.Type.f32), (network_model(ov, model), ov.Type.bf16)]
        else:
            stages = [(model, ov.Type.f32)]
        requests = []
        for stage, precision in stages:
            try:     # the batch axis stays dynamic
                compiled = core.compile_model(stage, "CPU", {**config, hints.inference_precision: precision})
            except Exception as exc:
                raise KeyreidError(f"{self.path}: OpenVINO cannot compile this model: {_first_line(exc)}") from exc
            requests.append((compiled.create_infer_request(), [port.get_any_name() for port in stage.inputs]))
        self._precision = compiled.get_property(hints.inference_precision).get_type_name()
        self._requests = requests
        self._output_names = [spec.name for spec in output_specs]
        return EngineInfo(input_specs, output_specs, self._max_batch, metadata.num_cameras, metadata)

    def infer_impl(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return run_in_pieces(self._run, feed, self._clips_per_run)

    def _run(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        values = dict(feed)
        with self._lock:
            for request, input_names in self._requests:
                # share_outputs=False: the results are copies, not views of the request's output
                # tensors, which the next call overwrites.
                results = request.infer({name: values[name] for name in input_names}, share_outputs=False)
                values.update((port.get_any_name(), value) for port, value in results.items())
        return {name: values[name] for name in self._output_names}

    def deactivate_impl(self) -> None:
        with self._lock:
            self._requests = []
            self._output_names = []


INFERENCE_PRECISION = EngineOption(
    "--inference-precision", "inference_precision", "OpenVINO's compute precision, always pinned: f32 "
    "(default, exact), bf16 (CPUs with AMX or AVX-512 BF16; close to f32, not equal), auto (bf16 on AMX "
    "CPUs, else f32); with --backend auto it selects OpenVINO", choices=INFERENCE_PRECISIONS, metavar="P")

BACKEND = Backend(
    name="openvino", kinds=("onnx", "openvino"), engine_class=OpenVinoEngine,
    options=(THREADS, CLIPS_PER_RUN, INFERENCE_PRECISION),
    summary="OpenVINO on the CPU, fp32 and fp16 .onnx files and int8 .xml IR (to_openvino.py)",
    device="the CPU")
