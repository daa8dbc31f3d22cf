"""The MARS test split (query and gallery tracklets) from the dataset's own files (docs/contract.md §4).

Layout under ROOT:
- ``bbox_test/<pid>/<pid>C<cam>T<tracklet>F<frame>.jpg`` (the folder is the name's first 4 characters),
- ``info/test_name.txt``: one frame name per line,
- ``info/tracks_test_info.mat``: variable ``track_test_info``, rows (start, end, pid, camera),
  start/end 1-based inclusive lines of test_name.txt, camera 1..6,
- ``info/query_IDX.mat``: variable ``query_IDX``, 1-based rows of that table that are queries;
  every other row is gallery.
Rows with pid -1 are junk and skipped; cameras become 0..5.

Keypoints: upstream's ``keypoint/extract_keypoint.py --dataset_path ROOT --output_dir
ROOT/keypoints`` mirrors the dataset's relative layout, so a frame's pose file is
``ROOT/keypoints/bbox_test/<pid>/<stem>.pose``; ``--keypoints`` may point elsewhere at a folder
with the same ``<pid>/<stem>.pose`` layout.

The .mat files need SciPy, which the runtime does not otherwise depend on, so it is imported
only here, when MARS is read.
"""
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.runtime.inputs.tracklets import POSE_SUFFIX, Tracklet, TrackletFailure, parse_mars_name

PathLike = Union[str, Path]

FRAMES_DIR = "bbox_test"
NAMES_FILE = "info/test_name.txt"
TRACKS_FILE = "info/tracks_test_info.mat"
QUERY_FILE = "info/query_IDX.mat"
MARS_FILES = (NAMES_FILE, TRACKS_FILE, QUERY_FILE)
# Variable names inside the .mat files; the first is what MARS ships and upstream reads.
TRACKS_VARIABLES = ("track_test_info", "tracks_test_info")
QUERY_VARIABLES = ("query_IDX", "query_idx")
NUM_CAMERAS = 6
JUNK_PID = -1


@dataclass
class MarsTestSplit:
    query: List[Tracklet]
    gallery: List[Tracklet]
    junk_rows: int                # table rows with pid -1, skipped
    tracks_variable: str          # the variable read from tracks_test_info.mat
    query_variable: str           # the variable read from query_IDX.mat
    keypoints_dir: Path
    keypoints_dir_exists: bool    # False: every frame will run without a pose
    failures: List[TrackletFailure] = field(default_factory=list)   # rows that cannot be a tracklet


def default_keypoints_dir(root: PathLike) -> Path:
    """Where upstream's extraction script puts the test split's pose files."""
    return Path(root) / "keypoints" / FRAMES_DIR


def _loadmat(path: Path) -> dict:
    try:
        scipy_io = importlib.import_module("scipy.io")
    except ImportError as exc:
        raise KeyreidError("scipy is not installed (needed to read the MARS .mat files): "
                           "pip install scipy") from exc
    if not path.is_file():
        raise KeyreidError(f"MARS file {path} is missing")
    try:
        return scipy_io.loadmat(str(path))
    except NotImplementedError as exc:   # MATLAB v7.3 (HDF5) files
        raise KeyreidError(f"{path} is a MATLAB v7.3 file; save it as -v7 or older") from exc
    except (ValueError, TypeError, OSError, scipy_io.matlab.MatReadError) as exc:
        raise KeyreidError(f"cannot read {path}: not a readable .mat file ({exc})") from exc


def _mat_variable(path: Path, names: Sequence[str]) -> Tuple[np.ndarray, str]:
    """The first of ``names`` found in the .mat file, else its only variable."""
    contents = _loadmat(path)
    variables = {key: value for key, value in contents.items() if not key.startswith("__")}
    for name in names:
        if name in variables:
            return np.asarray(variables[name]), name
    if len(variables) == 1:
        (name, value), = variables.items()
        return np.asarray(value), name
    raise KeyreidError(f"{path} holds none of the variables {', '.join(names)} "
                       f"(found: {', '.join(sorted(variables)) or 'none'})")


def _as_integers(values: np.ndarray, path: Path, what: str) -> np.ndarray:
    if values.size and (not np.issubdtype(values.dtype, np.number)
                        or not np.all(np.isfinite(values)) or not np.all(values == np.round(values))):
        raise KeyreidError(f"{path}: {what} must hold whole numbers")
    return values.astype(np.int64)


def _read_tracks(path: Path) -> Tuple[np.ndarray, str]:
    table, variable = _mat_variable(path, TRACKS_VARIABLES)
    if table.ndim != 2 or table.shape[1] != 4:
        raise KeyreidError(f"{path}: {variable} must be an [n, 4] table (start, end, pid, camera), "
                           f"got shape {table.shape}")
    return _as_integers(table, path, variable), variable


