"""The runtime's command-line tools: infer.py (tracklet embeddings, MARS and query/gallery
evaluation, the ranking figure) and compare.py (engine vs engine, engine vs a checkpoint's reference file).

Most runs call ``main(argv)`` in-process; a few subprocesses check the scripts' entry points and
that nothing on these paths needs torch. The exported model is the session's reduced one
(3200-d embeddings); known-answer tests use the toy model of ``toy_engine_model``, made
camera-blind so that distances follow the pixel values alone.
"""
import json
import signal
import time
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from keyreid.cli import run_main
from keyreid.errors import KeyreidError
from keyreid.comparator import Tolerance, compare_output
from keyreid import files as result_files
from keyreid.runtime import compare, infer
from keyreid.runtime.inputs import images, poses
from keyreid.runtime.results import ranking_figure
from keyreid.runtime.backends import open_engine
from keyreid.runtime.inputs.tracklets import discover_tracklets, split_into_clips
from keyreid.synthetic import write_synthetic_tracklet

from subprocesses import default_signal_handling
from toy_engine_model import build_toy_model

cv2 = pytest.importorskip("cv2")
onnx = pytest.importorskip("onnx")
numpy_helper = pytest.importorskip("onnx.numpy_helper")

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers

def write_frame(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]) if rgb.ndim == 3 and rgb.shape[2] == 3
                       else rgb)
    return path


def write_pose(path: Path, keypoints: np.ndarray) -> Path:
    path.write_text(json.dumps(np.asarray(keypoints).tolist()))
    return path


def realistic_tracklet(root: Path, name: str, num_frames: int, crop=(128, 256), suffix=".jpg", seed=0,
                       without_pose=()) -> Path:
    """Synthetic person frames with realistic .pose files; crops other than MARS's 128x256 vary
    by a few pixels from frame to frame, so per-frame sizes and keypoints are exercised."""
    return write_synthetic_tracklet(root / name, num_frames, np.random.default_rng(seed), crop_size=crop,
                                    size_jitter_px=0 if crop == (128, 256) else 6, suffix=suffix,
                                    without_pose=without_pose)


def gray_tracklet(root: Path, name: str, level: int, num_frames: int = 1, crop=(128, 256)) -> Path:
    """Frames of one grey level (PNG, lossless): the toy model's embedding is a function of it."""
    folder = root / name
    folder.mkdir(parents=True)
    for index in range(num_frames):
        write_frame(folder / f"{index:04d}.png", np.full((crop[1], crop[0], 3), level, np.uint8))
    return folder


def write_manifest(root: Path, rows) -> None:
    (root / "manifest.csv").write_text("tracklet,pid,camera\n" + "".join(f"{t},{p},{c}\n" for t, p, c in rows))


def edited_toy_model(path: Path, **edits) -> Path:
    """The toy model with some initializers transformed, e.g. ``thousand=lambda x: x * 0``."""
    build_toy_model(path)
    model = onnx.load(str(path))
    for initializer in model.graph.initializer:
        if initializer.name in edits:
            value = edits[initializer.name](numpy_helper.to_array(initializer))
            initializer.CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32), initializer.name))
    onnx.save(model, str(path))
    return path


def run_infer(*argv) -> int:
    return run_main(infer.main, [str(arg) for arg in argv])


def run_compare(*argv) -> int:
    return run_main(compare.main, [str(arg) for arg in argv])


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("cli_toy") / "toy.onnx")


@pytest.fixture(scope="module")
def camera_blind_model(tmp_path_factory):
    """Toy model without the camera term: embedding = mean pixels * (1, 2, 4, ...)."""
    return edited_toy_model(tmp_path_factory.mktemp("cli_toy") / "blind.onnx", thousand=lambda value: value * 0)


# ----------------------------------------------------------------------------- embeddings

# (name, frames, crop (width, height), suffix): MARS-sized and other crops, JPEG and PNG,
# lengths that make one clip by cycling (1, 3), exactly one, and a cycled second clip.
REALISTIC_TRACKLETS = [("a_single", 1, (128, 256), ".jpg"), ("b_short", 3, (64, 128), ".png"),
                       ("c_six", 6, (90, 300), ".jpg"), ("d_nine", 9, (170, 411), ".png")]


@pytest.fixture(scope="module")
def realistic_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("realistic")
    for seed, (name, num_frames, crop, suffix) in enumerate(REALISTIC_TRACKLETS):
        realistic_tracklet(root, name, num_frames, crop, suffix, seed=seed)
    return root


