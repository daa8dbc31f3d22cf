"""ONNX -> serialized TensorRT engine (``.plan``) and its sidecar, for TensorRT 10 and 11.

Precision comes from the ONNX file (``to_onnx.py --precision fp32|fp16``), so the network is
built strongly typed: TensorRT 11 has no precision builder flags and no INT8 calibrators, and
TensorRT 10 builds the same network the same way. No ``EXPLICIT_BATCH`` (the default since 10,
removed in 11). One optimisation profile spans the batch axis of every input.

The ``keyreid::KeypointPartPool`` node is either the AOT plugin (``plugin="aot"``, TensorRT >= 10.9:
the fused CUDA kernel's PTX goes into the plan, which then runs with no Python and no plugin
library) or its ONNX local function of standard ops (``plugin="none"``, any TensorRT 10, e.g.
JetPack 6's 10.3).

Every TensorRT name used here is checked against the real bindings of TensorRT 10 and 11 by
tests/test_tensorrt_bindings.py; TensorRT objects keep the variable names that test expects
(builder, network, parser, config, profile, timing_cache, ...).
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from keyreid.contract import HEATMAP_MODES, INPUTS, OP_DOMAIN, OP_NAME
from keyreid.errors import KeyreidError
from keyreid.model_metadata import read_metadata
from keyreid.files import write_bytes
from keyreid.lazy import require
from keyreid.runtime.backends.tensorrt import cuda_call, device_facts
from keyreid.plan_sidecar import PlanSidecar, file_sha256, sidecar_path, write_sidecar

MIN_TENSORRT_MAJOR = 10
AOT_PLUGIN_MIN_VERSION = (10, 9)      # tensorrt.plugin with aot_impl
PLUGIN_MODES = ("aot", "none")
TENSORRT_PRECISIONS = ("fp32", "fp16")   # int8 ONNX files use ONNX Runtime's CPU-only quantised ops
DEFAULT_WORKSPACE_MIB = 4096
# Building needs the export extra too (onnx reads the file's metadata and functions).
BUILD_EXTRAS = ("gpu,export", "building TensorRT engines")


@dataclass(frozen=True)
class BuildOptions:
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    plugin: str = "aot"
    timing_cache: Optional[Path] = None

    def problems(self) -> list:
        problems = []
        if self.min_batch < 1:
            problems.append(f"--min-batch must be at least 1, got {self.min_batch}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            problems.append(f"batch sizes must satisfy min <= opt <= max, got {self.min_batch}, "
                            f"{self.opt_batch}, {self.max_batch}")
        if self.workspace_mib < 1:
            problems.append(f"--workspace must be at least 1 MiB, got {self.workspace_mib}")
        if self.plugin not in PLUGIN_MODES:
            problems.append(f"--plugin must be one of {', '.join(PLUGIN_MODES)}, got {self.plugin!r}")
        return problems


def profile_shapes(options: BuildOptions) -> Dict[str, Tuple[Tuple[int, ...], ...]]:
    """input name -> (min, opt, max) shapes: the contract's shapes with N at each batch size."""
    return {spec.name: tuple((batch,) + tuple(spec.shape[1:])
                             for batch in (options.min_batch, options.opt_batch, options.max_batch))
            for spec in INPUTS}


def onnx_metadata(onnx_path: Path) -> Dict[str, str]:
    """The ONNX file's metadata_props (checked against keyreid/model_metadata.py), for the sidecar."""
    onnx = require("onnx", needed_for=BUILD_EXTRAS)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:   # protobuf raises its own DecodeError types
        raise KeyreidError(f"{onnx_path}: cannot be read as an ONNX model: {exc}") from exc
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    precision = read_metadata(metadata, onnx_path).precision
    if precision == "int8":
        raise KeyreidError(f"{onnx_path} is an int8 file: its quantised operators are ONNX Runtime CPU "
                           "kernels, so it cannot become a TensorRT engine. Export the checkpoint with "
                           "to_onnx.py --precision fp16 (or fp32) for TensorRT; run the int8 file on a CPU "
                           "(infer.py --engine FILE)")
    if precision not in TENSORRT_PRECISIONS:
        raise KeyreidError(f"{onnx_path}: precision {precision!r} cannot be built by TensorRT; export "
                           f"with to_onnx.py --precision fp32 or fp16")
    return metadata


def version_tuple(version: str) -> Tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int(minor)


def _tensorrt():
    trt = require("tensorrt", needed_for=BUILD_EXTRAS)
    if version_tuple(trt.__version__)[0] < MIN_TENSORRT_MAJOR:
        raise KeyreidError(f"TensorRT {trt.__version__} is too old: keyreid builds with TensorRT "
                           f"{MIN_TENSORRT_MAJOR} or newer")
    return trt


def _gpu_facts(trt):
    """This GPU and TensorRT, or one sentence saying there is no GPU."""
    cudart = require("cuda.bindings.runtime", needed_for=BUILD_EXTRAS)
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or count < 1:
        raise KeyreidError("no CUDA GPU is visible: TensorRT builds an engine for the GPU it runs on, "
                           "so build on the target device")
    runtime_version = cuda_call(cudart.cudaRuntimeGetVersion())
    return device_facts(trt, cudart), f"{runtime_version // 1000}.{runtime_version % 1000 // 10}"


