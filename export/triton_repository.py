"""A Triton Inference Server model repository entry for an exported model (ONNX or TensorRT plan).

    DIR/NAME/config.pbtxt           platform, batching, the I/O of docs/contract.md §6, warm-up, parameters
    DIR/NAME/1/model.onnx           the file as exported (or model.plan, with its .json sidecar)
    DIR/NAME/warmup/crop_size       the one warm-up input that cannot be zeros (a 128x256 crop)

The model's description (heatmap mode, cameras, embedding length, precision, ...) goes into the
configuration's string ``parameters`` under the ONNX metadata keys, where
:class:`~keyreid.runtime.backends.triton.TritonEngine` reads it back on connect. The configuration
text is validated by parsing it with the ``ModelConfig`` protobuf that ``tritonclient`` ships,
then checked against the contract, before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import numpy as np

from keyreid import __version__
from keyreid.contract import CLIP_FRAMES, IMAGE_HEIGHT, IMAGE_WIDTH, INPUTS, TensorSpec, output_specs
from keyreid.errors import KeyreidError
from keyreid.files import copy_file, write_bytes
from keyreid.plan_sidecar import read_sidecar, sidecar_path
from keyreid.lazy import require
from keyreid.runtime.backends.formats import TENSORRT_SUFFIXES, model_kind
from keyreid.triton import (DEFAULT_MAX_BATCH, DEFAULT_QUEUE_DELAY_US, config_datatype,
                            preferred_batch_sizes, wire_dims)

PLATFORMS = {"onnx": "onnxruntime_onnx", "plan": "tensorrt_plan"}
MODEL_FILES = {"onnx": "model.onnx", "plan": "model.plan"}
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
WARMUP_CROP_FILE = "crop_size"   # under DIR/NAME/warmup/, as Triton's input_data_file expects


@dataclass(frozen=True)
class ModelDescription:
    """What the repository needs to know about one exported model file."""
    path: Path
    kind: str                                  # "onnx" or "plan"
    output_specs: Sequence[TensorSpec]
    parameters: Mapping[str, str]              # published as config parameters
    plan_max_batch: Optional[int] = None       # a plan's build profile caps the batch
    plan_opt_batch: Optional[int] = None
    notes: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class RepositoryOptions:
    name: str = "keyreid"
    max_batch: Optional[int] = None            # None: the plan's build maximum, else DEFAULT_MAX_BATCH
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    instances: int = 1
    kind: Optional[str] = None                 # "gpu" or "cpu"; None: the model's (instance_kind)
    version: int = 1


# --- reading the model -----------------------------------------------------------------------
def describe_onnx(path: Path) -> ModelDescription:
    """Open the ONNX model on ONNX Runtime's CPU provider: this checks its I/O against the
    contract and reads its metadata (cameras, heatmap mode, embedding length)."""
    from keyreid.runtime.backends.onnxruntime import OrtEngine

    with OrtEngine(path, providers=["CPUExecutionProvider"]) as engine:
        return ModelDescription(path, "onnx", engine.output_specs, engine.metadata.to_strings())


def describe_plan(path: Path) -> ModelDescription:
    """A TensorRT plan is described by its sidecar (reading the plan itself needs TensorRT and a GPU)."""
    sidecar = read_sidecar(path)
    if sidecar.build["min_batch"] > 1:      # Triton sends any batch from 1 up and does not pad
        raise KeyreidError(f"{path}: built with --min-batch {sidecar.build['min_batch']}, but Triton sends "
                           "batches from 1 clip up; rebuild the plan with --min-batch 1 to serve it")
    capability = ".".join(str(part) for part in sidecar.compute_capability)
    metadata = sidecar.metadata
    parameters = metadata.replace(tensorrt_version=sidecar.tensorrt_version, plugin=sidecar.plugin,
                                  device_name=sidecar.device_name, compute_capability=capability).to_strings()
    plugin_note = ("The KeypointPartPool plugin is compiled into the plan (AOT): the server needs no "
                   "plugin library and no LD_PRELOAD." if sidecar.plugin == "aot" else
                   "The plan holds no plugin (KeypointPartPool ran as standard layers): the server "
                   "needs no plugin library.")
    version_note = (f"Built with TensorRT {sidecar.tensorrt_version} for {sidecar.device_name} "
                    f"(compute capability {capability}): serve it from a Triton release that carries "
                    f"TensorRT {sidecar.tensorrt_version} on the same GPU architecture; plans do not "
                    "move across TensorRT versions or architectures.")
    return ModelDescription(path, "plan", output_specs(metadata.embed_dim, metadata.clip_frames), parameters,
                            plan_max_batch=sidecar.build["max_batch"],
                            plan_opt_batch=sidecar.build["opt_batch"], notes=[plugin_note, version_note])


def describe_model(path: Path) -> ModelDescription:
    kind = model_kind(path)
    if not path.is_file():
        raise KeyreidError(f"{path}: model file does not exist")
    if kind == "onnx":
        return describe_onnx(path)
    if kind == "tensorrt":
        return describe_plan(path)
    raise KeyreidError(f"{path}: expected an .onnx model or a TensorRT engine ({', '.join(TENSORRT_SUFFIXES)})")


# --- the configuration -----------------------------------------------------------------------
def _quoted(text: str) -> str:
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(text, as_utf8=True) + '"'


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(dim) for dim in dims) + " ]"


def _tensor_entry(spec: TensorSpec) -> str:
    entry = f"name: {_quoted(spec.name)} data_type: {config_datatype(spec.dtype)} dims: {_dims(wire_dims(spec.shape))}"
    if len(spec.shape) == 1:     # per-clip scalar: [N, 1] on the wire, [N] for the model
        entry += " reshape: { shape: [ ] }"
    return "  { " + entry + " }"


def _warmup_entry(spec: TensorSpec) -> str:
    source = f"input_data_file: {_quoted(WARMUP_CROP_FILE)}" if spec.name == "crop_size" else "zero_data: true"
    return (f"    inputs {{ key: {_quoted(spec.name)} value {{ data_type: {config_datatype(spec.dtype)} "
            f"dims: {_dims(wire_dims(spec.shape))} {source} }} }}")


def instance_kind(description: ModelDescription, requested: Optional[str]) -> str:
    """Where the model's instances run: ``requested`` ("gpu", "cpu"), checked against the model,
    or for None the model's own: CPU for an int8 ONNX file (its quantised operators are ONNX
    Runtime CPU kernels), else GPU."""
    if description.kind == "plan":
        if requested == "cpu":
            raise KeyreidError(f"{description.path}: a TensorRT plan runs on a GPU only; use --kind gpu")
        return "gpu"
    if description.parameters.get("precision") == "int8":
        if requested == "gpu":
            raise KeyreidError(f"{description.path} is an int8 file: its quantised operators are ONNX Runtime "
                               "CPU kernels, so it is served on CPUs; use --kind cpu (the default for int8 "
                               "files), or export fp16 or fp32 for GPUs")
        return "cpu"
    return requested or "gpu"


def resolve_max_batch(description: ModelDescription, options: RepositoryOptions) -> int:
    if description.plan_max_batch is None:
        return options.max_batch or DEFAULT_MAX_BATCH
    if options.max_batch is not None and options.max_batch > description.plan_max_batch:
        raise KeyreidError(f"--max-batch {options.max_batch} is above the {description.plan_max_batch} "
                           f"clips {description.path.name} was built for; rebuild the plan or lower it")
    return options.max_batch or description.plan_max_batch


def render_config(description: ModelDescription, options: RepositoryOptions) -> str:
    """The config.pbtxt text: a comment header with the notes, then the configuration."""
    max_batch = resolve_max_batch(description, options)
    preferred = preferred_batch_sizes(max_batch, description.plan_opt_batch)
    header = [f"keyreid {__version__}: Triton configuration for {description.path.name} "
              "(written by export/to_triton.py).",
              "Inputs and outputs follow keyreid's I/O contract; the batch axis N is implicit."]
    header += description.notes
    lines = ["# " + line for line in header] + [
        f"name: {_quoted(options.name)}",
        f"platform: {_quoted(PLATFORMS[description.kind])}",
        f"max_batch_size: {max_batch}",
        "input [", ",\n".join(_tensor_entry(spec) for spec in INPUTS), "]",
        "output [", ",\n".join(_tensor_entry(spec) for spec in description.output_specs), "]",
        "dynamic_batching {",
        f"  preferred_batch_size: {_dims(preferred)}",
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {options.instances} "
        f"kind: {INSTANCE_KINDS[instance_kind(description, options.kind)]} }} ]",
        "model_warmup [", "  {", '    name: "one_clip"', "    batch_size: 1",
        *[_warmup_entry(spec) for spec in INPUTS], "  }", "]",
    ]
    lines += [f"parameters {{ key: {_quoted(key)} value {{ string_value: {_quoted(value)} }} }}"
              for key, value in sorted(description.parameters.items())]
    return "\n".join(lines) + "\n"


def parse_config(text: str, source: object = "config.pbtxt"):
    """Parse config.pbtxt text into Triton's ``ModelConfig`` protobuf (from tritonclient)."""
    model_config_pb2 = require("tritonclient.grpc").model_config_pb2
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise KeyreidError(f"{source}: not a valid Triton model configuration: {exc}") from exc


