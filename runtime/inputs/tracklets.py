"""Tracklets: how a folder of frames becomes clips, and where tracklets come from (docs/contract.md §4).

A tracklet is one person seen by one camera over a run of frames. Upstream's test loader cuts it
into consecutive clips of 4 frames, fills the last clip by cycling that clip's own frames, and
keeps at most the first 41 clips; the tracklet's feature is the mean of its clip embeddings.

``discover_tracklets`` reads the ``--tracklets DIR`` layout: one folder per tracklet holding
frames (.jpg/.jpeg/.png, temporal order = file-name order) and same-stem ``.pose`` files, or
one ``keypoints.json`` of COCO keypoint results (``coco_keypoints``).
Identity and camera come, in this order of preference, from ``DIR/manifest.csv``
(columns tracklet,pid,camera), from MARS-style frame names, or from the caller's defaults.
One bad tracklet becomes a ``TrackletFailure`` so the others still run; a directory with no
usable tracklet at all is a KeyreidError.
"""
import csv
import errno
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from keyreid.contract import CLIP_FRAMES, MAX_CLIPS_PER_TRACKLET, MEAN_CAMERA, camera_problem
from keyreid.errors import KeyreidError
from keyreid.runtime.inputs.coco_keypoints import COCO_FILE_NAME, read_coco_keypoints

PathLike = Union[str, Path]

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
POSE_SUFFIX = ".pose"
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("tracklet", "pid", "camera")
UNKNOWN_PID = -1
DEFAULT_CAMERA = 0          # of tracklets whose manifest and frame names give none (--camera)

# MARS frame names: <pid>C<cam>T<tracklet>F<frame>, e.g. 0001C1T0001F001; junk frames use pid "00-1".
_MARS_NAME = re.compile(r"^(?P<pid>\d+|00-1|-1)C(?P<camera>\d+)T(?P<tracklet>\d+)F(?P<frame>\d+)$")


@dataclass(frozen=True)
class Tracklet:
    name: str
    frame_paths: Tuple[Path, ...]     # temporal order
    pose_paths: Tuple[Any, ...]       # one per frame: a .pose path (the file may be missing), or the
                                      # frame's COCO detections, or None (poses.read_pose counts it)
    pid: int                          # identity, or -1 when unknown
    camera: int                       # 0-based camera index, or MEAN_CAMERA (-1)

    @property
    def num_frames(self) -> int:
        return len(self.frame_paths)

    @property
    def has_pose_source(self) -> bool:
        """True when some frame has a pose: a .pose file on disk or COCO detections. A tracklet
        without any runs with no joint visible in every frame, so its part features carry no
        pose information."""
        return any(pose is not None and (not isinstance(pose, Path) or pose.is_file()) for pose in self.pose_paths)

    @property
    def input_files(self) -> List[Path]:
        """Every file the tracklet is read from: frames, .pose files, its COCO keypoints file."""
        poses = [pose for pose in self.pose_paths if isinstance(pose, Path)]
        from_coco = self.frame_paths and any(pose is not None and not isinstance(pose, Path)
                                             for pose in self.pose_paths)
        return list(self.frame_paths) + poses + ([self.frame_paths[0].parent / COCO_FILE_NAME] if from_coco else [])


@dataclass(frozen=True)
class TrackletFailure:
    name: str
    reason: str


# Failures a command lists by name; the rest are counted (a MARS run can fail thousands).
MAX_LISTED_FAILURES = 5


def failure_lines(failures: Sequence[TrackletFailure], limit: int = MAX_LISTED_FAILURES) -> List[str]:
    """The summary lines of failed tracklets: the first ``limit`` by name and reason, then a count."""
    lines = [f"  failed {failure.name}: {failure.reason}" for failure in failures[:limit]]
    if len(failures) > limit:
        lines.append(f"  ... and {len(failures) - limit} more")
    return lines


@dataclass
class TrackletScan:
    root: Path
    tracklets: List[Tracklet]
    failures: List[TrackletFailure] = field(default_factory=list)
    ignored: List[Path] = field(default_factory=list)     # entries of tracklet folders that are neither

    def ignored_summary(self) -> Optional[str]:
        """One line about the ignored entries, or None when there were none."""
        if not self.ignored:
            return None
        examples = ", ".join(str(path) for path in self.ignored[:3])
        return (f"ignored {len(self.ignored)} entries of tracklet folders that are neither frames "
                f"({'/'.join(FRAME_SUFFIXES)} files) nor {POSE_SUFFIX} files, e.g. {examples}")


