"""Synthetic camera scenes for tests, benchmarks and trials of the stream tool: frames with
people walking across, and what a tracker with a pose model would report for each frame.

Each person is a two-coloured figure of fixed size with a texture of its own, walking
horizontally at a constant speed (entering and leaving through the frame's edges, so some boxes
are clipped); their keypoints are ``keyreid.synthetic.realistic_keypoints`` placed in their box.
Frames are BGR (OpenCV's order). ``write_scene`` writes the video (MJPEG in AVI, with OpenCV's
``VideoWriter``) and the tracks as keyreid JSON Lines; the records are returned too, so a test
can write the other formats from them.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from keyreid.contract import NUM_KEYPOINTS
from keyreid.errors import KeyreidError
from keyreid.lazy import require
from keyreid.synthetic import realistic_keypoints


@dataclass(frozen=True)
class Walker:
    track: int
    width: int                 # box size in pixels
    height: int
    top: int                   # y of the box's top edge
    start_x: float             # x of the box's left edge at frame ``enters``
    speed: float               # pixels per frame (negative: walks left)
    enters: int                # first frame on which it is reported
    leaves: int                # first frame on which it is no longer reported
    sprite: np.ndarray         # BGR [height, width, 3]
    keypoints: np.ndarray      # [leaves - enters, 17, 3] in box pixels


def _sprite(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    cols = np.linspace(-1.0, 1.0, width)[None, :, None]
    shirt, trousers, background = rng.uniform(0, 255, (3, 3))
    figure = (np.abs(cols) < 0.45 * (1.0 - 0.3 * np.abs(rows - 0.5))) & (rows > 0.04) & (rows < 0.97)
    image = np.where(figure, np.where(rows < 0.5, shirt, trousers), background)
    image = image + rng.normal(0.0, 12.0, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_walkers(rng: np.random.Generator, frame_size: Tuple[int, int], num_frames: int, people: int,
                 first_track: int = 1, looks: Optional[Sequence[Walker]] = None) -> List[Walker]:
    """``people`` walkers over ``num_frames`` frames of ``frame_size`` (width, height). With
    ``looks``, walker i looks like ``looks[i]`` (the same person seen by another camera: its
    sprite, resized to this camera's box)."""
    cv2 = require("cv2")
    width, height = frame_size
    walkers = []
    for index in range(people):
        box_height = int(rng.integers(height * 0.35, height * 0.6))
        box_width = max(8, int(box_height * rng.uniform(0.38, 0.48)))
        if looks is not None:
            box_width = max(8, int(box_height * looks[index].width / looks[index].height))
        enters = int(rng.integers(0, max(1, num_frames // 4)))
        leaves = int(min(num_frames, enters + rng.integers(max(2, num_frames // 2), num_frames + 1)))
        duration = leaves - enters
        speed = float(rng.uniform(0.6, 1.2) * (width + box_width) / max(duration, 1)) * (1 if index % 2 == 0 else -1)
        start_x = -0.3 * box_width if speed > 0 else width - 0.7 * box_width
        clips = -(-duration // 4)
        keypoints, _ = realistic_keypoints(rng, clips, crop_sizes=[(box_width, box_height)], size_jitter_px=0)
        sprite = (_sprite(rng, box_width, box_height) if looks is None else
                  cv2.resize(looks[index].sprite, (box_width, box_height), interpolation=cv2.INTER_AREA))
        walkers.append(Walker(first_track + index, box_width, box_height, int(rng.integers(0, height - box_height)),
                              start_x, speed, enters, leaves, sprite,
                              keypoints.reshape(-1, NUM_KEYPOINTS, 3)[:duration].astype(np.float64)))
    return walkers


def _background(rng: np.random.Generator, frame_size: Tuple[int, int]) -> np.ndarray:
    width, height = frame_size
    top, bottom = rng.uniform(40, 220, (2, 3))
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    image = top * (1 - rows) + bottom * rows + rng.normal(0.0, 6.0, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def scene_frames(rng: np.random.Generator, frame_size: Tuple[int, int], num_frames: int,
                 walkers: Sequence[Walker], fps: float = 25.0):
    """Yield (BGR frame, JSON Lines record) per frame. Boxes are the walkers' unclipped boxes
    (partly outside the frame while they enter and leave)."""
    width, height = frame_size
    background = _background(rng, frame_size)
    for frame in range(num_frames):
        image = background.copy()
        people = []
        for walker in walkers:
            if not walker.enters <= frame < walker.leaves:
                continue
            x = walker.start_x + walker.speed * (frame - walker.enters)
            left = int(round(x))
            # Paste the visible part of the sprite (it walks in and out through the edges).
            visible_left, visible_right = max(left, 0), min(left + walker.width, width)
            if visible_right > visible_left:
                image[walker.top:walker.top + walker.height, visible_left:visible_right] = \
                    walker.sprite[:, visible_left - left:visible_right - left]
            joints = walker.keypoints[frame - walker.enters].copy()
            joints[:, 0] += x
            joints[:, 1] += walker.top
            people.append({"track": walker.track, "box": [round(x, 2), walker.top, walker.width, walker.height],
                           "keypoints": [round(float(value), 3) for value in joints.reshape(-1)]})
        yield image, {"frame": frame, "time": round(frame / fps, 4), "people": people}


def write_scene(video: Path, tracks: Optional[Path], rng: np.random.Generator, frame_size: Tuple[int, int] = (320, 240),
                num_frames: int = 40, people: int = 3, fps: float = 25.0, first_track: int = 1,
                walkers: Optional[Sequence[Walker]] = None) -> List[Dict]:
    """Write a scene as an MJPEG AVI (``video``) and keyreid JSON Lines (``tracks``, if given);
    returns the per-frame records."""
    cv2 = require("cv2")
    walkers = list(walkers) if walkers is not None else make_walkers(rng, frame_size, num_frames, people, first_track)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), fps, frame_size)
    if not writer.isOpened():
        raise KeyreidError(f"OpenCV cannot write an MJPEG video at {video}")
    records = []
    try:
        for image, record in scene_frames(rng, frame_size, num_frames, walkers, fps):
            writer.write(image)
            records.append(record)
    finally:
        writer.release()
    if tracks is not None:
        write_jsonl(tracks, records)
    return records


def write_jsonl(path: Path, records: Sequence[Dict]) -> Path:
    Path(path).write_text("".join(json.dumps(record) + "\n" for record in records))
    return Path(path)