def direct_tracklet_features(engine_path, root, load_frame=images.load_frame):
    """docs/contract.md §4 by hand: every clip alone through the engine, then the mean."""
    features = {}
    with open_engine(engine_path, providers=["CPUExecutionProvider"]) as engine:
        for folder in sorted(path for path in root.iterdir() if path.is_dir()):
            frame_paths = sorted(path for path in folder.iterdir() if path.suffix in (".jpg", ".png"))
            embeddings = []
            for group in split_into_clips(len(frame_paths)):
                loaded = [load_frame(frame_paths[index]) for index in group]
                feed = {"frames": np.stack([frame for frame, _ in loaded])[None],
                        "keypoints": np.stack([poses.read_pose(frame_paths[index].with_suffix(".pose"))[0]
                                               for index in group])[None],
                        "crop_size": np.array([size for _, size in loaded], np.float32)[None],
                        "camera": np.array([0], np.int64)}
                embeddings.append(engine.infer(feed)["embedding"][0].astype(np.float64))
            features[folder.name] = np.mean(embeddings, axis=0)
    return features


def test_tracklet_embeddings_match_a_direct_run_of_the_protocol(reduced_onnx, realistic_dir, tmp_path):
    output = tmp_path / "embeddings.npz"
    assert run_infer("--engine", reduced_onnx, "--tracklets", realistic_dir, "--output", output, "-q") == 0
    saved = np.load(output)
    expected = direct_tracklet_features(reduced_onnx, realistic_dir)
    assert saved["tracklets"].tolist() == sorted(expected)
    assert saved["embeddings"].dtype == np.float32 and saved["embeddings"].shape == (4, 3200)
    comparison = compare_output("embedding", saved["embeddings"], np.stack([expected[name] for name in sorted(expected)]),
                                Tolerance(max_rel=1e-5))
    assert comparison.passed, comparison.failures


def test_opencv_preprocessing_agrees_with_upstreams_pil_path_on_other_crop_sizes(reduced_onnx, realistic_dir):
    """Upstream resizes with PIL (torchvision Resize); ours decodes with OpenCV. On crops that
    need resampling the tracklet embeddings must agree to cosine >= 0.9999."""
    ours = direct_tracklet_features(reduced_onnx, realistic_dir)
    upstream = direct_tracklet_features(reduced_onnx, realistic_dir, load_frame=images.load_frame_pil)
    for name, crop in ((name, crop) for name, _, crop, _ in REALISTIC_TRACKLETS if crop != (128, 256)):
        comparison = compare_output(name, ours[name][None], upstream[name][None], Tolerance(min_cosine=0.9999))
        assert comparison.passed, comparison.failures


def test_each_frame_of_a_clip_keeps_its_own_crop_size_keypoints_and_part_weights(reduced_onnx, realistic_dir):
    """Crop sizes and poses differ within a tracklet; the loader must keep frame i's own size and
    pose in slot i, and the engine's part weights W (tested directly, docs/contract.md §5) must be
    the reference op's on exactly those per-frame inputs."""
    from keyreid.kernels import part_weights_reference
    from keyreid.runtime.serving.pipeline import clip_loader, clip_requests
    from keyreid.runtime.serving.runner import Runner
    from keyreid.runtime.inputs.tracklets import discover_tracklets

    tracklet = next(t for t in discover_tracklets(realistic_dir).tracklets if t.name == "d_nine")
    requests = clip_requests(tracklet)
    clips = [clip_loader()(request) for request in requests]
    for request, clip in zip(requests, clips):
        for slot, frame_path in enumerate(request["frames"]):
            height, width = cv2.imread(str(frame_path)).shape[:2]
            assert clip["crop_size"][slot].tolist() == [width, height]
            assert np.array_equal(clip["keypoints"][slot], poses.read_pose(frame_path.with_suffix(".pose"))[0])
    sizes = {tuple(size) for clip in clips for size in clip["crop_size"].tolist()}
    assert len(sizes) > 3                                # the sizes really vary within the tracklet
    with open_engine(reduced_onnx) as engine, Runner(engine, max_queue_delay_ms=0) as runner:
        results = [runner.submit_clip(clip).result(timeout=60) for clip in clips]
    for clip, result in zip(clips, results):
        expected = part_weights_reference(clip["keypoints"][None], clip["crop_size"][None], "max")[0]
        np.testing.assert_allclose(result["part_weights"], expected, atol=1e-5)