@dataclass(frozen=True)
class MarsName:
    pid: int          # -1 for MARS junk frames
    camera: int       # 0-based (the name's camera number minus one)
    tracklet: int
    frame: int


def parse_mars_name(stem: str) -> Optional[MarsName]:
    """Fields of a MARS frame name (without extension), or None if it is not one."""
    match = _MARS_NAME.match(stem)
    if match is None or int(match["camera"]) < 1:
        return None
    pid = UNKNOWN_PID if "-" in match["pid"] else int(match["pid"])
    return MarsName(pid, int(match["camera"]) - 1, int(match["tracklet"]), int(match["frame"]))


def split_into_clips(frames: Union[int, Sequence[int]], clip_frames: int = CLIP_FRAMES,
                     max_clips: int = MAX_CLIPS_PER_TRACKLET) -> List[List[int]]:
    """Upstream's dense split: consecutive groups of ``clip_frames``, the last one filled by
    cycling its own frames, at most ``max_clips`` groups.

    ``frames`` is a frame count (groups hold indices 0..n-1) or the frame indices themselves.
    6 frames -> [[0, 1, 2, 3], [4, 5, 4, 5]]; 3 -> [[0, 1, 2, 0]]; 1 -> [[0, 0, 0, 0]].
    """
    indices = list(range(frames)) if isinstance(frames, numbers.Integral) else list(frames)
    if not indices:
        raise KeyreidError("a tracklet needs at least one frame to make a clip")
    clips = []
    for start in range(0, len(indices), clip_frames):
        if len(clips) == max_clips:
            break
        group = indices[start:start + clip_frames]
        clips.append([group[i % len(group)] for i in range(clip_frames)])
    return clips


