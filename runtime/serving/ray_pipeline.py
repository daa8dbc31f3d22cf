"""Tracklets through Ray Data: decoding on CPU tasks, engines on a pool of actors.

    work rows (one per tracklet: name, labels, the pickled Tracklet)
      -> map(decode_tracklet)           Ray tasks, ``decode_cpus`` each: frames and poses -> clip arrays
      -> map_batches(EmbedTracklets)    ``actors`` actors, one engine each (GPUs where asked for):
                                        a Runner packs the clips of a batch of tracklets into engine
                                        batches; each tracklet's feature is the mean of its clips
      -> the driver (``batch.py``) writes the rows it receives as Parquet parts (batch_output)

A tracklet travels whole, so one actor computes its feature exactly as ``infer.py`` does
(``runner.tracklet_feature``). A failure stays with its tracklet: a frame that cannot be decoded,
a camera the engine does not know or non-finite outputs come back as the row's ``error``, and
the other rows go on. A dead actor (a crash, a lost node) is restarted by Ray, up to
``max_restarts`` times, and the batch it held is run again; the driver receives each output row
once, so nothing is lost or written twice.

Ray is imported by ``embedding_dataset`` only (extra ``ray``); the functions that run inside Ray
workers import nothing from it.
"""
from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from keyreid.contract import CLIP_FRAMES, IMAGE_HEIGHT, IMAGE_WIDTH, NUM_KEYPOINTS, camera_problem
from keyreid.lazy import require
from keyreid.runtime.inputs.images import DEFAULT_MAX_FRAME_SIDE
from keyreid.runtime.serving.pipeline import clip_loader, clip_requests, describe_failure
from keyreid.runtime.inputs.poses import PoseTally
from keyreid.runtime.inputs.tracklets import Tracklet, num_clips

# Columns of a work row, of a decoded row (besides the work row's), and of an output row.
WORK_COLUMNS = ("name", "source", "pid", "camera", "frames", "clips", "tracklet")
CLIP_ARRAYS = ("clip_frames", "clip_keypoints", "clip_crop_size")
OUTPUT_COLUMNS = ("name", "source", "pid", "camera", "frames", "clips", "error", "poses", "embedding")
_POSE_COUNTS = ("ok", "missing", "unreadable", "malformed", "cleared_joints")
# A tracklet that failed to decode carries no clips: arrays of these shapes, 0 clips long.
_NO_CLIPS = {"clip_frames": ((CLIP_FRAMES, IMAGE_HEIGHT, IMAGE_WIDTH, 3), np.uint8),
             "clip_keypoints": ((CLIP_FRAMES, NUM_KEYPOINTS, 3), np.float32),
             "clip_crop_size": ((CLIP_FRAMES, 2), np.float32)}


@dataclass(frozen=True)
class PipelineOptions:
    engine: Union[str, Path]                  # file or Triton URL, as open_engine takes it
    engine_options: Mapping[str, Any] = field(default_factory=dict)   # open_engine's keywords
    actors: int = 1                           # engines running at once (one per actor)
    cpus_per_actor: float = 1.0               # Ray's CPU count for an actor (a scheduling figure)
    gpus_per_actor: float = 0.0               # GPUs per actor; fractions share a GPU
    decode_cpus: float = 1.0                  # Ray's CPU count for a decoding task
    tracklets_per_batch: int = 4              # tracklets an actor gets per call
    max_batch_size: Optional[int] = None      # clips per engine call (Runner's default: 16)
    max_frame_side: int = DEFAULT_MAX_FRAME_SIDE
    max_restarts: int = 3                     # restarts of a dead actor (and retries of its batch)
    tracklets_per_block: int = 2              # work rows per input block: small keeps work spread


def work_rows(tracklets: Sequence[Tracklet], source: str) -> List[Dict[str, Any]]:
    """One row per tracklet: its labels, and the tracklet itself pickled (file paths and poses),
    which the decoding task on any node unpickles."""
    return [{"name": tracklet.name, "source": source, "pid": tracklet.pid, "camera": tracklet.camera,
             "frames": tracklet.num_frames, "clips": num_clips(tracklet.num_frames),
             "tracklet": pickle.dumps(tracklet, protocol=pickle.HIGHEST_PROTOCOL)}
            for tracklet in tracklets]


def _pose_counts(tally: PoseTally) -> str:
    return json.dumps({**{name: getattr(tally, name) for name in _POSE_COUNTS}, "examples": tally.examples})


