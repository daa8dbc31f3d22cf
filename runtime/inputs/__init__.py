"""keyreid.runtime.inputs: where clips come from, read and checked.

- ``tracklets``: tracklet folders (frames and ``.pose`` files), their discovery and clip split.
- ``images``: frame decoding with explicit size limits, resized as the model expects.
- ``poses``: ``.pose`` files and the tally of frames without a pose.
- ``coco_keypoints``: COCO keypoint JSON beside the frames.
- ``mars``: the MARS dataset layout and its evaluation split.
"""
from keyreid.runtime.inputs.poses import PoseTally
from keyreid.runtime.inputs.tracklets import Tracklet, discover_tracklets

__all__ = ["PoseTally", "Tracklet", "discover_tracklets"]