def validate_config(text: str, expected_outputs: Sequence[TensorSpec], source: object = "config.pbtxt"):
    """Parse ``text`` and list every way it differs from what a keyreid model needs."""
    config = parse_config(text, source)
    type_name = require("tritonclient.grpc").model_config_pb2.DataType.Name
    problems = []
    if config.platform not in PLATFORMS.values():
        problems.append(f"platform {config.platform!r} is not one of {', '.join(PLATFORMS.values())}")
    if config.max_batch_size < 1:
        problems.append("max_batch_size must be at least 1 (the batch axis N is implicit)")
    for kind, found, expected in (("input", config.input, INPUTS), ("output", config.output, expected_outputs)):
        found_by_name = {tensor.name: tensor for tensor in found}
        if set(found_by_name) != {spec.name for spec in expected}:
            problems.append(f"{kind}s are {sorted(found_by_name)}; the contract has {sorted(s.name for s in expected)}")
            continue
        for spec in expected:
            tensor = found_by_name[spec.name]
            if type_name(tensor.data_type) != config_datatype(spec.dtype):
                problems.append(f"{kind} '{spec.name}' has {type_name(tensor.data_type)}; "
                                f"the contract needs {config_datatype(spec.dtype)}")
            if tuple(tensor.dims) != wire_dims(spec.shape):
                problems.append(f"{kind} '{spec.name}' has dims {list(tensor.dims)}; "
                                f"the contract needs {list(wire_dims(spec.shape))}")
            model_dims = tuple(tensor.reshape.shape) if tensor.HasField("reshape") else tuple(tensor.dims)
            if model_dims != tuple(spec.shape[1:]):
                problems.append(f"{kind} '{spec.name}' reaches the model as {list(model_dims)}; "
                                f"the contract needs {list(spec.shape[1:])}")
    batching = config.dynamic_batching
    if not config.HasField("dynamic_batching"):
        problems.append("dynamic batching is off")
    elif any(not 1 <= size <= config.max_batch_size for size in batching.preferred_batch_size):
        problems.append(f"preferred batch sizes {list(batching.preferred_batch_size)} are not within "
                        f"1..{config.max_batch_size}")
    if problems:
        raise KeyreidError(f"{source}: the Triton configuration does not fit the model:\n  - "
                           + "\n  - ".join(problems))
    return config


