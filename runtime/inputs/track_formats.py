"""Per-frame person tracks from an appliance's tracker, in the formats trackers write, as one
record type: ``FrameTracks`` (docs/contract.md §9).

Frames are numbered from 0 in the order the stream decodes them. Each format is read into
``FrameTracks(frame, time, people)``, frames in increasing order, where every person has a
track id, a box ``(x, y, width, height)`` and optionally 17 COCO keypoints ``(x, y, confidence)``:

- ``jsonl``: keyreid's own JSON Lines, one line per frame, in frame pixels, streamed (a FIFO or
  a file another program is still writing works)::

      {"frame": 12, "time": 0.48, "people": [{"track": 7, "box": [x, y, w, h],
                                              "keypoints": [x0, y0, c0, ..., x16, y16, c16]}]}

  ``time`` (seconds, any origin) and ``keypoints`` (or null) may be left out.
- ``ultralytics-json``: what Ultralytics' ``Results.to_json()`` (``json.dumps(summary())``) gives
  for each frame of ``model.track(...)`` with a ``-pose`` model, written one after another in frame
  order, in pixels (``normalize=False``, the default): a JSON list per frame of
  ``{"box": {"x1", "y1", "x2", "y2"}, "track_id", "keypoints": {"x": [17], "y": [17], "visible": [17]}, ...}``.
- ``ultralytics-txt``: the ``labels/`` folder of ``save_txt=True``: ``<video stem>_<frame>.txt`` per
  frame with detections (frames counted from 1), one line per person,
  ``class xc yc w h x0 y0 v0 ... x16 y16 v16 [confidence] track_id``, fractions of the frame.
- ``mot``: MOTChallenge ``frame,id,bb_left,bb_top,bb_width,bb_height[,conf,x,y,z]`` (frames from 1,
  boxes in 0-based pixels as ByteTrack writes them) and, optionally, a keypoints CSV with the same
  keys: ``frame,id,x0,y0,c0,...,x16,y16,c16``.

Ultralytics keeps a joint's position only when its confidence is at least 0.5 and writes (0, 0)
otherwise, so in both Ultralytics formats a joint below 0.5 gets confidence 0 (it would
otherwise count as seen at the frame's corner).

A record that cannot be read (bad JSON, a missing field, 50 numbers for the keypoints, a frame
out of order, a person without a track id) is skipped and counted in the reader's ``problems``
with a few examples; it never stops the stream.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from keyreid.contract import NUM_KEYPOINTS
from keyreid.errors import KeyreidError

FORMATS = ("jsonl", "ultralytics-json", "ultralytics-txt", "mot")
KEYPOINT_NUMBERS = NUM_KEYPOINTS * 3
# One frame's record (a line, a JSON value, a label file): larger ones are refused unread. A
# frame of 100 people takes about 60 KB.
MAX_RECORD_BYTES = 1 << 20
# Tables read whole (MOT files, keypoint CSVs): an hour of 25 fps video with 20 people is ~150 MB.
MAX_TABLE_BYTES = 1 << 30
# Below this confidence Ultralytics has replaced a joint's position by (0, 0).
ULTRALYTICS_MIN_VISIBLE = 0.5
MAX_EXAMPLES = 3

TrackId = Union[int, str]
PathLike = Union[str, Path]


@dataclass(frozen=True)
class TrackedPerson:
    track: TrackId                          # the tracker's id (an integer, or a string)
    box: Tuple[float, float, float, float]  # x, y (top-left), width, height
    keypoints: Optional[np.ndarray]         # float64 [17, 3] x, y, confidence; None: no pose


@dataclass(frozen=True)
class FrameTracks:
    """The people a tracker reported on one frame."""
    frame: int                              # 0-based index of the decoded frame
    time: Optional[float]                   # seconds, as the tracker gave it; None when not given
    people: Tuple[TrackedPerson, ...]
    normalized: bool = False                # coordinates are fractions of the frame's width/height

    def in_pixels(self, width: int, height: int) -> "FrameTracks":
        """The same record in frame pixels (a normalized one scaled by the frame's size)."""
        if not self.normalized:
            return self
        scale = np.array([width, height, 1.0])
        people = tuple(replace(person, box=(person.box[0] * width, person.box[1] * height,
                                            person.box[2] * width, person.box[3] * height),
                               keypoints=None if person.keypoints is None else person.keypoints * scale)
                       for person in self.people)
        return replace(self, people=people, normalized=False)


@dataclass
class Problems:
    """Records skipped as unreadable: how many, and a few examples with their place."""
    count: int = 0
    examples: List[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    def summary(self) -> str:
        return f"{self.count} skipped" + (f" (e.g. {'; '.join(self.examples)})" if self.examples else "")


class BadRecord(ValueError):
    """One record cannot be read; the reason is the message."""


# --- values shared by every format ------------------------------------------------------------

def _number(value: object, what: str) -> float:
    """A JSON number (null: NaN, so one bad joint is cleared rather than the record dropped)."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"{what} must be a number, got {value!r}")
    return float(value)


def track_id(value: object) -> TrackId:
    """A track id: an integer (7, or 7.0 as CSV tools write it) or a non-empty string."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise BadRecord(f"a track id must be an integer or a string, got {value!r}")
    return int(value)


def _box(values, what: str = "box") -> Tuple[float, float, float, float]:
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise BadRecord(f"{what} must be 4 numbers [x, y, width, height], got {values!r}"[:200])
    x, y, width, height = (_number(value, what) for value in values)
    return x, y, width, height


def _keypoints(values, what: str = "keypoints") -> Optional[np.ndarray]:
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or len(values) != KEYPOINT_NUMBERS:
        count = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise BadRecord(f"{what} must be {KEYPOINT_NUMBERS} numbers (x, y, confidence for the "
                        f"{NUM_KEYPOINTS} COCO joints), got {count}")
    return np.array([_number(value, what) for value in values], dtype=np.float64).reshape(NUM_KEYPOINTS, 3)


def _ultralytics_visibility(keypoints: np.ndarray) -> np.ndarray:
    """Confidence 0 for joints whose position Ultralytics replaced by (0, 0)."""
    keypoints = keypoints.copy()
    with np.errstate(invalid="ignore"):
        keypoints[keypoints[:, 2] < ULTRALYTICS_MIN_VISIBLE, 2] = 0.0
    return keypoints


# --- readers ----------------------------------------------------------------------------------

class TrackReader:
    """Frames of a track file in increasing frame order (``frames()``), and what was skipped."""

    def __init__(self, name: str):
        self.name = name
        self.problems = Problems()
        self._last_frame = -1

    def frames(self) -> Iterator[FrameTracks]:
        raise NotImplementedError

    def _in_order(self, record: FrameTracks, where: str) -> Optional[FrameTracks]:
        """The record if its frame comes after the previous one; else counted and None."""
        if record.frame <= self._last_frame:
            self.problems.add(where, f"frame {record.frame} does not come after frame {self._last_frame}")
            return None
        self._last_frame = record.frame
        return record

    @property
    def streams(self) -> bool:
        """True when reading may block on a writer (a FIFO or standard input)."""
        return False


def _open_binary(path: PathLike) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise KeyreidError(f"cannot read track file {path}: {exc.strerror or exc}") from exc


def _is_stream(path: PathLike) -> bool:
    path = Path(path)
    return not path.is_file()      # a FIFO, a character device (standard input)


class _OneFileReader(TrackReader):
    """A format read from one file, opened at once (a missing file is an error before any
    stream starts), which may be a FIFO or standard input that a tracker is still writing."""

    def __init__(self, path: PathLike):
        super().__init__(str(path))
        self.path = Path(path)
        self._handle = _open_binary(path)
        self._streams = _is_stream(path)

    @property
    def streams(self) -> bool:
        return self._streams


class JsonLinesReader(_OneFileReader):
    """keyreid's JSON Lines, read line by line as they arrive."""

    def frames(self) -> Iterator[FrameTracks]:
        with self._handle as handle:
            for line_number, line in enumerate(_bounded_lines(handle), start=1):
                where = f"{self.name} line {line_number}"
                if line is None:
                    self.problems.add(where, f"longer than {MAX_RECORD_BYTES} bytes")
                    continue
                if not line.strip():
                    continue
                try:
                    record = self._in_order(parse_jsonl_record(line), where)
                except BadRecord as exc:
                    self.problems.add(where, str(exc))
                    continue
                if record is not None:
                    yield record


def _bounded_lines(handle: IO[bytes]) -> Iterator[Optional[bytes]]:
    """Lines of ``handle`` without their newline; None for a line over MAX_RECORD_BYTES (the
    rest of it is read and thrown away in pieces, never held)."""
    while True:
        line = handle.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
            while True:
                rest = handle.readline(MAX_RECORD_BYTES)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        yield line.rstrip(b"\r\n")


def parse_jsonl_record(line: Union[str, bytes]) -> FrameTracks:
    """One line of keyreid's JSON Lines -> FrameTracks, or BadRecord with the reason."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise BadRecord(f"not JSON ({exc})"[:200]) from None
    if not isinstance(value, dict):
        raise BadRecord("a line must be a JSON object {\"frame\": ..., \"people\": [...]}")
    frame = value.get("frame")
    if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
        raise BadRecord(f"\"frame\" must be a frame index >= 0, got {frame!r}")
    time = value.get("time")
    if time is not None:
        time = _number(time, "\"time\"")
        if not math.isfinite(time):
            raise BadRecord("\"time\" must be a finite number of seconds")
    people = value.get("people", [])
    if not isinstance(people, list):
        raise BadRecord("\"people\" must be a list")
    parsed = []
    for index, person in enumerate(people):
        if not isinstance(person, dict):
            raise BadRecord(f"person {index} must be an object with track, box and keypoints")
        if "track" not in person or "box" not in person:
            raise BadRecord(f"person {index} needs \"track\" and \"box\"")
        parsed.append(TrackedPerson(track_id(person["track"]), _box(person["box"]),
                                    _keypoints(person.get("keypoints"))))
    return FrameTracks(frame, time, tuple(parsed))


class UltralyticsJsonReader(_OneFileReader):
    """Ultralytics ``to_json()`` values, one per frame, one after another (indented or not)."""

    def frames(self) -> Iterator[FrameTracks]:
        with self._handle as handle:
            for index, value in enumerate(_json_values(io.TextIOWrapper(handle, encoding="utf-8-sig"), self)):
                where = f"{self.name} frame {index}"
                try:
                    record = parse_ultralytics_frame(value, index)
                except BadRecord as exc:
                    self.problems.add(where, str(exc))
                    continue
                yield record

    @staticmethod
    def _detection(value: object, position: int) -> TrackedPerson:
        if not isinstance(value, dict):
            raise BadRecord(f"detection {position} is not an object")
        if "track_id" not in value:
            raise BadRecord(f"detection {position} has no track_id: run model.track(...), not predict")
        box = value.get("box")
        if not isinstance(box, dict) or any(key not in box for key in ("x1", "y1", "x2", "y2")):
            raise BadRecord(f"detection {position} needs a box {{x1, y1, x2, y2}}")
        x1, y1, x2, y2 = (_number(box[key], "box") for key in ("x1", "y1", "x2", "y2"))
        keypoints = value.get("keypoints")
        joints = None
        if keypoints is not None:
            if not isinstance(keypoints, dict) or any(not isinstance(keypoints.get(key), list) or
                                                      len(keypoints[key]) != NUM_KEYPOINTS
                                                      for key in ("x", "y", "visible")):
                raise BadRecord(f"detection {position}: keypoints must hold x, y and visible, "
                                f"{NUM_KEYPOINTS} numbers each (a COCO pose model)")
            joints = np.array([[_number(keypoints[key][joint], "keypoints") for key in ("x", "y", "visible")]
                               for joint in range(NUM_KEYPOINTS)], dtype=np.float64)
            joints = _ultralytics_visibility(joints)
        return TrackedPerson(track_id(value["track_id"]), (x1, y1, x2 - x1, y2 - y1), joints)


def parse_ultralytics_frame(value: object, frame: int) -> FrameTracks:
    """One frame's ``Results.summary()`` list -> FrameTracks, or BadRecord."""
    if not isinstance(value, list):
        raise BadRecord("each frame must be the JSON list Results.to_json() writes")
    return FrameTracks(frame, None, tuple(UltralyticsJsonReader._detection(item, position)
                                          for position, item in enumerate(value)))


def _json_values(text: IO[str], reader: TrackReader) -> Iterator[object]:
    """JSON values written one after another, parsed as their text arrives; a value that cannot
    be parsed ends the file (counted), as the next value's start cannot be found reliably."""
    decoder = json.JSONDecoder()
    buffer, position, finished = "", 0, False
    while True:
        while position < len(buffer) and buffer[position].isspace():
            position += 1
        if position < len(buffer):
            try:
                value, end = decoder.raw_decode(buffer, position)
            except (ValueError, RecursionError) as exc:
                complete = finished or len(buffer) - position > MAX_RECORD_BYTES
                if not complete:       # maybe the value is not all here yet
                    value = None
                else:
                    reader.problems.add(f"{reader.name} after {position} characters",
                                        f"not JSON ({exc}); the rest of the file is not read"[:300])
                    return
            else:
                # A number at the very end may continue in the next chunk: wait for more text.
                if end < len(buffer) or finished or not isinstance(value, (int, float)):
                    yield value
                    buffer, position = buffer[end:], 0
                    continue
        if finished:
            return
        chunk = text.read(1 << 16)
        if not chunk:
            finished = True
        buffer, position = buffer[position:] + chunk, 0


class UltralyticsTxtReader(TrackReader):
    """A ``save_txt`` labels folder: ``<stem>_<frame>.txt`` per frame with detections."""

    _NAME = re.compile(r"^(?P<stem>.+)_(?P<frame>\d+)\.txt$")

    def __init__(self, folder: PathLike):
        super().__init__(str(folder))
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise KeyreidError(f"ultralytics-txt tracks {folder} must be the labels/ folder save_txt=True writes")
        files: Dict[int, Path] = {}
        stems = set()
        for entry in self.folder.iterdir():
            match = self._NAME.match(entry.name)
            if match is None or not entry.is_file():
                continue
            stems.add(match["stem"])
            files[int(match["frame"])] = entry
        if len(stems) > 1:
            raise KeyreidError(f"{folder} holds labels of several videos ({', '.join(sorted(stems)[:4])}); "
                               "give each stream its own folder")
        self._files = [(number - 1, files[number]) for number in sorted(files) if number >= 1]

    def frames(self) -> Iterator[FrameTracks]:
        for frame, path in self._files:
            try:
                if path.stat().st_size > MAX_RECORD_BYTES:
                    raise BadRecord(f"larger than {MAX_RECORD_BYTES} bytes")
                people = tuple(self._line(line) for line in path.read_text(encoding="utf-8").splitlines()
                               if line.strip())
            except BadRecord as exc:
                self.problems.add(str(path), str(exc))
                continue
            except (OSError, UnicodeDecodeError) as exc:
                self.problems.add(str(path), f"cannot be read ({exc})")
                continue
            yield FrameTracks(frame, None, people, normalized=True)

    @staticmethod
    def _line(line: str) -> TrackedPerson:
        try:
            values = [float(text) for text in line.split()]
        except ValueError:
            raise BadRecord(f"not a line of numbers: {line[:80]!r}") from None
        # class, xc, yc, w, h, 51 keypoint numbers, [confidence], track id
        if len(values) not in (1 + 4 + KEYPOINT_NUMBERS + 1, 1 + 4 + KEYPOINT_NUMBERS + 2):
            raise BadRecord(f"{len(values)} numbers; a tracked pose line has {1 + 4 + KEYPOINT_NUMBERS + 1} "
                            f"(or {1 + 4 + KEYPOINT_NUMBERS + 2} with save_conf): class, box, "
                            f"{NUM_KEYPOINTS} x y visible, [confidence], track id")
        center_x, center_y, width, height = values[1:5]
        joints = np.array(values[5:5 + KEYPOINT_NUMBERS], dtype=np.float64).reshape(NUM_KEYPOINTS, 3)
        return TrackedPerson(track_id(values[-1]), (center_x - width / 2, center_y - height / 2, width, height),
                             _ultralytics_visibility(joints))


def _read_table(path: PathLike, what: str) -> List[Tuple[int, List[str]]]:
    """(line number, cells) of a CSV file read whole, blank lines and '#' comments left out."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_TABLE_BYTES:
            raise KeyreidError(f"{what} {path} is {size >> 20} MiB, above the limit of {MAX_TABLE_BYTES >> 20} MiB")
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise KeyreidError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise KeyreidError(f"{what} {path} is not a text file: {exc}") from exc
    rows = []
    for line_number, cells in enumerate(csv.reader(text.splitlines()), start=1):
        if cells and cells[0].strip() and not cells[0].lstrip().startswith("#"):
            rows.append((line_number, [cell.strip() for cell in cells]))
    return rows


class MotReader(TrackReader):
    """MOTChallenge boxes, with keypoints from a second CSV keyed by (frame, id)."""

    def __init__(self, path: PathLike, keypoints: Optional[PathLike] = None):
        super().__init__(str(path))
        joints = self._keypoint_rows(keypoints) if keypoints is not None else {}
        by_frame: Dict[int, List[TrackedPerson]] = {}
        seen = set()
        for line_number, cells in _read_table(path, "MOT track file"):
            where = f"{path} line {line_number}"
            try:
                if len(cells) < 6:
                    raise BadRecord(f"{len(cells)} columns; MOT rows are frame,id,bb_left,bb_top,bb_width,bb_height,...")
                frame, track = self._frame(cells[0]), self._float(cells[1], "id")
                if track < 0:
                    raise BadRecord("id -1: an untracked detection")
                track = track_id(track)
                box = tuple(self._float(cell, "box") for cell in cells[2:6])
            except BadRecord as exc:
                self.problems.add(where, str(exc))
                continue
            if (frame, track) in seen:
                self.problems.add(where, f"track {track} appears twice in frame {frame + 1}")
                continue
            seen.add((frame, track))
            by_frame.setdefault(frame, []).append(TrackedPerson(track, box, joints.pop((frame, track), None)))
        for (frame, track) in sorted(joints, key=str)[:MAX_EXAMPLES]:
            self.problems.add(str(keypoints), f"keypoints for track {track} in frame {frame + 1}, which has no box")
        self.problems.count += max(len(joints) - MAX_EXAMPLES, 0)
        self._records = [FrameTracks(frame, None, tuple(by_frame[frame])) for frame in sorted(by_frame)]

    def frames(self) -> Iterator[FrameTracks]:
        return iter(self._records)

    @staticmethod
    def _float(text: str, what: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise BadRecord(f"{what} {text!r} is not a number") from None

    @classmethod
    def _frame(cls, text: str) -> int:
        value = cls._float(text, "frame")
        if value != int(value) or value < 1:
            raise BadRecord(f"frame {text!r} must be a whole number from 1 (MOTChallenge counts from 1)")
        return int(value) - 1

    def _keypoint_rows(self, path: PathLike) -> Dict[Tuple[int, TrackId], np.ndarray]:
        rows: Dict[Tuple[int, TrackId], np.ndarray] = {}
        for line_number, cells in _read_table(path, "keypoints file"):
            where = f"{path} line {line_number}"
            try:
                if len(cells) != 2 + KEYPOINT_NUMBERS:
                    raise BadRecord(f"{len(cells)} columns; keypoint rows are frame,id and "
                                    f"{KEYPOINT_NUMBERS} numbers (x, y, confidence per COCO joint)")
                key = (self._frame(cells[0]), track_id(self._float(cells[1], "id")))
                rows[key] = np.array([self._float(cell, "keypoint") if cell else math.nan for cell in cells[2:]],
                                     dtype=np.float64).reshape(NUM_KEYPOINTS, 3)
            except BadRecord as exc:
                self.problems.add(where, str(exc))
        return rows


def guess_format(tracks: PathLike) -> str:
    """The format a track path's name suggests: a folder is ultralytics-txt, .json
    ultralytics-json, .txt/.csv mot, anything else (.jsonl, a FIFO, standard input) jsonl."""
    path = Path(tracks)
    if path.is_dir():
        return "ultralytics-txt"
    suffix = path.suffix.lower()
    return {".json": "ultralytics-json", ".txt": "mot", ".csv": "mot"}.get(suffix, "jsonl")


def open_tracks(tracks: PathLike, track_format: Optional[str] = None,
                keypoints: Optional[PathLike] = None) -> TrackReader:
    """A reader for ``tracks`` in ``track_format`` (default: ``guess_format``); ``keypoints`` is
    the MOT keypoints CSV. A path that cannot be opened is a KeyreidError."""
    track_format = track_format or guess_format(tracks)
    if track_format not in FORMATS:
        raise KeyreidError(f"unknown track format {track_format!r}; choose one of {', '.join(FORMATS)}")
    if keypoints is not None and track_format != "mot":
        raise KeyreidError(f"a keypoints file goes with mot tracks; {track_format} tracks carry their own keypoints")
    if track_format != "ultralytics-txt" and Path(tracks).is_dir():
        raise KeyreidError(f"track file {tracks} is a folder; only ultralytics-txt tracks are a folder (labels/)")
    if not Path(tracks).exists():
        raise KeyreidError(f"track file {tracks} does not exist")
    openers: Dict[str, Callable[[], TrackReader]] = {
        "jsonl": lambda: JsonLinesReader(tracks),
        "ultralytics-json": lambda: UltralyticsJsonReader(tracks),
        "ultralytics-txt": lambda: UltralyticsTxtReader(tracks),
        "mot": lambda: MotReader(tracks, keypoints),
    }
    return openers[track_format]()
