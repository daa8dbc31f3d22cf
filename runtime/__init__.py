"""keyreid.runtime (the ``runtime/`` folder): serve embeddings from an exported model file.

No torch here, not even lazily: a device needs NumPy, OpenCV and ONNX Runtime (or OpenVINO, or
TensorRT).
It reads the files the export step wrote and never imports ``keyreid.export``.

Rooms, in data-flow order (each subpackage's ``__init__`` lists its modules):

- ``backends/``: ``open_engine(path, backend="auto", **options) -> Engine``: an ``.onnx``
  (ONNX Runtime, or OpenVINO), OpenVINO ``.xml``, TensorRT ``.plan`` or a Triton address behind
  one interface; ``Engine.infer(feed)`` runs one batch of clips laid out as docs/contract.md §6,
  checked against the model first. ``backend_names()`` lists the registered backends.
- ``inputs/``: tracklet folders (``discover_tracklets``), frames, ``.pose`` files and COCO
  keypoints (``PoseTally`` counts frames without a pose), the MARS layout.
- ``serving/``: ``Runner(engine, preprocess=...)`` (many callers, one engine, dynamic batching;
  defaults in ``RunnerOptions``), ``run_tracklets(runner, tracklets, pose_tally) ->
  TrackletRun`` (tracklet features and failures in input order), ``OnlineEncoder(engine)`` (a
  tracker pushes crops and keypoints frame by frame; a track's feature equals its folder's).
- ``results/``: ``Gallery(dim)`` (features with camera, time and label; top-k search, saved as
  one file), evaluation (CMC, mAP), the ranking and track figures.
- ``StreamSession([StreamSpec(...)], engine, StreamOptions(...))`` (``serving/``): video files
  or network streams with a tracker's per-frame tracks in (``inputs/``: the sources, the track
  formats, the crop rule), one feature per finished track and its cross-camera matches out.

The command-line tools at the front (``infer.py``, ``stream.py``, ``compare.py``, ``gallery.py``,
``serve_triton.py``; ``cli_args.py`` holds the options they share) are thin layers over these.
"""
from keyreid.runtime.backends import Engine, backend_names, open_engine
from keyreid.runtime.inputs import PoseTally, discover_tracklets
from keyreid.runtime.results import Gallery
from keyreid.runtime.serving import OnlineEncoder, Runner, RunnerOptions, TrackletRun, clip_loader, run_tracklets
from keyreid.runtime.serving.stream_session import StreamOptions, StreamSession, StreamSpec

__all__ = ["open_engine", "backend_names", "Engine", "Runner", "RunnerOptions", "discover_tracklets", "clip_loader",
           "PoseTally", "run_tracklets", "TrackletRun", "OnlineEncoder", "Gallery", "StreamSession", "StreamSpec",
           "StreamOptions"]
