"""A file of reference results: sample clips and what the checkpoint's reference model computes
on them, so a deployed engine can be checked against the checkpoint where torch is not installed.

``export/reference_outputs.py`` writes it (export has torch); ``runtime/compare.py --reference``
reads it (the runtime has not, and never imports export). It is an uncompressed ``.npz``: the
feed's arrays under ``feed/<input>``, the outputs under ``expected/<output>``, and a JSON string
``info`` (heatmap mode, checkpoint file and SHA-256, format version), written whole.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Union

import numpy as np

from keyreid.contract import INPUT_NAMES, OUTPUT_NAMES
from keyreid.errors import KeyreidError
from keyreid.files import read_npz, write_npz

PathLike = Union[str, Path]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ReferenceResults:
    feed: Dict[str, np.ndarray]        # docs/contract.md §6 inputs
    expected: Dict[str, np.ndarray]    # embedding, part_weights of the reference model
    info: Dict[str, object]            # heatmap_mode, checkpoint, checkpoint_sha256, ...


def write_reference_results(path: PathLike, feed: Mapping[str, np.ndarray],
                            expected: Mapping[str, np.ndarray], info: Mapping[str, object]) -> Path:
    arrays = {f"feed/{name}": feed[name] for name in INPUT_NAMES}
    arrays.update({f"expected/{name}": expected[name] for name in OUTPUT_NAMES})
    arrays["info"] = np.array(json.dumps({**info, "format_version": FORMAT_VERSION}))
    return write_npz(path, arrays)


def read_reference_results(path: PathLike) -> ReferenceResults:
    """Read and check a reference file; every problem is one KeyreidError naming the file."""
    path = Path(path)
    arrays = read_npz(path, "reference file")
    wanted = [f"feed/{name}" for name in INPUT_NAMES] + [f"expected/{name}" for name in OUTPUT_NAMES] + ["info"]
    missing = [name for name in wanted if name not in arrays]
    if missing:
        raise KeyreidError(f"{path} is not a reference file written by export/reference_outputs.py "
                           f"(missing {', '.join(missing)})")
    try:
        info = json.loads(str(arrays["info"]))
    except ValueError as exc:
        raise KeyreidError(f"{path}: its info record is not JSON") from exc
    feed = {name: arrays[f"feed/{name}"] for name in INPUT_NAMES}
    expected = {name: arrays[f"expected/{name}"] for name in OUTPUT_NAMES}
    clips = {len(array) for array in list(feed.values()) + list(expected.values())}
    if len(clips) != 1 or clips == {0}:
        raise KeyreidError(f"{path}: its arrays disagree on the number of clips or hold none")
    return ReferenceResults(feed, expected, info if isinstance(info, dict) else {})