def test_unlabelled_tracklets_get_unknown_pid_and_the_default_camera(toy_model, realistic_dir, tmp_path):
    output = tmp_path / "embeddings.npz"
    assert run_infer("--engine", toy_model, "--tracklets", realistic_dir, "--output", output,
                     "--camera", "-1", "-q") == 0
    saved = np.load(output)
    assert saved["pids"].tolist() == [-1] * 4 and saved["cameras"].tolist() == [-1] * 4


def test_progress_lines_report_clips_per_second(toy_model, realistic_dir, tmp_path, capsys):
    assert run_infer("--engine", toy_model, "--tracklets", realistic_dir, "--output", tmp_path / "e.npz",
                     "--progress-seconds", "0", "--workers", "2", "--max-batch", "2") == 0
    err = capsys.readouterr().err
    assert "4/4 tracklets, 7/7 clips" in err and "clips/s" in err


def test_help_explains_modes_options_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exited:
        infer.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in ("--tracklets", "--dataset", "--query", "--gallery", "--output", "--report", "--ranking-png",
                   "--camera", "--keep-going", "--providers", "--threads", "--max-batch", "--queue-delay-ms",
                   "--workers", "manifest.csv", "exit status"):
        assert option in text, option


# ----------------------------------------------------------------------------- evaluation

# Known answers on the camera-blind toy model, where distance = c * (level difference)^2.
# Queries in camera 0, gallery in camera 1 (plus one same-camera entry the protocol must drop).
QUERIES = [("q1", 1, 0, 50), ("q2", 2, 0, 150), ("q3", 9, 0, 250)]            # name, pid, camera, level
GALLERY = [("g_p1", 1, 1, 52), ("g_p3", 3, 1, 148), ("g_p2a", 2, 1, 155), ("g_p5", 5, 1, 160),
           ("g_p2b", 2, 1, 170), ("g_p4", 4, 1, 100), ("g_p2_same_camera", 2, 0, 150)]
# q1: its match is nearest -> rank 1, AP 1. q2: the same-camera twin is dropped; then
# p3, p2, p5, p2, ... -> first match at rank 2, AP (1/2 + 2/4) / 2. q3: no pid 9 -> skipped.
EXPECTED_CMC = {"1": 0.5, "5": 1.0, "10": 1.0, "20": 1.0}
EXPECTED_MAP = 0.75


@pytest.fixture(scope="module")
def evaluated(camera_blind_model, tmp_path_factory):
    """One query/gallery run writing every output; tests read the parts they check."""
    root = tmp_path_factory.mktemp("query_gallery")
    for set_name, rows in (("query", QUERIES), ("gallery", GALLERY)):
        for name, _, _, level in rows:
            gray_tracklet(root / set_name, name, level, num_frames=2 if name == "g_p2a" else 1,
                          crop=(64, 128) if name == "g_p3" else (128, 256))
        write_manifest(root / set_name, [(name, pid, camera) for name, pid, camera, _ in rows])
    outputs = {"report": root / "report.json", "png": root / "ranking.png", "npz": root / "all.npz"}
    code = run_infer("--engine", camera_blind_model, "--query", root / "query", "--gallery", root / "gallery",
                     "--report", outputs["report"], "--ranking-png", outputs["png"], "--output", outputs["npz"],
                     "--allow-no-pose", "-q")
    return code, outputs


def test_query_gallery_evaluation_matches_the_known_answers(evaluated):
    code, outputs = evaluated
    assert code == 0
    report = json.loads(outputs["report"].read_text())
    assert report["cmc"] == pytest.approx(EXPECTED_CMC)
    assert report["mAP"] == pytest.approx(EXPECTED_MAP)


def test_report_counts_queries_gallery_and_clips(evaluated):
    report = json.loads(evaluated[1]["report"].read_text())
    assert report["mode"] == "query_gallery"
    assert report["queries"] == {"tracklets": 3, "failed": 0, "unlabelled": 0, "ranked": 3, "evaluated": 2,
                                 "skipped_without_match": 1}
    assert report["gallery"] == {"tracklets": 7, "ranked": 7}
    assert report["failures"] == [] and report["clips"] == 10
    assert report["poses"]["missing"] == 11 and report["poses"]["read"] == 0     # no .pose files written


def test_evaluation_output_marks_query_rows(evaluated):
    saved = np.load(evaluated[1]["npz"])
    assert saved["is_query"].tolist() == [True] * 3 + [False] * 7
    in_name_order = sorted(QUERIES) + sorted(GALLERY)                # each set is read in folder-name order
    assert saved["tracklets"].tolist() == [name for name, _, _, _ in in_name_order]
    assert saved["pids"].tolist() == [pid for _, pid, _, _ in in_name_order]


