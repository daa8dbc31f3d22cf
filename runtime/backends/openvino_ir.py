"""OpenVINO IR files (``model.xml`` + ``model.bin``): where the weights are, and the keyreid
metadata the IR carries.

An ONNX file keeps keyreid's metadata in ``metadata_props``; an IR keeps the same keys, as
strings, in the model's ``rt_info`` under one section, ``keyreid``, which ``ov.save_model``
writes into the .xml and ``Core.read_model`` reads back. The exporter (export/to_openvino.py)
writes them, the engine (runtime/backends/openvino.py) reads them: this module is the one place
that knows the section's name. It imports neither torch nor NNCF.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping

from keyreid.errors import KeyreidError
from keyreid.runtime.backends.formats import OPENVINO_WEIGHTS_SUFFIX

RT_INFO_SECTION = "keyreid"


def weights_path(xml_path: Path) -> Path:
    """The .bin OpenVINO reads for ``xml_path``: same folder, same stem."""
    return Path(xml_path).with_suffix(OPENVINO_WEIGHTS_SUFFIX)


def check_weights_file(xml_path: Path) -> Path:
    """The IR's .bin, or one KeyreidError saying it is missing (OpenVINO's own message names
    neither file nor cause)."""
    weights = weights_path(xml_path)
    if not weights.is_file():
        raise KeyreidError(f"{xml_path}: its weights file {weights.name} is missing; an OpenVINO IR is the .xml "
                           f"together with the .bin of the same name beside it (copy or move both)")
    return weights


def write_metadata(model, metadata: Mapping[str, str]) -> None:
    """Store ``metadata`` (string keys and values) in ``model``'s rt_info section ``keyreid``."""
    for key, value in metadata.items():
        model.set_rt_info(str(value), [RT_INFO_SECTION, key])


def read_metadata(model) -> Dict[str, str]:
    """The ``keyreid`` rt_info section as a dict of strings ({} when the IR has none)."""
    if not model.has_rt_info([RT_INFO_SECTION]):
        return {}
    section = model.get_rt_info([RT_INFO_SECTION]).astype(dict)
    return {key: value.astype(str) for key, value in section.items()}


def read_ir(core, xml_path: Path):
    """``Core.read_model`` of the .xml with its .bin, after checking the .bin is there."""
    weights = check_weights_file(xml_path)
    return core.read_model(model=str(xml_path), weights=str(weights))
