"""The JSON sidecar of a TensorRT plan: what the plan was built from, on what, and how.

A serialized TensorRT engine runs only on the GPU model and TensorRT version that built it, and
carries none of the ONNX file's metadata (number of cameras, heatmap mode, precision). The
builder (``export/to_tensorrt.py``) writes ``model.plan.json`` beside ``model.plan``; the runtime
reads it on load, so a plan from another device gets one sentence instead of a crash, and the
camera range check has its upper bound (an out-of-range ``Gather`` index in TensorRT gives
garbage, not an error).

Reading needs neither tensorrt nor a GPU: the facts of the device at hand are passed in, so the
Triton model repository and the tests use the same checks.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from keyreid.errors import KeyreidError
from keyreid.model_metadata import ModelMetadata, read_metadata
from keyreid.files import write_json

FORMAT = "keyreid-plan-sidecar"
FORMAT_VERSION = 1
PLUGIN_CHOICES = ("aot", "none")
SIDECAR_SUFFIX = ".json"
REBUILD = "rebuild this engine on this device"
BATCH_KEYS = ("min_batch", "opt_batch", "max_batch")   # the optimisation profile
# A sidecar is a few kilobytes; anything far bigger is not one.
MAX_SIDECAR_BYTES = 1 << 20


def sidecar_path(plan_path: "str | Path") -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + SIDECAR_SUFFIX)


def file_sha256(path: "str | Path") -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class DeviceFacts:
    """What a plan depends on: the GPU and the TensorRT that build or run it."""
    device_name: str
    compute_capability: Tuple[int, int]
    tensorrt_version: str


@dataclass(frozen=True)
class PlanSidecar:
    tensorrt_version: str
    cuda_version: Optional[str]
    device_name: str
    compute_capability: Tuple[int, int]
    onnx_sha256: str
    onnx_metadata: Dict[str, str]
    plugin: str
    build: Dict[str, object]
    created_utc: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def device(self) -> DeviceFacts:
        return DeviceFacts(self.device_name, tuple(self.compute_capability), self.tensorrt_version)

    @property
    def metadata(self) -> ModelMetadata:
        """The ONNX file's metadata, typed (validated when the sidecar is read)."""
        return read_metadata(self.onnx_metadata, "the plan sidecar")

    def to_json(self) -> dict:
        content = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        content["compute_capability"] = list(self.compute_capability)
        return content


def write_sidecar(plan_path: "str | Path", sidecar: PlanSidecar) -> Path:
    """Write ``plan_path``'s sidecar whole (temporary file, then rename)."""
    return write_json(sidecar_path(plan_path), sidecar.to_json())


def _problems(content: Mapping[str, object]) -> List[str]:
    """Every way ``content`` is not a valid sidecar, listed at once."""
    problems = []
    if content.get("format") != FORMAT:
        problems.append(f"format is {content.get('format')!r}, not {FORMAT!r}")
    if content.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version is {content.get('format_version')!r}; this keyreid reads "
                        f"version {FORMAT_VERSION}")
    for key in ("tensorrt_version", "device_name", "onnx_sha256", "created_utc"):
        if not isinstance(content.get(key), str) or not content.get(key):
            problems.append(f"'{key}' must be a non-empty string")
    if content.get("cuda_version") is not None and not isinstance(content.get("cuda_version"), str):
        problems.append("'cuda_version' must be a string or null")
    capability = content.get("compute_capability")
    if not (isinstance(capability, list) and len(capability) == 2
            and all(isinstance(part, int) and part >= 0 for part in capability)):
        problems.append("'compute_capability' must be [major, minor]")
    if content.get("plugin") not in PLUGIN_CHOICES:
        problems.append(f"'plugin' must be one of {', '.join(PLUGIN_CHOICES)}")
    build = content.get("build")
    if not isinstance(build, dict):
        problems.append("'build' must be an object")
    elif not all(isinstance(build.get(key), int) and build[key] >= 1 for key in BATCH_KEYS) \
            or not build["min_batch"] <= build["opt_batch"] <= build["max_batch"]:
        problems.append(f"'build' must give {', '.join(BATCH_KEYS)} as whole numbers, 1 <= min <= opt <= max")
    metadata = content.get("onnx_metadata")
    if not (isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())):
        problems.append("'onnx_metadata' must be an object of strings")
        return problems
    try:
        read_metadata(metadata, "onnx_metadata")
    except KeyreidError as exc:
        problems.append(str(exc))
    return problems


def read_sidecar(plan_path: "str | Path") -> PlanSidecar:
    """Read and validate ``plan_path``'s sidecar; KeyreidError names the file and every problem."""
    path = sidecar_path(plan_path)
    if not path.is_file():
        raise KeyreidError(f"{plan_path}: its sidecar {path.name} is missing; a plan needs the sidecar "
                           "export/to_tensorrt.py writes beside it (rebuild the plan with it)")
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise KeyreidError(f"{path}: {path.stat().st_size} bytes is too big for a plan sidecar")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyreidError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyreidError(f"{path}: not a plan sidecar (not JSON: {exc})") from exc
    problems = _problems(content) if isinstance(content, dict) else ["the top level is not a JSON object"]
    if problems:
        raise KeyreidError(f"{path}: not a valid plan sidecar: " + "; ".join(problems))
    return PlanSidecar(content["tensorrt_version"], content["cuda_version"], content["device_name"],
                       tuple(content["compute_capability"]), content["onnx_sha256"],
                       dict(content["onnx_metadata"]), content["plugin"], dict(content["build"]),
                       content["created_utc"])


def _describe(device: DeviceFacts) -> str:
    major, minor = device.compute_capability
    return f"{device.device_name} (compute capability {major}.{minor}) with TensorRT {device.tensorrt_version}"


def check_device(plan_path: "str | Path", sidecar: PlanSidecar, here: DeviceFacts) -> None:
    """Refuse, in one sentence, a plan built for another GPU or TensorRT version."""
    if sidecar.device != here:
        raise KeyreidError(f"{plan_path}: {REBUILD}: it was built for {_describe(sidecar.device)}, "
                           f"this is {_describe(here)}")


def check_built_from(plan_path: "str | Path", sidecar: PlanSidecar, onnx_path: "str | Path") -> None:
    """Refuse, in one sentence, a plan that was not built from ``onnx_path``."""
    onnx_sha256 = file_sha256(onnx_path)
    if onnx_sha256 != sidecar.onnx_sha256:
        raise KeyreidError(f"{plan_path}: {REBUILD}: it was built from an ONNX file with sha256 "
                           f"{sidecar.onnx_sha256[:12]}..., not from {onnx_path} ({onnx_sha256[:12]}...)")
