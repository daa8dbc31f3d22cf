"""keyreid.runtime.serving: clips in, embeddings out, for many callers at once.

- ``runner``: one engine, many threads, dynamic batching (``Runner``, ``RunnerOptions``).
- ``pipeline``: tracklet folders through a Runner, with failures kept per tracklet.
- ``online``: an appliance's tracker pushes crops frame by frame (``OnlineEncoder``).
"""
from keyreid.runtime.serving.online import OnlineEncoder
from keyreid.runtime.serving.pipeline import TrackletRun, clip_loader, run_tracklets
from keyreid.runtime.serving.runner import Runner, RunnerOptions

__all__ = ["Runner", "RunnerOptions", "TrackletRun", "clip_loader", "run_tracklets", "OnlineEncoder"]