# --- writing ----------------------------------------------------------------------------------
def warmup_crop_size() -> bytes:
    """A [4, 2] float32 crop size of 128x256 per frame: zeros would mean an empty crop."""
    return np.tile(np.array([IMAGE_WIDTH, IMAGE_HEIGHT], np.float32), (CLIP_FRAMES, 1)).tobytes()


def write_repository(description: ModelDescription, repository: Path, options: RepositoryOptions,
                     step=lambda message: None) -> Path:
    """Write DIR/NAME/{config.pbtxt, VERSION/model.*, warmup/} and return DIR/NAME."""
    instance_kind(description, options.kind)
    text = render_config(description, options)
    validate_config(text, description.output_specs)
    model_dir = repository / options.name
    model_file = model_dir / str(options.version) / MODEL_FILES[description.kind]
    if model_file.exists() and model_file.resolve() == description.path.resolve():
        raise KeyreidError(f"{description.path} is already the repository's model file; "
                           "export it somewhere else first, or give another --repository")
    try:
        model_file.parent.mkdir(parents=True, exist_ok=True)
        (model_dir / "warmup").mkdir(exist_ok=True)
    except OSError as exc:
        raise KeyreidError(f"cannot create the repository folders under {repository}: {exc.strerror or exc}") from exc
    step(f"copying {description.path.name} to {model_file}")
    copy_file(description.path, model_file)
    if description.kind == "plan":
        copy_file(sidecar_path(description.path), sidecar_path(model_file))
    write_bytes(model_dir / "warmup" / WARMUP_CROP_FILE, warmup_crop_size())
    write_bytes(model_dir / "config.pbtxt", text.encode("utf-8"))
    return model_dir
