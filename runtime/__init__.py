"""keyreid.runtime (the ``runtime/`` folder): serve embeddings from an exported model file.

No torch here, not even lazily: a device needs NumPy, OpenCV and ONNX Runtime (or OpenVINO, or
TensorRT).
It reads the files the export step wrote and never imports ``keyreid.export``.

Public entry points, in data-flow order:

- ``open_engine(path, backend="auto", **options) -> Engine``: an ``.onnx`` (ONNX Runtime, or
  OpenVINO with ``backend="openvino"``) or ``.plan`` (TensorRT) model behind one interface;
  ``Engine.infer(feed)`` runs one batch of clips laid out as docs/contract.md §6, checked against
  the model (shapes, dtypes, camera range) first. ``backend_names()`` lists the backends
  (the table is ``keyreid.runtime.backends.BACKENDS``).
- ``Runner(engine, preprocess=...)``: many callers, one engine, dynamic batching;
  ``submit_clip`` / ``submit_tracklet`` return futures.
- ``discover_tracklets(dir)``, ``clip_loader(pose_tally)``, ``PoseTally``: tracklet folders
  (frames and ``.pose`` files) and the hook that decodes them on the runner's threads.
- ``run_tracklets(runner, tracklets, pose_tally) -> TrackletRun``: tracklet features (the
  mean of their clips' embeddings) and the failures, in input order.
- ``OnlineEncoder(engine)``: for an appliance's tracker, frame by frame; ``push`` crops and
  keypoints per track, ``feature`` / ``finish`` give the track's feature (the same as a folder).
- ``Gallery(dim)``: tracklet features with camera, time and label; top-k search by squared
  Euclidean distance (exact NumPy, or FAISS), saved as one file.
- ``StreamSession(engine, [StreamSpec(source, tracks, camera), ...])``: video files, camera
  devices or network streams with the tracker's per-frame tracks; cuts each person's crops,
  feeds an ``OnlineEncoder`` and matches finished tracks across cameras in a live ``Gallery``.

The command-line tools ``infer.py``, ``compare.py``, ``gallery.py`` and ``stream.py`` are thin
layers over these.
"""
from keyreid.runtime.backends import backend_names
from keyreid.runtime.engines import Engine, open_engine
from keyreid.runtime.gallery import Gallery
from keyreid.runtime.online import OnlineEncoder
from keyreid.runtime.pipeline import TrackletRun, clip_loader, run_tracklets
from keyreid.runtime.poses import PoseTally
from keyreid.runtime.runner import Runner
from keyreid.runtime.stream_session import StreamOptions, StreamSession, StreamSpec
from keyreid.runtime.tracklets import discover_tracklets

__all__ = ["open_engine", "backend_names", "Engine", "Runner", "discover_tracklets", "clip_loader", "PoseTally",
           "run_tracklets", "TrackletRun", "OnlineEncoder", "Gallery", "StreamSession", "StreamSpec", "StreamOptions"]
