"""What the stream tests share: a synthetic scene whose numbers every track format can state
exactly, writers for each format, cutting the crops by hand into tracklet folders, and reading
the stream tool's outputs.

The scene is 250x200 pixels (x / 250 and y / 200 of a number with one decimal need at most 6
significant digits, so Ultralytics' ``%g`` label files hold the very same boxes and joints), boxes
are whole pixels, and joints below confidence 0.5 are written as Ultralytics writes them: at
(0, 0). So every format states the same tracks and the stream must give the same embeddings.
"""
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from keyreid.synthetic_video import make_walkers, scene_frames, write_jsonl

cv2 = __import__("cv2")

FRAME_SIZE = (250, 200)
FPS = 25.0
KEYPOINT_CONFIDENCE_FLOOR = 0.5       # Ultralytics clears positions below this


def exact_records(records: List[Dict]) -> List[Dict]:
    """Records every format can state exactly: whole-pixel boxes, joints with one decimal and
    three-decimal confidences, joints below 0.5 at (0, 0) with confidence 0."""
    exact = []
    for record in records:
        people = []
        for person in record["people"]:
            joints = np.array(person["keypoints"], np.float64).reshape(17, 3)
            joints[:, :2] = np.round(joints[:, :2], 1)
            joints[:, 2] = np.round(joints[:, 2], 3)
            joints[joints[:, 2] < KEYPOINT_CONFIDENCE_FLOOR] = 0.0
            x, y, width, height = person["box"]
            people.append({"track": person["track"], "box": [int(round(x)), int(y), int(width) // 2 * 2,
                                                              int(height) // 2 * 2],
                           "keypoints": [float(value) for value in joints.reshape(-1)]})
        exact.append({"frame": record["frame"], "time": record["time"], "people": people})
    return exact


def write_scene_video(video: Path, seed: int, num_frames: int, people: int, first_track: int = 1,
                      fourcc: str = "MJPG") -> List[Dict]:
    """An AVI of the scene (MJPEG by default) and its exact records."""
    rng = np.random.default_rng(seed)
    walkers = make_walkers(rng, FRAME_SIZE, num_frames, people, first_track)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*fourcc), FPS, FRAME_SIZE)
    assert writer.isOpened()
    records = []
    for image, record in scene_frames(rng, FRAME_SIZE, num_frames, walkers, FPS):
        writer.write(image)
        records.append(record)
    writer.release()
    return exact_records(records)


def _joints(person) -> np.ndarray:
    return np.array(person["keypoints"], np.float64).reshape(17, 3)


def write_ultralytics_json(path: Path, records: Sequence[Dict], num_frames: int) -> Path:
    """``Results.to_json()`` of every frame (indented, as to_json writes), one after another."""
    by_frame = {record["frame"]: record for record in records}
    values = []
    for frame in range(num_frames):
        detections = []
        for person in by_frame.get(frame, {"people": []})["people"]:
            x, y, width, height = person["box"]
            joints = _joints(person)
            detections.append({"name": "person", "class": 0, "confidence": 0.9,
                               "box": {"x1": x, "y1": y, "x2": x + width, "y2": y + height},
                               "track_id": person["track"],
                               "keypoints": {"x": joints[:, 0].tolist(), "y": joints[:, 1].tolist(),
                                             "visible": joints[:, 2].tolist()}})
        values.append(json.dumps(detections, indent=2))
    path.write_text("\n".join(values) + "\n")
    return path


def write_ultralytics_txt(folder: Path, records: Sequence[Dict], stem: str = "cam") -> Path:
    """``save_txt=True`` label files: normalised ``%g`` numbers, frames counted from 1."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = FRAME_SIZE
    for record in records:
        lines = []
        for person in record["people"]:
            x, y, box_width, box_height = person["box"]
            joints = _joints(person)
            values = [0, (x + box_width / 2) / width, (y + box_height / 2) / height, box_width / width,
                      box_height / height]
            for joint_x, joint_y, visible in joints:
                values += [joint_x / width, joint_y / height, visible]
            values += [person["track"]]
            lines.append(("%g " * len(values)).rstrip() % tuple(values))
        if lines:
            (folder / f"{stem}_{record['frame'] + 1}.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_mot(path: Path, keypoints: Path, records: Sequence[Dict]) -> Path:
    """MOTChallenge boxes (frames from 1) and the keypoints CSV keyed the same way."""
    boxes, joints = [], []
    for record in records:
        for person in record["people"]:
            x, y, width, height = person["box"]
            boxes.append(f"{record['frame'] + 1},{person['track']},{x},{y},{width},{height},1,-1,-1,-1")
            joints.append(f"{record['frame'] + 1},{person['track']}," + ",".join(map(repr, person["keypoints"])))
    path.write_text("\n".join(boxes) + "\n")
    keypoints.write_text("\n".join(joints) + "\n")
    return path


def decoded_frames(location: str) -> List[np.ndarray]:
    """Every frame OpenCV's FFmpeg backend decodes from ``location``."""
    capture = cv2.VideoCapture(str(location), cv2.CAP_FFMPEG)
    frames = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image)
    capture.release()
    return frames


def cut_by_hand(frames: Sequence[np.ndarray], records: Sequence[Dict], root: Path, camera: int,
                stride: int = 1) -> Dict[str, Path]:
    """The crop rule written out again, independently of runtime/inputs/crops.py: each track's crops as
    PNG files and .pose files in a tracklet folder ``cam<camera>_track<id>`` (every
    ``stride``-th usable crop). Returns {stream track name: folder}."""
    usable: Dict[int, int] = {}
    folders = {}
    for record in records:
        if record["frame"] >= len(frames):
            continue
        frame = frames[record["frame"]]
        height, width = frame.shape[:2]
        for person in record["people"]:
            x, y, box_width, box_height = person["box"]
            left, right = (min(max(math.floor(edge + 0.5), 0), width) for edge in (x, x + box_width))
            top, bottom = (min(max(math.floor(edge + 0.5), 0), height) for edge in (y, y + box_height))
            if right <= left or bottom <= top:
                continue
            track = person["track"]
            usable[track] = usable.get(track, 0) + 1
            if (usable[track] - 1) % stride:
                continue
            folder = root / f"cam{camera}_track{track}"
            folder.mkdir(parents=True, exist_ok=True)
            folders[f"cam{camera}/track{track}"] = folder
            stem = f"{record['frame']:05d}"
            assert cv2.imwrite(str(folder / f"{stem}.png"), frame[top:bottom, left:right])
            joints = _joints(person).astype(np.float64)
            joints[:, 0] -= left
            joints[:, 1] -= top
            (folder / f"{stem}.pose").write_text(json.dumps(joints.astype(np.float32).tolist()))
    (root / "manifest.csv").write_text("tracklet,pid,camera\n" + "".join(
        f"{folder.name},,{camera}\n" for folder in folders.values()))
    return folders


def stream_outputs(folder: Path) -> Dict[str, object]:
    """The stream tool's outputs: JSON lines (each parsed whole), the npz arrays by track name."""
    lines = [json.loads(line) for line in (folder / "tracks.jsonl").read_text().splitlines()]
    arrays = dict(np.load(folder / "tracks.npz"))
    by_name = {str(name): embedding for name, embedding in zip(arrays["tracklets"], arrays["embeddings"])}
    return {"lines": lines, "arrays": arrays, "embeddings": by_name}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def leftover_partials(folder: Path) -> List[str]:
    return [name for name in os.listdir(folder) if ".partial" in name]
