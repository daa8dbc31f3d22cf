"""What an exported model file records about itself: one typed schema, written by export and read
by every backend through ``read_metadata`` (docs/contract.md §7).

Each format stores the same string keys in its own place: an ONNX file's ``metadata_props``, an
OpenVINO IR's ``rt_info`` section ``keyreid``, a TensorRT plan's sidecar (``onnx_metadata``), a
Triton model's configuration ``parameters``. ``read_metadata`` turns them into a frozen
``ModelMetadata`` or raises one KeyreidError naming the file and listing every problem: a missing
key, a key the schema does not know, a value of the wrong type, an unknown heatmap mode. Nothing
falls back to a default silently.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Dict, Mapping, Optional

from keyreid.contract import NUM_KEYPOINTS, NUM_PARTS, PRECISIONS, HeatmapMode
from keyreid.errors import KeyreidError


@dataclass(frozen=True)
class ModelMetadata:
    # --- what the model computes; the runtime's clip length, frame size and checks follow these
    heatmap_mode: HeatmapMode
    precision: str                 # of the stored weights: fp32, fp16, int8
    num_cameras: int               # valid camera indices 0..num_cameras-1 (and -1)
    embed_dim: int                 # model width D
    embedding_dim: int             # D * (1 + NUM_PARTS * clip_frames)
    clip_frames: int               # T: frames per clip
    num_keypoints: int             # COCO-17
    image_height: int              # frames are fed resized to image_height x image_width
    image_width: int
    # --- provenance, for people auditing a file
    keyreid_version: str
    opset: int
    checkpoint_sha256: str
    checkpoint_name: str
    # --- int8 files (keyreid/int8_targets.py; OpenVINO's NNCF IR adds its tool and calibration)
    int8_target_cpu: Optional[str] = None
    int8_activation_bits: Optional[int] = None
    int8_tool: Optional[str] = None
    int8_recipe: Optional[str] = None
    int8_calibration: Optional[str] = None
    # --- a TensorRT plan served by Triton (export/triton_repository.py adds the build's facts)
    tensorrt_version: Optional[str] = None
    plugin: Optional[str] = None
    device_name: Optional[str] = None
    compute_capability: Optional[str] = None

    def to_strings(self) -> Dict[str, str]:
        """The string key -> value pairs every format stores (None fields are left out)."""
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                values[field.name] = value.value if isinstance(value, HeatmapMode) else str(value)
        return values

    def replace(self, **changes) -> "ModelMetadata":
        return dataclasses.replace(self, **changes)


_REQUIRED = tuple(field.name for field in fields(ModelMetadata) if field.default is dataclasses.MISSING)
_INTEGERS = frozenset(field.name for field in fields(ModelMetadata) if field.type in ("int", "Optional[int]"))


SCHEMA_KEYS = frozenset(field.name for field in fields(ModelMetadata))


def _problems_of_value(key: str, text: str) -> Optional[str]:
    if key == "heatmap_mode" and text not in HeatmapMode._value2member_map_:
        return f"heatmap_mode {text!r} is not one of {', '.join(mode.value for mode in HeatmapMode)}"
    if key == "precision" and text not in PRECISIONS:
        return f"precision {text!r} is not one of {', '.join(PRECISIONS)}"
    if key in _INTEGERS:
        try:
            value = int(text)
        except ValueError:
            return f"{key}={text!r} is not an integer"
        if value < 1:
            return f"{key}={text!r} is not a positive integer"
    return None


def read_metadata(entries: Mapping[str, str], source: object) -> ModelMetadata:
    """The checked metadata of ``source`` (a file or address, for the message) from its string
    pairs; one KeyreidError listing every problem."""
    problems = [f"missing key '{key}'" for key in _REQUIRED if key not in entries]
    problems += [f"unknown key '{key}'" for key in entries if key not in SCHEMA_KEYS]
    problems += [problem for key, text in entries.items() if key in SCHEMA_KEYS
                 for problem in [_problems_of_value(key, str(text))] if problem]
    if not problems:
        values = {key: (int(text) if key in _INTEGERS else str(text)) for key, text in entries.items()}
        values["heatmap_mode"] = HeatmapMode(values["heatmap_mode"])
        metadata = ModelMetadata(**values)
        expected = metadata.embed_dim * (1 + NUM_PARTS * metadata.clip_frames)
        if metadata.embedding_dim != expected:
            problems.append(f"embedding_dim {metadata.embedding_dim} is not embed_dim * (1 + {NUM_PARTS} parts * "
                            f"clip_frames) = {expected}")
        if metadata.num_keypoints != NUM_KEYPOINTS:
            problems.append(f"num_keypoints {metadata.num_keypoints}: keyreid reads COCO's {NUM_KEYPOINTS} joints")
    if problems:
        raise KeyreidError(f"{source}: its keyreid metadata does not fit the schema (docs/contract.md §7):\n  - "
                           + "\n  - ".join(problems)
                           + "\n  re-export the file with this keyreid version (python export/to_onnx.py)")
    return metadata