def _register_aot_plugin(trt, compute_capability: Tuple[int, int]) -> None:
    if version_tuple(trt.__version__) < AOT_PLUGIN_MIN_VERSION:
        raise KeyreidError(f"TensorRT {trt.__version__} has no AOT Python plugins (they need "
                           f"{'.'.join(map(str, AOT_PLUGIN_MIN_VERSION))} or newer); build with --plugin none "
                           "to use the op's ONNX function")
    from keyreid.kernels import cuda_build
    from keyreid.kernels.trt_plugin import check_kernel_arguments, register_plugin
    # Compile and check the kernel now: inside TensorRT's aot_impl callback a compiler error
    # would surface as a traceback in TensorRT's log and a bare "could not build". The PTX is
    # cached, so the callback's own compile_ptx is a lookup.
    ptx = cuda_build.compile_ptx(compute_capability)
    for mode in HEATMAP_MODES:
        check_kernel_arguments(ptx, cuda_build.kernel_name(mode))
    register_plugin(importlib.import_module("tensorrt.plugin"), compute_capability)


def _progress_monitor(trt, say: Callable[[str], None]):
    """Prints each top-level build phase, so a many-minute build shows it is alive."""

    class PhasePrinter(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                say(f"      {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True      # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return PhasePrinter()


def _model_without_op_function(onnx_path: Path) -> bytes:
    """The ONNX file with the KeypointPartPool local function dropped, so a parser that would
    prefer the function falls back to the plugin (found by the node's plugin_namespace)."""
    onnx = require("onnx", needed_for=BUILD_EXTRAS)
    model = onnx.load(str(onnx_path))
    kept = [function for function in model.functions if (function.domain, function.name) != (OP_DOMAIN, OP_NAME)]
    del model.functions[:]
    model.functions.extend(kept)
    return model.SerializeToString()


def _parse(trt, network, logger, onnx_path: Path, plugin: str):
    parser = trt.OnnxParser(network, logger)
    if plugin == "aot" and hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
        parsed = parser.parse_from_file(str(onnx_path))
    elif plugin == "aot":
        # Parsers without the flag import a node's local function before trying plugins.
        parsed = parser.parse(_model_without_op_function(onnx_path), str(onnx_path))
    else:
        parsed = parser.parse_from_file(str(onnx_path))
    if not parsed:
        errors = [str(parser.get_error(index)) for index in range(parser.num_errors)]
        raise KeyreidError(f"{onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(errors or ["no reason given"]))
    layers = (network.get_layer(index) for index in range(network.num_layers))
    if plugin == "aot" and not any(layer.type == trt.LayerType.PLUGIN_V3 for layer in layers):
        raise KeyreidError(f"{onnx_path}: TensorRT's parser built the op from its ONNX function, not the "
                           "AOT plugin; rebuild with --plugin none, or use TensorRT 10.9 or newer")
    return parser


def build_plan(onnx_path: Path, plan_path: Path, options: BuildOptions,
               step: Callable[[str], None] = lambda message: None,
               say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> PlanSidecar:
    """Build ``onnx_path`` into ``plan_path`` and its sidecar, both written whole."""
    problems = options.problems()
    if problems:
        raise KeyreidError("; ".join(problems))
    # The file first: an int8 or foreign file is refused for what it is, before asking for TensorRT.
    step(f"reading {onnx_path}")
    metadata = onnx_metadata(onnx_path)
    trt = _tensorrt()
    here, cuda_version = _gpu_facts(trt)
    onnx_sha256 = file_sha256(onnx_path)
    if options.plugin == "aot":
        _register_aot_plugin(trt, here.compute_capability)

    step(f"parsing the ONNX graph (plugin: {options.plugin})")
    logger = trt.Logger(trt.Logger.WARNING)
    if not trt.init_libnvinfer_plugins(logger, ""):
        raise KeyreidError("TensorRT could not register its built-in plugins")
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = _parse(trt, network, logger, onnx_path, options.plugin)   # owns the weights: alive until built

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.progress_monitor = _progress_monitor(trt, say)
    profile = builder.create_optimization_profile()
    for name, (smallest, typical, largest) in profile_shapes(options).items():
        profile.set_shape(name, smallest, typical, largest)
    if config.add_optimization_profile(profile) < 0:
        raise KeyreidError("TensorRT rejected the optimisation profile")
    cache_bytes = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    if timing_cache is None or not config.set_timing_cache(timing_cache, ignore_mismatch=True):
        raise KeyreidError(f"TensorRT could not use the timing cache {options.timing_cache}")

    step(f"building the engine for {here.device_name} (minutes)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise KeyreidError("TensorRT could not build the engine (its log above says why)")

    step(f"writing {plan_path}")
    sidecar = PlanSidecar(
        tensorrt_version=here.tensorrt_version, cuda_version=cuda_version, device_name=here.device_name,
        compute_capability=here.compute_capability, onnx_sha256=onnx_sha256, onnx_metadata=metadata,
        plugin=options.plugin,
        build={"min_batch": options.min_batch, "opt_batch": options.opt_batch, "max_batch": options.max_batch,
               "workspace_mib": options.workspace_mib, "strongly_typed": True,
               "timing_cache": None if options.timing_cache is None else str(options.timing_cache),
               "onnx_file": onnx_path.name})
    # A stale sidecar must not describe the new plan, even if writing is interrupted half way.
    sidecar_path(plan_path).unlink(missing_ok=True)
    write_bytes(plan_path, bytes(serialized))
    write_sidecar(plan_path, sidecar)
    if options.timing_cache is not None:
        timing_cache = config.get_timing_cache()       # now holding this build's timings
        write_bytes(options.timing_cache, bytes(timing_cache.serialize()))
    return sidecar
