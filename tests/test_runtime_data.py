"""The runtime's data handling: frames, poses, tracklets, the MARS split and the metrics.

None of this needs an engine or torch; Pillow and SciPy are only used as references and to
write fixtures.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keyreid.contract import CLIP_FRAMES, IMAGE_HEIGHT, IMAGE_WIDTH, MAX_CLIPS_PER_TRACKLET, NUM_KEYPOINTS
from keyreid.errors import KeyreidError
from keyreid.runtime.results import evaluation
from keyreid.runtime.inputs import images, mars, poses, tracklets

cv2 = pytest.importorskip("cv2")
Image = pytest.importorskip("PIL.Image")


# ----------------------------------------------------------------------------- helpers

def photo_like(width, height, seed=0):
    """RGB uint8 with smooth shading, hard edges and noise: closer to a person crop than noise."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 3), None, 0, 255, cv2.NORM_MINMAX)
    cv2.rectangle(image, (width // 4, height // 5), (3 * width // 4, 4 * height // 5), (200, 40, 90), -1)
    cv2.circle(image, (width // 2, height // 6), max(2, width // 8), (20, 220, 180), -1)
    return np.clip(image.astype(int) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)


def pil_resize(rgb):
    return np.asarray(Image.fromarray(rgb).resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.BILINEAR))


def installed_pillow_pass_order():
    """Which pass order the installed Pillow uses, probed on a crop where the two differ."""
    probe = photo_like(90, 300, seed=99)
    reference = pil_resize(probe)
    matching = [order for order in images.PASS_ORDERS
                if np.array_equal(images.resize_like_pil(probe, pass_order=order), reference)]
    assert len(matching) == 1, f"installed Pillow matches pass orders {matching}"
    return matching[0]


def write_pose(path, keypoints):
    path.write_text(json.dumps(keypoints))


def a_pose(seed=0):
    rng = np.random.default_rng(seed)
    return [[float(x), float(y), float(c)] for x, y, c in
            zip(rng.uniform(0, 128, NUM_KEYPOINTS), rng.uniform(0, 256, NUM_KEYPOINTS),
                rng.uniform(0, 1, NUM_KEYPOINTS))]


# ----------------------------------------------------------------------------- images

# (width, height): MARS 128x256, and the other shapes crops come in: small, tall, wide, large.
CROP_SIZES = [(128, 256), (64, 128), (128, 64), (90, 300), (300, 90), (170, 411), (200, 500), (48, 96)]


@pytest.mark.parametrize("width,height", CROP_SIZES)
def test_resize_reproduces_pil_bilinear_exactly(width, height):
    rgb = photo_like(width, height)
    ours = images.resize_like_pil(rgb, pass_order=installed_pillow_pass_order())
    assert np.array_equal(ours, pil_resize(rgb))


def test_default_pass_order_is_the_one_upstreams_pillow_uses():
    # Upstream pins Pillow 11.2.1, which always resizes the width first; Pillow 13 does the
    # height first for tall crops, changing some pixels by one grey level.
    tall = photo_like(170, 411)
    default = images.resize_like_pil(tall)
    horizontal_first = images.resize_like_pil(tall, pass_order="horizontal_first")
    pillow13 = images.resize_like_pil(tall, pass_order="pillow13")
    assert np.array_equal(default, horizontal_first)
    assert np.abs(default.astype(int) - pillow13.astype(int)).max() == 1


def test_mars_sized_crop_is_not_resampled():
    rgb = photo_like(IMAGE_WIDTH, IMAGE_HEIGHT)
    assert np.array_equal(images.resize_like_pil(rgb), rgb)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_load_frame_matches_upstream_pil_path(tmp_path, suffix):
    path = tmp_path / f"frame{suffix}"
    Image.fromarray(photo_like(IMAGE_WIDTH, IMAGE_HEIGHT)).save(path)
    frame, crop_size = images.load_frame(path)
    reference, reference_size = images.load_frame_pil(path)
    assert frame.shape == (IMAGE_HEIGHT, IMAGE_WIDTH, 3) and frame.dtype == np.uint8
    assert crop_size == reference_size
    assert np.array_equal(frame, reference)


def test_jpeg_decoding_matches_pil(tmp_path):
    path = tmp_path / "frame.jpg"
    Image.fromarray(photo_like(170, 411)).save(path, quality=85)
    assert np.array_equal(images.decode_frame(path), np.asarray(Image.open(path).convert("RGB")))


def test_load_frame_returns_original_crop_width_and_height(tmp_path):
    path = tmp_path / "frame.png"
    Image.fromarray(photo_like(90, 300)).save(path)
    frame, crop_size = images.load_frame(path)
    assert crop_size == (90, 300)
    assert frame.shape == (IMAGE_HEIGHT, IMAGE_WIDTH, 3)


def test_grayscale_frame_is_replicated_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    gray = photo_like(IMAGE_WIDTH, IMAGE_HEIGHT)[:, :, 1]
    Image.fromarray(gray).save(path)
    frame, _ = images.load_frame(path)
    assert np.array_equal(frame, np.repeat(gray[:, :, None], 3, axis=2))


def test_alpha_channel_is_dropped(tmp_path):
    path = tmp_path / "rgba.png"
    rgba = np.dstack([photo_like(IMAGE_WIDTH, IMAGE_HEIGHT), np.full((IMAGE_HEIGHT, IMAGE_WIDTH), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(path)
    frame, _ = images.load_frame(path)
    assert np.array_equal(frame, rgba[:, :, :3])


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_corrupt_frame_raises_keyreid_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(KeyreidError, match="broken.jpg"):
        images.load_frame(path)


def test_missing_frame_raises_keyreid_error_naming_the_file(tmp_path):
    with pytest.raises(KeyreidError, match="absent.jpg"):
        images.load_frame(tmp_path / "absent.jpg")


def test_16_bit_frame_is_rejected(tmp_path):
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), np.full((20, 10, 3), 1000, np.uint16))
    with pytest.raises(KeyreidError, match="deep.png.*uint16"):
        images.load_frame(path)


def test_frame_declaring_a_side_above_the_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    cv2.imwrite(str(path), np.zeros((20, 5000, 3), np.uint8))
    with pytest.raises(KeyreidError, match="huge.png is 5000x20 pixels, above the limit of 4096"):
        images.load_frame(path)
    assert images.load_frame(path, max_side=5000)[1] == (5000, 20)


def test_jpeg_whose_size_header_follows_large_metadata_segments_is_decoded(tmp_path):
    ok, encoded = cv2.imencode(".jpg", np.full((30, 12, 3), 90, np.uint8))
    metadata = b"".join(b"\xff\xe2" + (60002).to_bytes(2, "big") + bytes(60000) for _ in range(2))
    path = tmp_path / "exif.jpg"
    path.write_bytes(encoded.tobytes()[:2] + metadata + encoded.tobytes()[2:])   # SOF 120 KB in
    frame, size = images.load_frame(path)
    assert size == (12, 30) and frame.shape == (IMAGE_HEIGHT, IMAGE_WIDTH, 3)


def test_frame_file_larger_than_any_allowed_image_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "bloated.png"
    cv2.imwrite(str(path), np.zeros((8, 8, 3), np.uint8))
    with open(path, "r+b") as handle:            # sparse: no disk used, and never read
        handle.truncate(images.max_frame_bytes(64) + 1)
    with pytest.raises(KeyreidError, match="bloated.png is 16 MiB, more than an image of at most 64 pixels"):
        images.decode_frame(path, max_side=64)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_declared_size_reads_the_header_of_jpeg_and_png(tmp_path, suffix):
    path = tmp_path / f"f{suffix}"
    cv2.imwrite(str(path), np.zeros((37, 23, 3), np.uint8))
    assert images.declared_size(path.read_bytes()) == (23, 37)


def test_frame_that_is_neither_jpeg_nor_png_is_refused(tmp_path):
    path = tmp_path / "f.jpg"
    cv2.imwrite(str(tmp_path / "f.bmp"), np.zeros((8, 8, 3), np.uint8))
    path.write_bytes((tmp_path / "f.bmp").read_bytes())
    with pytest.raises(KeyreidError, match="not a JPEG or PNG"):
        images.load_frame(path)


# ----------------------------------------------------------------------------- poses

def test_pose_file_reads_as_float32_17_by_3(tmp_path):
    path = tmp_path / "frame.pose"
    write_pose(path, a_pose())
    keypoints, status, cleared = poses.read_pose(path)
    assert keypoints.dtype == np.float32 and keypoints.shape == (NUM_KEYPOINTS, 3)
    assert status is poses.PoseStatus.OK and cleared == 0
    np.testing.assert_allclose(keypoints, np.float32(a_pose()))


def test_missing_pose_file_counts_as_invisible_joints(tmp_path):
    tally = poses.PoseTally()
    keypoints = poses.load_pose(tmp_path / "absent.pose", tally)
    assert not keypoints.any()
    assert (tally.missing, tally.without_pose, tally.total) == (1, 1, 1)


@pytest.mark.parametrize("text", [
    "{not json",
    "[]",
    json.dumps([[1.0, 2.0]] * NUM_KEYPOINTS),            # 17 x 2
    json.dumps([[1.0, 2.0, 0.5]] * 16),                  # 16 joints
    json.dumps([["1", "2", "0.5"]] * NUM_KEYPOINTS),     # strings
    json.dumps({"keypoints": [0.0] * 51}),
])
def test_malformed_pose_file_counts_as_invisible_joints(tmp_path, text):
    path = tmp_path / "bad.pose"
    path.write_text(text)
    tally = poses.PoseTally()
    keypoints = poses.load_pose(path, tally)
    assert not keypoints.any()
    assert tally.malformed == 1 and "bad.pose" in tally.summary()


def test_unreadable_pose_path_counts_as_invisible_joints(tmp_path):
    folder_in_the_way = tmp_path / "frame.pose"
    folder_in_the_way.mkdir()
    keypoints, status, _ = poses.read_pose(folder_in_the_way)
    assert not keypoints.any() and status is poses.PoseStatus.UNREADABLE


def test_nan_inf_and_negative_confidence_joints_are_cleared(tmp_path):
    rows = a_pose()
    rows[0] = [float("nan"), 10.0, 0.9]
    rows[1] = [10.0, float("inf"), 0.9]
    rows[2] = [10.0, 20.0, -0.5]
    rows[3] = [10.0, 20.0, float("nan")]
    rows[4] = [None, 20.0, 0.9]
    rows[5] = [1e300, 20.0, 0.9]                         # finite, but not as float32
    path = tmp_path / "frame.pose"
    path.write_text(json.dumps(rows))                    # Python writes NaN/Infinity tokens
    keypoints, status, cleared = poses.read_pose(path)
    assert status is poses.PoseStatus.OK and cleared == 6
    assert not keypoints[:6].any()
    np.testing.assert_allclose(keypoints[6:], np.float32(rows[6:]))


def test_joint_outside_the_crop_with_valid_confidence_is_kept(tmp_path):
    rows = a_pose()
    rows[9] = [-4.0, 300.0, 0.8]
    path = tmp_path / "frame.pose"
    write_pose(path, rows)
    keypoints, _, cleared = poses.read_pose(path)
    assert cleared == 0 and keypoints[9].tolist() == [-4.0, 300.0, pytest.approx(0.8)]


def test_deeply_nested_pose_file_counts_as_malformed(tmp_path):
    path = tmp_path / "deep.pose"
    path.write_text("[" * 100_000 + "]" * 100_000)
    tally = poses.PoseTally()
    keypoints = poses.load_pose(path, tally)
    assert tally.malformed == 1 and not keypoints.any()


def test_oversized_pose_file_counts_as_malformed_without_reading_it_whole(tmp_path):
    path = tmp_path / "big.pose"
    path.write_text(json.dumps(a_pose()) + " " * poses.MAX_POSE_BYTES)
    assert poses.read_pose(path)[1] is poses.PoseStatus.MALFORMED


def test_pose_path_that_is_a_fifo_does_not_block(tmp_path):
    path = tmp_path / "f.pose"
    os.mkfifo(path)
    assert poses.read_pose(path)[1] is poses.PoseStatus.UNREADABLE


# ----------------------------------------------------------------------------- clips

@pytest.mark.parametrize("num_frames,expected", [
    (1, [[0, 0, 0, 0]]),
    (3, [[0, 1, 2, 0]]),
    (4, [[0, 1, 2, 3]]),
    (5, [[0, 1, 2, 3], [4, 4, 4, 4]]),
    (6, [[0, 1, 2, 3], [4, 5, 4, 5]]),
    (7, [[0, 1, 2, 3], [4, 5, 6, 4]]),
    (8, [[0, 1, 2, 3], [4, 5, 6, 7]]),
])
def test_last_clip_is_filled_by_cycling_its_own_frames(num_frames, expected):
    assert tracklets.split_into_clips(num_frames) == expected


def upstream_style_split(num_frames, seq_len=CLIP_FRAMES, max_length=MAX_CLIPS_PER_TRACKLET - 1):
    """The test loader's loop, restated: full groups while more than seq_len frames remain, the
    rest padded by appending its own elements while iterating over it; a clip is only kept while
    fewer than max_length + 1 clips have been kept."""
    groups, start = [], 0
    while num_frames - start > seq_len:
        groups.append(list(range(start, start + seq_len)))
        start += seq_len
    last = list(range(start, num_frames))
    for index in last:
        if len(last) >= seq_len:
            break
        last.append(index)
    groups.append(last)
    return [group for count, group in enumerate(groups) if count <= max_length]


def test_split_matches_upstream_loader_for_every_length_up_to_200():
    for num_frames in range(1, 201):
        assert tracklets.split_into_clips(num_frames) == upstream_style_split(num_frames), num_frames


def test_long_tracklet_keeps_only_the_first_41_clips():
    clips = tracklets.split_into_clips(200)
    assert len(clips) == MAX_CLIPS_PER_TRACKLET == 41
    assert clips[-1] == [160, 161, 162, 163]
    assert tracklets.num_clips(200) == 41 and tracklets.num_clips(6) == 2


def test_split_accepts_frame_indices():
    assert tracklets.split_into_clips([10, 11, 12, 13, 14, 15]) == [[10, 11, 12, 13], [14, 15, 14, 15]]


def test_split_rejects_an_empty_tracklet():
    with pytest.raises(KeyreidError, match="at least one frame"):
        tracklets.split_into_clips(0)


# ----------------------------------------------------------------------------- tracklet folders

def make_tracklet(folder, frame_names, with_poses=True):
    folder.mkdir(parents=True)
    for name in frame_names:
        (folder / name).write_bytes(b"")     # discovery never opens frames
        if with_poses:
            write_pose((folder / name).with_suffix(".pose"), a_pose())


def test_frames_are_in_name_order_and_poses_share_their_stem(tmp_path):
    make_tracklet(tmp_path / "t1", ["b.png", "a.jpg", "c.JPEG", "notes.txt", ".hidden.jpg"])
    (track,) = tracklets.discover_tracklets(tmp_path).tracklets
    assert [path.name for path in track.frame_paths] == ["a.jpg", "b.png", "c.JPEG"]
    assert [path.name for path in track.pose_paths] == ["a.pose", "b.pose", "c.pose"]
    assert all(pose.parent == tmp_path / "t1" for pose in track.pose_paths)


def test_manifest_gives_identity_and_camera(tmp_path):
    make_tracklet(tmp_path / "alice", ["0.jpg"])
    make_tracklet(tmp_path / "bob", ["0.jpg"])
    (tmp_path / "manifest.csv").write_text("tracklet,pid,camera\nalice,7,2\nbob,8,\n")
    scan = tracklets.discover_tracklets(tmp_path, default_camera=4)
    labels = {track.name: (track.pid, track.camera) for track in scan.tracklets}
    assert labels == {"alice": (7, 2), "bob": (8, 4)}


def test_mars_frame_names_give_identity_and_zero_based_camera(tmp_path):
    make_tracklet(tmp_path / "x", ["0042C3T0001F001.jpg", "0042C3T0001F002.jpg"])
    make_tracklet(tmp_path / "y", ["00-1C6T0002F001.jpg"])
    scan = tracklets.discover_tracklets(tmp_path)
    labels = {track.name: (track.pid, track.camera) for track in scan.tracklets}
    assert labels == {"x": (42, 2), "y": (-1, 5)}


def test_entries_that_are_neither_frames_nor_poses_are_counted(tmp_path):
    make_tracklet(tmp_path / "t1", ["a.jpg", "b.bmp", "x.jpg.txt"])
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "t1" / "broken.jpg")
    (tmp_path / "t1" / "sub").mkdir()
    scan = tracklets.discover_tracklets(tmp_path)
    assert sorted(path.name for path in scan.ignored) == ["b.bmp", "broken.jpg", "sub", "x.jpg.txt"]
    assert scan.ignored_summary().startswith("ignored 4 entries")


def test_unlabelled_tracklet_gets_default_camera_and_unknown_pid(tmp_path):
    make_tracklet(tmp_path / "cam_feed", ["f1.jpg"])
    (track,) = tracklets.discover_tracklets(tmp_path, default_camera=3).tracklets
    assert (track.pid, track.camera) == (-1, 3)


def test_empty_tracklet_folder_is_a_failure_record_and_others_go_on(tmp_path):
    make_tracklet(tmp_path / "good", ["0.jpg"])
    (tmp_path / "empty").mkdir()
    scan = tracklets.discover_tracklets(tmp_path)
    assert [track.name for track in scan.tracklets] == ["good"]
    assert [(failure.name, "no frames" in failure.reason) for failure in scan.failures] == [("empty", True)]


def test_mars_names_that_disagree_make_a_failure_record(tmp_path):
    make_tracklet(tmp_path / "mixed", ["0001C1T0001F001.jpg", "0002C1T0001F001.jpg"])
    make_tracklet(tmp_path / "good", ["0.jpg"])
    scan = tracklets.discover_tracklets(tmp_path)
    assert [failure.name for failure in scan.failures] == ["mixed"]


def test_manifest_row_without_a_folder_is_a_failure_record(tmp_path):
    make_tracklet(tmp_path / "alice", ["0.jpg"])
    (tmp_path / "manifest.csv").write_text("tracklet,pid,camera\nalice,1,0\nghost,2,0\n")
    scan = tracklets.discover_tracklets(tmp_path)
    assert [failure.name for failure in scan.failures] == ["ghost"]


def test_directory_without_tracklet_folders_raises(tmp_path):
    (tmp_path / "loose.jpg").write_bytes(b"")
    with pytest.raises(KeyreidError, match="no tracklet folders"):
        tracklets.discover_tracklets(tmp_path)


def test_directory_whose_tracklets_all_fail_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyreidError, match="no usable tracklets.*empty"):
        tracklets.discover_tracklets(tmp_path)


def test_missing_tracklet_directory_raises(tmp_path):
    with pytest.raises(KeyreidError, match="does not exist"):
        tracklets.discover_tracklets(tmp_path / "nowhere")


@pytest.mark.parametrize("manifest,message", [
    ("tracklet,pid\nalice,1\n", "needs the columns"),
    ("tracklet,pid,camera\nalice,one,0\n", "pid must be an integer"),
    ("tracklet,pid,camera\nalice,1,-2\n", "camera -2 is out of range"),
    ("tracklet,pid,camera\nalice,1,0\nalice,1,0\n", "listed twice"),
])
def test_bad_manifest_raises_naming_the_problem(tmp_path, manifest, message):
    make_tracklet(tmp_path / "alice", ["0.jpg"])
    (tmp_path / "manifest.csv").write_text(manifest)
    with pytest.raises(KeyreidError, match=message):
        tracklets.discover_tracklets(tmp_path)


# ----------------------------------------------------------------------------- MARS

# Tracklets of a tiny MARS test split: (pid, camera 1-based, tracklet number, frames).
FAKE_MARS_TRACKS = [
    (1, 1, 1, 3),
    (1, 2, 2, 5),
    (-1, 3, 1, 2),    # junk
    (2, 1, 1, 4),
    (2, 6, 3, 1),
]
FAKE_MARS_QUERY_ROWS = [4, 1]   # 1-based


def mars_name(pid, camera, tracklet, frame):
    pid_text = "00-1" if pid == -1 else f"{pid:04d}"
    return f"{pid_text}C{camera}T{tracklet:04d}F{frame:03d}.jpg"


def build_fake_mars(root, tracks_variable="track_test_info", query_variable="query_IDX"):
    scipy_io = pytest.importorskip("scipy.io")
    names, table = [], []
    for pid, camera, tracklet, num_frames in FAKE_MARS_TRACKS:
        start = len(names) + 1
        names += [mars_name(pid, camera, tracklet, frame) for frame in range(1, num_frames + 1)]
        table.append([start, len(names), pid, camera])
    (root / "bbox_test").mkdir(parents=True)
    (root / "info").mkdir()
    (root / "info" / "test_name.txt").write_text("\n".join(names) + "\n")
    scipy_io.savemat(str(root / "info" / "tracks_test_info.mat"),
                     {tracks_variable: np.array(table, dtype=np.int32)})
    scipy_io.savemat(str(root / "info" / "query_IDX.mat"),
                     {query_variable: np.array([FAKE_MARS_QUERY_ROWS], dtype=np.int32)})
    return names


def test_mars_split_puts_query_rows_first_in_file_order_and_the_rest_in_gallery(tmp_path):
    build_fake_mars(tmp_path)
    split = mars.load_mars_test(tmp_path)
    assert [track.name for track in split.query] == ["0002C1T0001", "0001C1T0001"]
    assert [track.name for track in split.gallery] == ["0001C2T0002", "0002C6T0003"]


def test_mars_junk_rows_are_skipped(tmp_path):
    build_fake_mars(tmp_path)
    split = mars.load_mars_test(tmp_path)
    assert split.junk_rows == 1
    assert all(track.pid != -1 for track in split.query + split.gallery)


def test_mars_cameras_become_zero_based(tmp_path):
    build_fake_mars(tmp_path)
    split = mars.load_mars_test(tmp_path)
    assert [(track.pid, track.camera) for track in split.gallery] == [(1, 1), (2, 5)]


def test_mars_frames_follow_test_name_order_under_bbox_test(tmp_path):
    build_fake_mars(tmp_path)
    track = mars.load_mars_test(tmp_path).gallery[0]
    assert track.frame_paths == tuple(tmp_path / "bbox_test" / "0001" / mars_name(1, 2, 2, frame)
                                      for frame in range(1, 6))


def test_mars_pose_paths_follow_upstream_keypoint_layout(tmp_path):
    build_fake_mars(tmp_path)
    split = mars.load_mars_test(tmp_path)
    assert split.query[1].pose_paths[0] == tmp_path / "keypoints" / "bbox_test" / "0001" / "0001C1T0001F001.pose"
    assert split.keypoints_dir_exists is False


def test_mars_explicit_keypoints_dir_is_used(tmp_path):
    build_fake_mars(tmp_path)
    keypoints = tmp_path / "elsewhere"
    keypoints.mkdir()
    split = mars.load_mars_test(tmp_path, keypoints_dir=keypoints)
    assert split.query[1].pose_paths[0] == keypoints / "0001" / "0001C1T0001F001.pose"
    assert split.keypoints_dir_exists is True


def test_mars_missing_explicit_keypoints_dir_raises(tmp_path):
    build_fake_mars(tmp_path)
    with pytest.raises(KeyreidError, match="keypoints directory"):
        mars.load_mars_test(tmp_path, keypoints_dir=tmp_path / "nowhere")


def test_mars_reports_the_mat_variable_names_it_read(tmp_path):
    build_fake_mars(tmp_path)
    split = mars.load_mars_test(tmp_path)
    assert (split.tracks_variable, split.query_variable) == ("track_test_info", "query_IDX")


def test_mars_accepts_other_variable_names(tmp_path):
    build_fake_mars(tmp_path, tracks_variable="tracks_test_info", query_variable="something_else")
    split = mars.load_mars_test(tmp_path)
    assert (split.tracks_variable, split.query_variable) == ("tracks_test_info", "something_else")
    assert len(split.query) == 2


def test_mars_missing_mat_file_raises_naming_it(tmp_path):
    build_fake_mars(tmp_path)
    (tmp_path / "info" / "query_IDX.mat").unlink()
    with pytest.raises(KeyreidError, match="query_IDX.mat is missing"):
        mars.load_mars_test(tmp_path)


def test_mars_corrupt_mat_file_raises_naming_it(tmp_path):
    build_fake_mars(tmp_path)
    (tmp_path / "info" / "tracks_test_info.mat").write_bytes(b"garbage" * 20)
    with pytest.raises(KeyreidError, match="tracks_test_info.mat"):
        mars.load_mars_test(tmp_path)


def test_mars_table_that_does_not_match_the_names_raises(tmp_path):
    names = build_fake_mars(tmp_path)
    (tmp_path / "info" / "test_name.txt").write_text("\n".join(names[1:]) + "\n")   # shifted by one
    with pytest.raises(KeyreidError, match="no row .* makes a tracklet"):
        mars.load_mars_test(tmp_path)


@pytest.mark.parametrize("escape", ["../../../etc/passwd", "0001C1T0001F002.jpg/../../../../x.jpg",
                                    "/etc/hostname"])
def test_mars_frame_name_leaving_bbox_test_fails_only_its_tracklet(tmp_path, escape):
    names = build_fake_mars(tmp_path)
    names[1] = escape                          # second frame of the first tracklet (0001C1T0001)
    (tmp_path / "info" / "test_name.txt").write_text("\n".join(names) + "\n")
    split = mars.load_mars_test(tmp_path)
    assert [failure.name for failure in split.failures] == ["query/row 1"]
    assert "not a plain file name" in split.failures[0].reason
    assert [track.name for track in split.query] == ["0002C1T0001"]
    frames_dir = (tmp_path / "bbox_test").resolve()
    for track in split.query + split.gallery:
        assert all(frames_dir in path.resolve().parents for path in track.frame_paths)


@pytest.mark.parametrize("content", [b"", b"MATLAB 5.0 MAT-file" + bytes(200), b"\x00" * 5])
def test_mars_empty_or_malformed_mat_file_is_a_keyreid_error(tmp_path, content):
    build_fake_mars(tmp_path)
    (tmp_path / "info" / "query_IDX.mat").write_bytes(content)
    with pytest.raises(KeyreidError, match="query_IDX.mat: not a readable .mat file"):
        mars.load_mars_test(tmp_path)


def test_mars_query_index_out_of_range_raises(tmp_path):
    build_fake_mars(tmp_path)
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(str(tmp_path / "info" / "query_IDX.mat"), {"query_IDX": np.array([[1, 99]])})
    with pytest.raises(KeyreidError, match="99"):
        mars.load_mars_test(tmp_path)


def test_mars_without_scipy_raises_keyreid_error(tmp_path, monkeypatch):
    build_fake_mars(tmp_path)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(KeyreidError, match="pip install scipy"):
        mars.load_mars_test(tmp_path)


def test_not_a_mars_root_raises(tmp_path):
    with pytest.raises(KeyreidError, match="bbox_test"):
        mars.load_mars_test(tmp_path)


# ----------------------------------------------------------------------------- evaluation

def test_distances_are_squared_euclidean_in_blocks():
    rng = np.random.default_rng(0)
    query, gallery = rng.normal(size=(5, 64)).astype(np.float32), rng.normal(size=(7, 64)).astype(np.float32)
    expected = ((query[:, None, :].astype(np.float64) - gallery[None, :, :]) ** 2).sum(-1)
    distances = evaluation.squared_euclidean_distances(query, gallery, block_rows=2)
    assert distances.dtype == np.float32 and distances.shape == (5, 7)
    np.testing.assert_allclose(distances, expected, rtol=1e-5, atol=1e-4)


def test_hand_computed_cmc_and_map():
    gallery_pids = [2, 1, 3, 1, 3]
    gallery_cameras = [1, 1, 1, 2, 0]
    distances = [
        # query A (pid 1, camera 0): ranked g0 x, g1 match, g2 x, g3 match, g4 x
        #   -> first match at rank 2; AP = (1/2 + 2/4) / 2 = 0.5
        [0.1, 0.2, 0.3, 0.4, 0.5],
        # query B (pid 3, camera 0): g4 (pid 3, camera 0) is dropped, so g2 is rank 1; AP = 1
        [0.5, 0.4, 0.1, 0.2, 0.05],
        # query C (pid 9): no match anywhere -> skipped
        [0.1, 0.2, 0.3, 0.4, 0.5],
    ]
    result = evaluation.evaluate_rankings(distances, [1, 3, 9], gallery_pids, [0, 0, 0], gallery_cameras)
    assert result.cmc == {1: 0.5, 5: 1.0, 10: 1.0, 20: 1.0}
    assert result.mean_ap == pytest.approx(0.75)
    assert (result.num_queries, result.num_evaluated, result.num_skipped) == (3, 2, 1)


def test_same_identity_from_another_camera_is_kept():
    # The dropped entries are same identity AND same camera; other-camera matches count.
    result = evaluation.evaluate_rankings([[0.1, 0.2]], [5], [5, 5], [0], [0, 1])
    assert result.cmc[1] == 1.0 and result.mean_ap == 1.0


def test_ties_rank_the_earlier_gallery_entry_first():
    equal = [[1.0, 1.0]]
    match_second = evaluation.evaluate_rankings(equal, [1], [2, 1], [0], [1, 1])
    match_first = evaluation.evaluate_rankings(equal, [1], [1, 2], [0], [1, 1])
    assert (match_second.cmc[1], match_second.mean_ap) == (0.0, 0.5)
    assert (match_first.cmc[1], match_first.mean_ap) == (1.0, 1.0)


def test_ranks_beyond_the_gallery_size_count_every_evaluated_query():
    result = evaluation.evaluate_rankings([[0.3, 0.2, 0.1]], [1], [1, 2, 3], [0], [1, 1, 1], ranks=(1, 20))
    assert result.cmc == {1: 0.0, 20: 1.0}


def test_all_queries_without_a_match_raises():
    with pytest.raises(KeyreidError, match="none of the 1 queries"):
        evaluation.evaluate_rankings([[0.1, 0.2]], [1], [1, 2], [0], [0, 0])


def test_label_lengths_must_match_the_distance_matrix():
    with pytest.raises(KeyreidError, match="gallery_pids"):
        evaluation.evaluate_rankings([[0.1, 0.2]], [1], [1], [0], [0, 1])


def test_summary_reports_skipped_queries():
    result = evaluation.evaluate_rankings([[0.1], [0.1]], [1, 2], [1], [0, 0], [1])
    assert "1 of 2 queries had no match" in result.summary()


# ----------------------------------------------------------------------------- packaging

def test_data_modules_import_without_torch_pillow_or_scipy():
    code = ("import sys; sys.modules['torch'] = None; "
            "import keyreid.runtime.inputs.images, keyreid.runtime.inputs.poses, keyreid.runtime.inputs.tracklets, "
            "keyreid.runtime.results.evaluation, keyreid.runtime.inputs.mars; "
            "loaded = [name for name in ('PIL', 'scipy') if name in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