def _read_query_rows(path: Path, num_rows: int) -> Tuple[np.ndarray, str]:
    """0-based table rows of the queries, in the file's order."""
    indices, variable = _mat_variable(path, QUERY_VARIABLES)
    indices = _as_integers(indices.reshape(-1), path, variable)
    bad = indices[(indices < 1) | (indices > num_rows)]
    if bad.size:
        raise KeyreidError(f"{path}: {variable} must hold 1-based rows of the {num_rows}-row "
                           f"track table, got {bad[:5].tolist()}")
    if np.unique(indices).size != indices.size:
        raise KeyreidError(f"{path}: {variable} lists a row more than once")
    return indices - 1, variable


def _read_names(path: Path) -> List[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise KeyreidError(f"MARS file {path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyreidError(f"cannot read {path}: {exc}") from exc


def _is_plain_file_name(name: str) -> bool:
    """True for a bare file name: no folder part, no ``..``, nothing that leaves ``bbox_test/<pid>``."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


def _tracklet(row_index: int, row: np.ndarray, names: List[str], frames_dir: Path,
              keypoints_dir: Path, tracks_path: Path) -> Tracklet:
    start, end, pid, camera = (int(value) for value in row)
    where = f"{tracks_path} row {row_index + 1}"
    if not 1 <= start <= end <= len(names):
        raise KeyreidError(f"{where}: frames {start}..{end} are not within the "
                           f"{len(names)} lines of {NAMES_FILE}")
    if not 1 <= camera <= NUM_CAMERAS:
        raise KeyreidError(f"{where}: camera {camera} is not in 1..{NUM_CAMERAS}")
    frame_names = names[start - 1:end]
    escaping = [name for name in frame_names if not _is_plain_file_name(name)]
    if escaping:
        raise KeyreidError(f"{where}: frame name {escaping[0]!r} in {NAMES_FILE} is not a plain file "
                           f"name; frames must stay inside {FRAMES_DIR}")
    first = parse_mars_name(Path(frame_names[0]).stem)
    if first is None or (first.pid, first.camera) != (pid, camera - 1):
        raise KeyreidError(f"{where}: (pid {pid}, camera {camera}) does not match its first frame "
                           f"{frame_names[0]!r}; is {NAMES_FILE} the one that belongs to this table?")
    person_camera = frame_names[0][:frame_names[0].index("T")]     # e.g. "0001C1"
    if any(not name.startswith(person_camera) for name in frame_names):
        raise KeyreidError(f"{where}: frames {start}..{end} mix people or cameras")
    return Tracklet(
        name=Path(frame_names[0]).stem.split("F")[0],               # e.g. "0001C1T0001"
        frame_paths=tuple(frames_dir / name[:4] / name for name in frame_names),
        pose_paths=tuple(keypoints_dir / name[:4] / (Path(name).stem + POSE_SUFFIX)
                         for name in frame_names),
        pid=pid, camera=camera - 1)


def load_mars_test(root: PathLike, keypoints_dir: Optional[PathLike] = None) -> MarsTestSplit:
    """Query and gallery tracklets of MARS's test split, in upstream's order.

    Queries come in query_IDX order, the gallery in table order. Frames are not opened here;
    a missing frame file fails when it is read.
    """
    root = Path(root)
    frames_dir = root / FRAMES_DIR
    if not frames_dir.is_dir():
        raise KeyreidError(f"{root} does not look like MARS: {frames_dir} is missing")
    explicit_keypoints = keypoints_dir is not None
    keypoints_dir = Path(keypoints_dir) if explicit_keypoints else default_keypoints_dir(root)
    if explicit_keypoints and not keypoints_dir.is_dir():
        raise KeyreidError(f"keypoints directory {keypoints_dir} does not exist")

    names = _read_names(root / NAMES_FILE)
    tracks_path = root / TRACKS_FILE
    table, tracks_variable = _read_tracks(tracks_path)
    query_rows, query_variable = _read_query_rows(root / QUERY_FILE, len(table))

    is_query = np.zeros(len(table), dtype=bool)
    is_query[query_rows] = True
    junk = table[:, 2] == JUNK_PID

    failures: List[TrackletFailure] = []

    def tracklets(rows: Sequence[int], prefix: str) -> List[Tracklet]:
        found = []
        for row in rows:
            if junk[row]:
                continue
            try:
                found.append(_tracklet(row, table[row], names, frames_dir, keypoints_dir, tracks_path))
            except KeyreidError as exc:     # one bad row fails its own tracklet
                failures.append(TrackletFailure(f"{prefix}row {row + 1}", str(exc)))
        return found

    query = tracklets(query_rows.tolist(), "query/")
    gallery = tracklets(np.flatnonzero(~is_query).tolist(), "gallery/")
    if failures and not query and not gallery:
        raise KeyreidError(f"no row of {tracks_path} makes a tracklet ({len(failures)} failed), e.g. "
                           f"{failures[0].reason}")
    return MarsTestSplit(
        query=query,
        gallery=gallery,
        junk_rows=int(junk.sum()),
        tracks_variable=tracks_variable,
        query_variable=query_variable,
        keypoints_dir=keypoints_dir,
        keypoints_dir_exists=keypoints_dir.is_dir(),
        failures=failures)