def add_pose_counts(tally: PoseTally, counts_json: str) -> None:
    """Add a row's pose counts (``poses`` column) into ``tally``."""
    counts = json.loads(counts_json) if counts_json else {}
    for name in _POSE_COUNTS:
        setattr(tally, name, getattr(tally, name) + int(counts.get(name, 0)))
    room = tally.max_examples - len(tally.examples)
    tally.examples.extend(counts.get("examples", [])[:max(room, 0)])


def decode_tracklet(row: Dict[str, Any], max_frame_side: int = DEFAULT_MAX_FRAME_SIDE) -> Dict[str, Any]:
    """A work row -> the same row with its clips decoded (``clip_*`` arrays [clips, 4, ...]),
    ``poses`` (what the pose files held) and ``error`` ("" when it decoded)."""
    tracklet: Tracklet = pickle.loads(row["tracklet"])
    tally = PoseTally()
    load = clip_loader(tally, max_frame_side)
    decoded = {name: row[name] for name in WORK_COLUMNS if name != "tracklet"}
    try:
        clips = [load(request) for request in clip_requests(tracklet)]
        error = ""
    except Exception as exc:          # one bad frame fails its own tracklet, like infer.py
        clips, error = [], describe_failure(exc)
    for column, key in zip(CLIP_ARRAYS, ("frames", "keypoints", "crop_size")):
        shape, dtype = _NO_CLIPS[column]
        decoded[column] = np.stack([clip[key] for clip in clips]) if clips else np.zeros((0,) + shape, dtype)
    decoded.update(poses=_pose_counts(tally), error=error)
    return decoded


class EmbedTracklets:
    """The actor: one engine, opened once; each call embeds a batch of decoded tracklets."""

    def __init__(self, engine: Union[str, Path], engine_options: Mapping[str, Any],
                 max_batch_size: Optional[int] = None):
        from keyreid.runtime.backends import open_engine
        from keyreid.runtime.serving.runner import Runner
        self.engine = open_engine(engine, **dict(engine_options)).activate()
        self.runner = Runner(self.engine, max_batch_size=max_batch_size, block_when_full=True)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        count = len(batch["name"])
        errors = [str(error) for error in batch["error"]]
        futures: List[Any] = [None] * count
        for row in range(count):
            camera = int(batch["camera"][row])
            problem = camera_problem(camera, self.engine.num_cameras)
            if errors[row] or problem:
                errors[row] = errors[row] or problem
                continue
            frames, keypoints, crop_size = (batch[name][row] for name in CLIP_ARRAYS)
            futures[row] = self.runner.submit_tracklet(
                [{"frames": frames[clip], "keypoints": keypoints[clip], "crop_size": crop_size[clip], "camera": camera}
                 for clip in range(len(frames))])
        embeddings = np.zeros((count, self.engine.embedding_dim), np.float32)
        for row, future in enumerate(futures):
            if future is None:
                continue
            exception = future.exception()
            if exception is None:
                embeddings[row] = future.result()
            else:
                errors[row] = describe_failure(exception)
        output = {name: batch[name] for name in OUTPUT_COLUMNS if name not in ("error", "embedding")}
        output.update(error=np.array(errors, dtype=object), embedding=embeddings)
        return output


def embedding_dataset(rows: List[Dict[str, Any]], options: PipelineOptions):
    """The Ray Data pipeline over ``rows`` (``work_rows``); lazy until the caller iterates it.
    Ray must be initialised (``ray.init``)."""
    ray_data = require("ray.data")
    blocks = max(1, -(-len(rows) // options.tracklets_per_block))
    decoded = ray_data.from_items(rows, override_num_blocks=blocks).map(
        decode_tracklet, fn_kwargs={"max_frame_side": options.max_frame_side}, num_cpus=options.decode_cpus)
    with warnings.catch_warnings():
        # max_restarts and max_task_retries have no named parameter yet; Ray deprecates passing
        # them this way from 2.64, which setup.py's [ray] extra stays below.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return decoded.map_batches(
            EmbedTracklets, batch_size=options.tracklets_per_batch, batch_format="numpy",
            fn_constructor_kwargs={"engine": options.engine, "engine_options": dict(options.engine_options),
                                   "max_batch_size": options.max_batch_size},
            compute=ray_data.ActorPoolStrategy(size=options.actors),
            num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor,
            # Explicit, so a crashed actor is retried a bounded number of times (Ray Data's default
            # is without end, which a poisoned input would turn into a run that never ends);
            # differing from the decoding task's arguments also keeps Ray from fusing decoding
            # into the actors.
            max_restarts=options.max_restarts, max_task_retries=options.max_restarts)
