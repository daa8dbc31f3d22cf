"""COCO keypoint-results JSON as a tracklet folder's pose source: matching detections to frames,
picking the tracked person among several, and the same model input as .pose files."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from keyreid.errors import KeyreidError
from keyreid.runtime.inputs.coco_keypoints import COCO_FILE_NAME, box_iou, read_coco_keypoints
from keyreid.runtime.serving.pipeline import load_tracklet_clips
from keyreid.runtime.inputs.poses import PoseTally
from keyreid.runtime.inputs.tracklets import discover_tracklets
from keyreid.synthetic import realistic_keypoints

cv2 = pytest.importorskip("cv2")

CROP = (64, 128)        # (width, height)


def detection(image_id, keypoints, score=0.9, bbox=None, key="image_id"):
    numbers = [None if np.isnan(value) else float(value) for value in np.asarray(keypoints).reshape(-1)]
    entry = {key: image_id, "category_id": 1, "keypoints": numbers, "score": score}   # NaN -> null
    if bbox is not None:
        entry["bbox"] = list(bbox)
    return entry


def person(rng):
    keypoints, _ = realistic_keypoints(rng, 1, crop_sizes=[CROP], size_jitter_px=0)
    return keypoints[0, 0].astype(np.float64)


def make_folder(root, name, num_frames, entries=None, poses=None):
    folder = root / name
    folder.mkdir(parents=True)
    for index in range(num_frames):
        assert cv2.imwrite(str(folder / f"{index:06d}.png"), np.full((CROP[1], CROP[0], 3), 90, np.uint8))
        if poses is not None:
            (folder / f"{index:06d}.pose").write_text(json.dumps(poses[index].tolist()))
    if entries is not None:
        (folder / COCO_FILE_NAME).write_text(json.dumps(entries))
    return folder


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0


def test_the_person_whose_box_fills_the_crop_is_picked_over_a_higher_scored_passer_by(tmp_path):
    rng = np.random.default_rng(0)
    tracked, passer_by = person(rng), person(rng) * 0.3
    path = tmp_path / COCO_FILE_NAME
    path.write_text(json.dumps([
        detection("000000.png", passer_by, score=0.99, bbox=(0, 0, 20, 40), key="file_name"),
        detection("000000.png", tracked, score=0.6, bbox=(2, 3, 60, 122), key="file_name")]))
    frames = read_coco_keypoints(path, ["000000.png"])
    np.testing.assert_array_equal(frames["000000.png"].select(CROP), tracked)


def test_without_boxes_the_box_around_confident_joints_decides(tmp_path):
    rng = np.random.default_rng(1)
    tracked = person(rng)
    small = tracked.copy()
    small[:, :2] = small[:, :2] * 0.2 + 5
    path = tmp_path / COCO_FILE_NAME
    path.write_text(json.dumps([detection(0, small, score=0.99), detection(0, tracked, score=0.5)]))
    np.testing.assert_array_equal(read_coco_keypoints(path, ["000000.jpg"])["000000.jpg"].select(CROP), tracked)


def test_frames_are_named_by_file_name_stem_or_number(tmp_path):
    rng = np.random.default_rng(2)
    joints = [person(rng) for _ in range(4)]
    path = tmp_path / COCO_FILE_NAME
    path.write_text(json.dumps([detection("000000.jpg", joints[0], key="file_name"),
                                detection("some/dir/000001.jpg", joints[1], key="file_name"),
                                detection("000002", joints[2]), detection(3, joints[3]),
                                detection("other.jpg", joints[0], key="file_name")]))     # not in this folder
    names = [f"{index:06d}.jpg" for index in range(5)]
    frames = read_coco_keypoints(path, names)
    assert sorted(frames) == names[:4]
    for index in range(4):
        np.testing.assert_array_equal(frames[names[index]].select(CROP), joints[index])


def test_coco_file_gives_the_model_the_same_keypoints_as_pose_files(tmp_path):
    rng = np.random.default_rng(3)
    keypoints, _ = realistic_keypoints(rng, 2, crop_sizes=[CROP], size_jitter_px=0)
    keypoints = keypoints.reshape(-1, 17, 3)[:6]
    keypoints[2, 4] = np.nan                      # cleared the same way in both sources
    entries = [detection(index, keypoints[index]) for index in range(6) if index != 4]   # frame 4: nobody
    entries.append(detection(1, keypoints[1] * 0.25, score=0.99))                        # and a passer-by
    poses = keypoints.copy()
    poses[4] = 0
    make_folder(tmp_path / "coco", "t", 6, entries=entries)
    make_folder(tmp_path / "pose", "t", 6, poses=np.nan_to_num(poses))
    loaded = {}
    for source in ("coco", "pose"):
        tally = PoseTally()
        clips = load_tracklet_clips(discover_tracklets(tmp_path / source).tracklets, tally)
        loaded[source] = (np.stack([clip["keypoints"] for clip in clips]), tally)
    np.testing.assert_array_equal(loaded["coco"][0], loaded["pose"][0])
    tally = loaded["coco"][1]
    assert (tally.ok, tally.missing, tally.cleared_joints) == (5, 1, 1)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ('{"image_id": 0}', "a JSON list of detections"),
    ('[{"image_id": 0, "keypoints": [1, 2, 3]}]', "must be 51 numbers"),
    ('[{"keypoints": ' + json.dumps([0] * 51) + '}]', 'neither "file_name" nor "image_id"'),
    ('[{"image_id": "elsewhere", "keypoints": ' + json.dumps([0] * 51) + '}]', "names a frame of this tracklet"),
], ids=["not-json", "not-a-list", "short-keypoints", "no-frame-key", "no-frame-matches"])
def test_bad_coco_file_fails_its_tracklet_with_the_reason_and_others_still_run(tmp_path, content, message):
    make_folder(tmp_path, "bad", 2)
    (tmp_path / "bad" / COCO_FILE_NAME).write_text(content)
    make_folder(tmp_path, "good", 2, poses=np.zeros((2, 17, 3)))
    scan = discover_tracklets(tmp_path)
    assert [tracklet.name for tracklet in scan.tracklets] == ["good"]
    (failure,) = scan.failures
    assert failure.name == "bad" and message in failure.reason


def test_huge_coco_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from keyreid.runtime.inputs import coco_keypoints
    monkeypatch.setattr(coco_keypoints, "MAX_FILE_BYTES", 10)
    path = tmp_path / COCO_FILE_NAME
    path.write_text("[" + " " * 20 + "]")
    with pytest.raises(KeyreidError, match="larger than"):
        read_coco_keypoints(path, ["000000.png"])


def test_documented_example_file_picks_the_tracked_person_over_the_passer_by(tmp_path):
    usage = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    section = usage[usage.index("## Keypoint files"):]
    path = tmp_path / COCO_FILE_NAME
    path.write_text(re.search(r"```json\n(.*?)```", section, re.S).group(1))
    keypoints = read_coco_keypoints(path, ["0001.jpg"])["0001.jpg"].select(CROP)
    assert keypoints.shape == (17, 3) and keypoints[0].tolist() == [31, 14, 0.95]