def test_ranking_png_is_as_wide_as_its_longest_row_with_a_legend_under_it(evaluated):
    data = evaluated[1]["png"].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    # 3 queries and 7 gallery tracklets: 7 gallery columns, not the 10 of a larger gallery
    legend = len(ranking_figure.LEGEND)
    assert ranking_figure.figure_size(3, 7, legend_lines=legend) == (656, 560)
    assert image.shape == (560, 656, 3)
    x, _ = ranking_figure.cell_origin(0, 7)
    assert x + ranking_figure.CELL_WIDTH + ranking_figure.MARGIN == 656       # no blank margin
    for line, (colour, _) in enumerate(ranking_figure.LEGEND):               # a swatch per colour
        y = 560 - ranking_figure.MARGIN - (legend - line) * ranking_figure.LEGEND_LINE_HEIGHT
        assert tuple(image[y + 8, ranking_figure.MARGIN + 4]) == colour


def test_ranking_png_borders_are_green_for_the_same_identity_and_red_otherwise(evaluated):
    image = cv2.imdecode(np.frombuffer(evaluated[1]["png"].read_bytes(), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]

    def border(row, column):
        x, y = ranking_figure.cell_origin(row, column)
        return tuple(image[y + 1, x + 1])

    assert border(0, 1) == ranking_figure.MATCH_BORDER           # q1's nearest is pid 1
    assert border(1, 1) == ranking_figure.MISMATCH_BORDER        # q2's nearest is pid 3 ...
    assert border(1, 2) == ranking_figure.MATCH_BORDER           # ... then pid 2
    assert border(0, 0) == ranking_figure.QUERY_BORDER
    assert border(0, 7) in (ranking_figure.MATCH_BORDER, ranking_figure.MISMATCH_BORDER)   # the 7th entry


# ----------------------------------------------------------------------------- MARS

# (pid, camera 1-based, tracklet, frames, grey level); query rows 1 and 3 (1-based).
MARS_TRACKS = [(1, 1, 1, 2, 60), (1, 2, 1, 3, 62), (2, 1, 2, 2, 180), (2, 3, 1, 1, 178),
               (-1, 3, 1, 1, 100), (3, 2, 1, 5, 120)]
MARS_QUERY_ROWS = [1, 3]


def build_mars_tree(root: Path) -> Path:
    scipy_io = pytest.importorskip("scipy.io")
    names, table = [], []
    for pid, camera, tracklet, num_frames, level in MARS_TRACKS:
        pid_text = "00-1" if pid == -1 else f"{pid:04d}"
        start = len(names) + 1
        for frame in range(1, num_frames + 1):
            name = f"{pid_text}C{camera}T{tracklet:04d}F{frame:03d}.jpg"
            names.append(name)
            folder = root / "bbox_test" / pid_text
            folder.mkdir(parents=True, exist_ok=True)
            write_frame(folder / name, np.full((256, 128, 3), level, np.uint8))
            if (pid, frame) != (3, 5):                                 # one pose file missing
                pose_folder = root / "keypoints" / "bbox_test" / pid_text
                pose_folder.mkdir(parents=True, exist_ok=True)
                write_pose(pose_folder / name.replace(".jpg", ".pose"), np.zeros((17, 3)))
        table.append([start, len(names), pid, camera])
    (root / "info").mkdir()
    (root / "info" / "test_name.txt").write_text("\n".join(names) + "\n")
    scipy_io.savemat(str(root / "info" / "tracks_test_info.mat"), {"track_test_info": np.array(table, np.int32)})
    scipy_io.savemat(str(root / "info" / "query_IDX.mat"), {"query_IDX": np.array([MARS_QUERY_ROWS], np.int32)})
    return root


def test_mars_mode_evaluates_the_test_split(camera_blind_model, tmp_path, capsys):
    root = build_mars_tree(tmp_path / "MARS")
    report_path = tmp_path / "mars.json"
    assert run_infer("--engine", camera_blind_model, "--dataset", "mars", "--root", root,
                     "--report", report_path, "-q") == 0
    report = json.loads(report_path.read_text())
    assert report["mAP"] == pytest.approx(1.0) and report["cmc"]["1"] == pytest.approx(1.0)
    assert report["queries"]["tracklets"] == 2 and report["gallery"]["tracklets"] == 3   # junk row skipped
    assert report["dataset"]["junk_rows"] == 1
    assert report["poses"]["missing"] == 1 and report["poses"]["read"] == 12
    assert "mAP 100.00%, rank-1 100.00%" in capsys.readouterr().out


def test_mars_mode_without_root_is_a_usage_error(toy_model, capsys):
    with pytest.raises(SystemExit) as exited:
        infer.main(["--engine", str(toy_model), "--dataset", "mars"])
    assert exited.value.code == 2 and "--root" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def good_pair(tmp_path):
    """Two good tracklets under tmp_path/tracklets (the tests add a bad one)."""
    root = tmp_path / "tracklets"
    gray_tracklet(root, "a_good", 40, num_frames=2)
    gray_tracklet(root, "c_good", 90, num_frames=5)
    return root


def test_corrupt_frame_fails_only_its_tracklet(toy_model, good_pair, tmp_path, capsys):
    bad = gray_tracklet(good_pair, "b_bad", 70, num_frames=3)
    (bad / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    output = tmp_path / "out.npz"
    assert run_infer("--engine", toy_model, "--tracklets", good_pair, "--output", output, "-q") == 1
    captured = capsys.readouterr()
    assert np.load(output)["tracklets"].tolist() == ["a_good", "c_good"]
    assert "tracklets: 2 done, 1 failed" in captured.out
    assert "failed b_bad: cannot decode frame" in captured.out and "0001.png" in captured.out
    assert "1 tracklet(s) failed" in captured.err


def test_keep_going_exits_zero_when_a_tracklet_failed(toy_model, good_pair, tmp_path):
    bad = gray_tracklet(good_pair, "b_bad", 70)
    (bad / "0000.png").write_bytes(b"not an image")
    output = tmp_path / "out.npz"
    assert run_infer("--engine", toy_model, "--tracklets", good_pair, "--output", output, "--keep-going",
                     "--allow-no-pose", "-q") == 0
    assert np.load(output)["tracklets"].tolist() == ["a_good", "c_good"]


def test_empty_tracklet_folder_is_a_failure_and_the_others_run(toy_model, good_pair, tmp_path, capsys):
    (good_pair / "b_empty").mkdir()
    output = tmp_path / "out.npz"
    assert run_infer("--engine", toy_model, "--tracklets", good_pair, "--output", output, "-q") == 1
    assert "failed b_empty: no frames" in capsys.readouterr().out
    assert len(np.load(output)["tracklets"]) == 2


def test_grayscale_and_rgba_frames_become_rgb(toy_model, tmp_path):
    root = tmp_path / "tracklets"
    for name, channels in (("gray", None), ("rgb", 3), ("rgba", 4)):
        folder = root / name
        folder.mkdir(parents=True)
        image = np.full((256, 128), 77, np.uint8) if channels is None else np.full((256, 128, channels), 77, np.uint8)
        assert cv2.imwrite(str(folder / "0000.png"), image)
    output = tmp_path / "out.npz"
    assert run_infer("--engine", toy_model, "--tracklets", root, "--output", output, "--allow-no-pose", "-q") == 0
    embeddings = np.load(output)["embeddings"]
    assert np.array_equal(embeddings[0], embeddings[1]) and np.array_equal(embeddings[2], embeddings[1])


def test_16_bit_frame_fails_its_tracklet_with_the_reason(toy_model, good_pair, tmp_path, capsys):
    folder = good_pair / "b_deep"
    folder.mkdir()
    assert cv2.imwrite(str(folder / "0000.png"), np.full((256, 128, 3), 1000, np.uint16))
    assert run_infer("--engine", toy_model, "--tracklets", good_pair, "--output", tmp_path / "o.npz", "-q") == 1
    assert "failed b_deep: frame" in capsys.readouterr().out


def test_directory_without_tracklets_is_a_one_line_error(toy_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_infer("--engine", toy_model, "--tracklets", tmp_path / "empty", "--output", tmp_path / "o.npz",
                     "-q") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no tracklet folders in") and err.count("\n") == 1
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("content", ["truncated", "not a model"])
def test_bad_engine_file_is_a_one_line_error(toy_model, good_pair, tmp_path, capsys, content):
    engine = tmp_path / "bad.onnx"
    data = toy_model.read_bytes()
    engine.write_bytes(data[:len(data) // 2] if content == "truncated" else b"hello, I am a text file\n")
    assert run_infer("--engine", engine, "--tracklets", good_pair, "--output", tmp_path / "o.npz", "-q") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {engine}: cannot be loaded as an ONNX model") and err.count("\n") == 1
    assert "Traceback" not in err


def test_camera_option_out_of_range_is_a_clear_error(toy_model, good_pair, tmp_path, capsys):
    assert run_infer("--engine", toy_model, "--tracklets", good_pair, "--output", tmp_path / "o.npz",
                     "--camera", "6", "-q") == 1
    assert "error: --camera 6: camera 6 is out of range: this model takes 0..5" in capsys.readouterr().err


def test_an_engine_without_a_camera_count_asks_for_num_cameras_not_for_an_unpassed_camera(good_pair):
    """As a PyTriton server's model: no camera count published (tests/test_triton.py runs it against
    a real server). The error names the flag to add, never --camera when it was not passed."""
    tracklets = discover_tracklets(good_pair, default_camera=0).tracklets
    with pytest.raises(KeyreidError) as error:
        infer.check_cameras(None, tracklets, num_cameras=None)
    message = str(error.value)
    assert message.startswith("the engine does not record how many cameras")
    assert "add --num-cameras C" in message and "--camera:" not in message
    infer.check_cameras(None, tracklets, num_cameras=6)
    infer.check_cameras(-1, discover_tracklets(good_pair, default_camera=-1).tracklets, num_cameras=None)


def test_a_model_file_without_a_camera_count_is_refused_naming_the_key(good_pair, tmp_path, capsys):
    engine = build_toy_model(tmp_path / "no_count.onnx", num_cameras=None)
    assert run_infer("--engine", engine, "--tracklets", good_pair, "--output", tmp_path / "o.npz", "-q") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {engine}: its keyreid metadata") and "missing key 'num_cameras'" in err
    assert not (tmp_path / "o.npz").exists()


def test_manifest_camera_out_of_range_fails_that_tracklet(toy_model, good_pair, tmp_path, capsys):
    write_manifest(good_pair, [("a_good", 1, 9)])
    assert run_infer("--engine", toy_model, "--tracklets", good_pair, "--output", tmp_path / "o.npz", "-q") == 1
    assert "failed a_good: camera 9 is out of range" in capsys.readouterr().out
    assert np.load(tmp_path / "o.npz")["tracklets"].tolist() == ["c_good"]


def test_negative_camera_option_is_a_usage_error(toy_model, good_pair, tmp_path):
    with pytest.raises(SystemExit) as exited:
        infer.main(["--engine", str(toy_model), "--tracklets", str(good_pair), "--output", str(tmp_path / "o.npz"),
                    "--camera", "-2"])
    assert exited.value.code == 2


def test_missing_pose_file_is_counted_not_failed(toy_model, tmp_path, capsys):
    root = tmp_path / "tracklets"
    realistic_tracklet(root, "walker", 5, without_pose={2})
    assert run_infer("--engine", toy_model, "--tracklets", root, "--output", tmp_path / "o.npz", "-q") == 0
    out = capsys.readouterr().out
    assert "tracklets: 1 done, 0 failed" in out
    assert "pose files: 4 read, 1 missing" in out and "0002.pose" in out


def test_nothing_is_written_when_every_tracklet_fails(toy_model, tmp_path, capsys):
    root = tmp_path / "tracklets"
    (gray_tracklet(root, "only", 10) / "0000.png").write_bytes(b"broken")
    output = tmp_path / "out.npz"
    assert run_infer("--engine", toy_model, "--tracklets", root, "--output", output, "-q") == 1
    assert "error: no tracklet produced a feature" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["tracklets"]


def test_interrupted_write_keeps_the_old_file_and_leaves_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "out.npz"
    target.write_bytes(b"previous")

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(result_files.os, "replace", failing_replace)
    with pytest.raises(KeyreidError, match="No space left"):
        result_files.write_npz(target, {"embeddings": np.zeros((2, 3), np.float32)})
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.npz"]


def test_unwritable_output_is_refused_before_running(toy_model, good_pair, tmp_path, capsys):
    assert run_infer("--engine", toy_model, "--tracklets", good_pair, "--output", tmp_path / "nowhere" / "o.npz",
                     "-q") == 1
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- compare.py

def table_row(output: str, name: str):
    row = next(line for line in output.splitlines() if line.startswith(name))
    return [float(value) for value in row.split()[1:6]]     # max abs, mean abs, p99 abs, max rel, cosine


def test_compare_engine_with_itself_agrees_exactly(reduced_onnx, capsys):
    assert run_compare("--engine", reduced_onnx, "--engine", reduced_onnx, "--clips", "6") == 0
    out = capsys.readouterr().out
    assert table_row(out, "embedding")[:4] == [0, 0, 0, 0]
    assert table_row(out, "part_weights")[:4] == [0, 0, 0, 0]
    assert "6/6 clips agree" in out and out.rstrip().endswith("PASS")


@pytest.fixture(scope="module")
def reduced_reference(reduced_checkpoint, tmp_path_factory):
    """Reference results of the reduced checkpoint, written by the export CLI."""
    from keyreid.export.reference_outputs import main
    output = tmp_path_factory.mktemp("reference") / "reduced_reference.npz"
    assert main([str(reduced_checkpoint), "-o", str(output), "--clips", "6", "-q"]) == 0
    return output


def test_compare_engine_with_its_checkpoints_reference_file_passes_at_fp32_tolerance(reduced_onnx, reduced_reference,
                                                                                       capsys):
    assert run_compare("--engine", reduced_onnx, "--reference", reduced_reference, "--min-agreement", "1") == 0
    out = capsys.readouterr().out
    assert "heatmap mode max" in out and "6 clips of" in out
    assert table_row(out, "embedding")[3] <= 1e-4


def test_compare_with_a_reference_file_of_another_heatmap_mode_warns_and_fails(reduced_onnx, reduced_checkpoint,
                                                                                 tmp_path, capsys):
    from keyreid.export.reference_outputs import main
    reference = tmp_path / "blank.npz"
    assert main([str(reduced_checkpoint), "-o", str(reference), "--clips", "3", "--heatmap-mode", "blank", "-q"]) == 0
    assert run_compare("--engine", reduced_onnx, "--reference", reference) == 1
    captured = capsys.readouterr()
    assert "heatmap mode max, the reference file used blank" in captured.err
    assert "FAIL: " in captured.out and "part_weights: max abs error" in captured.out


@pytest.mark.parametrize("content", [b"", b"not an npz", None])
def test_compare_with_a_file_that_is_not_a_reference_is_a_one_line_error(toy_model, tmp_path, capsys, content):
    path = tmp_path / "ref.npz"
    if content is None:
        np.savez(path, something=np.zeros(3))
    else:
        path.write_bytes(content)
    assert run_compare("--engine", toy_model, "--reference", path) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a reference file" in err and err.count("\n") == 1


def test_compare_mismatching_models_exits_1(toy_model, tmp_path, capsys):
    other = edited_toy_model(tmp_path / "scaled.onnx", projection=lambda value: value * 1.5)
    assert run_compare("--engine", other, "--engine", toy_model, "--clips", "4") == 1
    out = capsys.readouterr().out
    assert "FAIL: embedding: relative error" in out


def test_compare_on_clips_from_tracklets(toy_model, realistic_dir, capsys):
    assert run_compare("--engine", toy_model, "--engine", toy_model, "--tracklets", realistic_dir) == 0
    assert "7 clips from" in capsys.readouterr().out


def test_retrieval_agreement_counts_identical_top_k_lists():
    base = np.array([[0.0], [1.0], [3.0], [7.0]])
    swapped = np.array([[0.0], [2.1], [1.9], [7.0]])      # clips 1 and 2 swap places
    agreement = compare.retrieval_agreement(swapped, base, top_k=1)
    assert (agreement.top_k, agreement.clips) == (1, 4)
    # nearest neighbour: base [1, 0, 1, 2], swapped [2, 2, 1, 1] -> only clip 2 agrees
    assert agreement.agreeing == 1


# ----------------------------------------------------------------------------- entry points

def test_infer_script_runs_from_the_repository(toy_model, good_pair, tmp_path):
    output = tmp_path / "out.npz"
    result = subprocess.run([sys.executable, "runtime/infer.py", "--engine", str(toy_model), "--tracklets",
                             str(good_pair), "--output", str(output), "--allow-no-pose"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[3/4] running 2 tracklets (3 clips)" in result.stderr
    assert np.load(output)["embeddings"].shape == (2, 100)


def test_compare_script_runs_from_the_repository(toy_model):
    result = subprocess.run([sys.executable, "runtime/compare.py", "--engine", str(toy_model), "--engine",
                             str(toy_model), "--clips", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("PASS")


def test_runtime_tools_import_and_run_without_torch(toy_model, good_pair, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None          # any import of torch now fails
        import keyreid.runtime.infer, keyreid.runtime.compare, keyreid.runtime.serving.pipeline
        import keyreid.runtime.results.ranking_figure, keyreid.runtime.cli_args
        assert keyreid.runtime.infer.main(["--engine", {str(toy_model)!r}, "--tracklets", {str(good_pair)!r},
                                           "--output", {str(tmp_path / 'o.npz')!r}, "--allow-no-pose", "-q"]) == 0
        assert keyreid.runtime.compare.main(["--engine", {str(toy_model)!r}, "--engine", {str(toy_model)!r},
                                             "--clips", "2"]) == 0
        assert not any(name.startswith("keyreid.export") for name in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_summary_counts_folder_entries_that_are_neither_frames_nor_poses(toy_model, good_pair, tmp_path, capsys):
    (good_pair / "a_good" / "notes.bmp").write_bytes(b"x")
    (good_pair / "a_good" / "0000.png.txt").write_text("x")
    assert run_infer("--engine", toy_model, "--tracklets", good_pair, "--output", tmp_path / "o.npz",
                     "--allow-no-pose", "-q") == 0
    assert "ignored 2 entries of tracklet folders" in capsys.readouterr().out


def test_tracklets_without_any_keypoints_are_named_and_fail_unless_allowed(toy_model, tmp_path, capsys):
    root = tmp_path / "tracklets"
    for name in ("a", "b"):
        gray_tracklet(root, name, 50, num_frames=3)                # crops only: no .pose file at all
    realistic_tracklet(root, "c_posed", 3, crop=(128, 256))
    assert run_infer("--engine", toy_model, "--tracklets", root, "--output", tmp_path / "o.npz", "-q") == 1
    captured = capsys.readouterr()
    assert "frames without a pose: 6 of 9" in captured.out
    assert [line for line in captured.err.splitlines() if line.startswith("warning: tracklet")] == [
        f"warning: tracklet {name} has no keypoints at all (no .pose file or keypoints.json entry for any frame): "
        "its part features carry no pose information" for name in ("a", "b")]
    assert "error: 2 tracklet(s) have no keypoints at all" in captured.err
    assert len(np.load(tmp_path / "o.npz")["tracklets"]) == 3                  # written all the same
    assert run_infer("--engine", toy_model, "--tracklets", root, "--output", tmp_path / "o.npz",
                     "--allow-no-pose", "-q") == 0
    assert "warning: tracklet a has no keypoints" in capsys.readouterr().err


def test_a_symlink_looping_back_to_its_tracklet_folder_fails_that_tracklet(toy_model, good_pair, tmp_path, capsys):
    (good_pair / "a_good" / "again").symlink_to(good_pair / "a_good")
    (good_pair / "z_root").symlink_to(good_pair)
    assert run_infer("--engine", toy_model, "--tracklets", good_pair, "--output", tmp_path / "o.npz",
                     "--allow-no-pose", "-q") == 1
    out = capsys.readouterr().out
    assert "failed a_good: again is a symbolic link that loops" in out
    assert "failed z_root: a symbolic link to the tracklets folder itself" in out
    assert np.load(tmp_path / "o.npz")["tracklets"].tolist() == ["c_good"]


def test_frame_above_the_size_limit_fails_only_its_tracklet(toy_model, good_pair, tmp_path, capsys):
    gray_tracklet(good_pair, "b_huge", 70, crop=(64, 300))
    assert run_infer("--engine", toy_model, "--tracklets", good_pair, "--output", tmp_path / "o.npz",
                     "--max-frame-side", "256", "-q") == 1
    out = capsys.readouterr().out
    assert "2 done, 1 failed" in out and "failed b_huge: frame" in out and "above the limit of 256" in out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_infer_cancels_the_queued_clips_and_exits_promptly(toy_model, tmp_path, signum):
    root = tmp_path / "tracklets"
    for index in range(30):
        gray_tracklet(root, f"t{index:02d}", index, num_frames=8)
    calls = tmp_path / "calls.txt"
    script = textwrap.dedent(f"""
        import sys, time
        from keyreid.cli import run_main
        from keyreid.runtime.backends import onnxruntime as engine_ort
        from keyreid.runtime import infer
        original = engine_ort.OrtEngine.infer_impl
        def slow(self, feed):
            with open({str(calls)!r}, "a") as log:
                log.write(f"{{time.monotonic()}}\\n")
            time.sleep(0.2)
            return original(self, feed)
        engine_ort.OrtEngine.infer_impl = slow
        sys.exit(run_main(infer.main, ["--engine", {str(toy_model)!r}, "--tracklets", {str(root)!r},
                                       "-o", {str(tmp_path / "out.npz")!r}, "--max-batch", "1", "-q"]))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=default_signal_handling)
    deadline = time.monotonic() + 60
    while not (calls.exists() and len(calls.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    signalled = time.monotonic()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert time.monotonic() - signalled < 5
    after = [float(line) for line in calls.read_text().splitlines() if float(line) > signalled]
    assert len(after) <= 1                       # at most the batch already on its way
    assert len(calls.read_text().splitlines()) < 60 * 0.5
    assert sorted(os.listdir(tmp_path)) == ["calls.txt", "tracklets"]