def num_clips(num_frames: int, clip_frames: int = CLIP_FRAMES,
              max_clips: int = MAX_CLIPS_PER_TRACKLET) -> int:
    """How many clips ``split_into_clips`` makes from ``num_frames`` frames."""
    return min(-(-num_frames // clip_frames), max_clips)


def _parse_int(text: str, what: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise KeyreidError(f"{where}: {what} must be an integer, got {text!r}") from None


def _check_camera(camera: int, where: str) -> int:
    """The lower bound only: the engine, not yet known here, checks the upper one."""
    if camera < MEAN_CAMERA:
        raise KeyreidError(f"{where}: {camera_problem(camera, None)}")
    return camera


def read_manifest(path: Path, default_camera: int) -> Dict[str, Tuple[int, int]]:
    """``manifest.csv`` -> {tracklet folder name: (pid, camera)}.

    Cameras are 0-based model indices (-1: mean camera embedding). An empty pid cell means
    unknown (-1); an empty camera cell means ``default_camera``.
    """
    labels: Dict[str, Tuple[int, int]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as manifest:
            reader = csv.DictReader(manifest)
            columns = [name.strip() for name in reader.fieldnames or []]
            if any(column not in columns for column in MANIFEST_COLUMNS):
                raise KeyreidError(f"{path}: needs the columns {','.join(MANIFEST_COLUMNS)}, "
                                   f"found {','.join(columns) or 'none'}")
            reader.fieldnames = columns
            for row in reader:
                where = f"{path} line {reader.line_num}"
                name = (row["tracklet"] or "").strip()
                if not name:
                    raise KeyreidError(f"{where}: empty tracklet name")
                if name in labels:
                    raise KeyreidError(f"{where}: tracklet {name!r} is listed twice")
                pid_text, camera_text = (row["pid"] or "").strip(), (row["camera"] or "").strip()
                pid = _parse_int(pid_text, "pid", where) if pid_text else UNKNOWN_PID
                camera = _parse_int(camera_text, "camera", where) if camera_text else default_camera
                labels[name] = (pid, _check_camera(camera, where))
    except OSError as exc:
        raise KeyreidError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise KeyreidError(f"{path} is not a readable CSV file: {exc}") from exc
    return labels


def links_back(entry: Path, folder: Path) -> bool:
    """True when ``entry`` is a symbolic link to ``folder`` or to a folder above it, or a cycle
    of links: following it would walk the same frames again, or without end."""
    if not entry.is_symlink():
        return False
    try:
        target = entry.resolve(strict=True)
    except RuntimeError:                     # a cycle of links (Python before 3.13)
        return True
    except OSError as exc:                   # ELOOP: a cycle (3.13); a broken link is no loop
        return exc.errno == errno.ELOOP
    folder = folder.resolve()
    return target == folder or target in folder.parents


class LoopLink(Exception):
    """A tracklet folder holds a symbolic link back to itself (the message names it)."""


def _frame_files(folder: Path, ignored: List[Path]) -> List[Path]:
    """The folder's frame files in name order; other visible entries that are not ``.pose``
    entries (a .bmp, ``x.jpg.txt``, a sub-folder, a broken link) go to ``ignored``. A link back
    to the folder (or above it) raises LoopLink."""
    frames = []
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if links_back(entry, folder):
            raise LoopLink(f"{entry.name} is a symbolic link that loops (back to its own tracklet folder, "
                           "or in a cycle); remove it")
        if entry.suffix.lower() in FRAME_SUFFIXES and entry.is_file():
            frames.append(entry)
        elif entry.suffix != POSE_SUFFIX and entry.name != COCO_FILE_NAME:
            ignored.append(entry)            # pose files, even odd ones, are read_pose's to count
    return sorted(frames, key=lambda entry: entry.name)


def _labels_from_mars_names(frames: List[Path]) -> Union[Tuple[int, int], str, None]:
    """(pid, camera) if every frame has a MARS name and they agree; a reason if they disagree;
    None if the frames are not (all) MARS-named."""
    parsed = [parse_mars_name(frame.stem) for frame in frames]
    if any(name is None for name in parsed):
        return None
    labels = {(name.pid, name.camera) for name in parsed}
    if len(labels) > 1:
        return f"MARS frame names disagree on (pid, camera): {sorted(labels)}"
    return labels.pop()


def discover_tracklets(root: PathLike, default_camera: int = DEFAULT_CAMERA) -> TrackletScan:
    """Every tracklet folder under ``root`` (sorted by name), with identity and camera.

    ``default_camera`` (the CLI's ``--camera``) applies to tracklets the manifest does not list
    and whose frames are not MARS-named; their pid is -1.
    """
    root = Path(root)
    if not root.is_dir():
        raise KeyreidError(f"tracklet directory {root} does not exist or is not a directory")
    _check_camera(default_camera, "--camera")
    manifest_path = root / MANIFEST_NAME
    manifest = read_manifest(manifest_path, default_camera) if manifest_path.is_file() else {}
    folders = sorted((entry for entry in root.iterdir()
                      if entry.is_dir() and not entry.name.startswith(".")),
                     key=lambda entry: entry.name)
    if not folders:
        raise KeyreidError(f"no tracklet folders in {root}: expected one sub-folder of frames per tracklet")

    scan = TrackletScan(root=root, tracklets=[])
    for folder in folders:
        if links_back(folder, root):
            scan.failures.append(TrackletFailure(folder.name, "a symbolic link to the tracklets folder itself "
                                                              "(or above it), not a tracklet; remove it"))
            continue
        try:
            frames = _frame_files(folder, scan.ignored)
        except LoopLink as exc:
            scan.failures.append(TrackletFailure(folder.name, str(exc)))
            continue
        if not frames:
            scan.failures.append(TrackletFailure(folder.name, f"no frames ({'/'.join(FRAME_SUFFIXES)})"))
            continue
        if folder.name in manifest:
            pid, camera = manifest[folder.name]
        else:
            from_names = _labels_from_mars_names(frames)
            if isinstance(from_names, str):
                scan.failures.append(TrackletFailure(folder.name, from_names))
                continue
            pid, camera = from_names or (UNKNOWN_PID, default_camera)
        pose_paths: Tuple[Any, ...] = tuple(frame.with_suffix(POSE_SUFFIX) for frame in frames)
        if (folder / COCO_FILE_NAME).is_file():
            try:
                detections = read_coco_keypoints(folder / COCO_FILE_NAME, [frame.name for frame in frames])
            except KeyreidError as exc:
                scan.failures.append(TrackletFailure(folder.name, str(exc)))
                continue
            pose_paths = tuple(detections.get(frame.name) for frame in frames)
        scan.tracklets.append(Tracklet(
            name=folder.name,
            frame_paths=tuple(frames),
            pose_paths=pose_paths,
            pid=pid, camera=camera))

    folder_names = {folder.name for folder in folders}
    for name in manifest:
        if name not in folder_names:
            scan.failures.append(TrackletFailure(name, f"listed in {MANIFEST_NAME} but has no folder"))
    if not scan.tracklets:
        reasons = "; ".join(f"{failure.name}: {failure.reason}" for failure in scan.failures[:3])
        raise KeyreidError(f"no usable tracklets in {root} ({len(scan.failures)} failed: {reasons})")
    return scan
