"""runtime/stream.py on generated videos: the stream path gives infer.py's embeddings on the same
crops cut by hand, in every track format; stride; outputs, matches and the figure; the hostile
cases (damaged videos, bad records, boxes outside the frame, NaN joints, a lagging engine) and
SIGTERM mid-stream. The model is the session's reduced ONNX file (3200-d embeddings)."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from keyreid.cli import run_main
from keyreid.runtime import gallery as gallery_module, infer, stream
from keyreid.runtime.inputs.crops import crop_window, cut_person

from stream_helpers import (FRAME_SIZE, cut_by_hand, decoded_frames, leftover_partials,
                            relative_error, stream_outputs, write_mot, write_scene_video, write_ultralytics_json,
                            write_ultralytics_txt)
from keyreid.synthetic_video import write_jsonl
from subprocesses import default_signal_handling

cv2 = pytest.importorskip("cv2")
REPO = Path(__file__).resolve().parents[1]
NUM_FRAMES = 36


def run_stream(*argv) -> int:
    return run_main(stream.main, [str(arg) for arg in argv])


def run_infer(*argv) -> int:
    return run_main(infer.main, [str(arg) for arg in argv])


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Two cameras: MJPEG videos written by OpenCV's VideoWriter and their exact records."""
    folder = tmp_path_factory.mktemp("scene")
    cameras = []
    for camera, (seed, people) in enumerate(((3, 3), (4, 2))):
        video = folder / f"cam{camera}.avi"
        records = write_scene_video(video, seed, NUM_FRAMES, people, first_track=10 * camera + 1)
        tracks = write_jsonl(folder / f"cam{camera}.jsonl", records)
        cameras.append({"video": video, "records": records, "tracks": tracks})
    return cameras


@pytest.fixture(scope="module")
def jsonl_run(scene, reduced_onnx, tmp_path_factory):
    """The two cameras through stream.py (JSON Lines tracks), with the figure."""
    out = tmp_path_factory.mktemp("jsonl_run")
    started = time.monotonic()
    argv = ["--engine", reduced_onnx, "-o", out, "--figure", "-q"]
    for camera in scene:
        argv += ["--stream", camera["video"], camera["tracks"]]
    assert run_stream(*argv) == 0
    return {"out": out, "seconds": time.monotonic() - started, **stream_outputs(out)}


# --- the crop rule --------------------------------------------------------------------------

@pytest.mark.parametrize("box, window", [
    ((10.4, 20.5, 30.0, 40.49), (10, 21, 40, 61)),         # edges round half up
    ((-5.0, -7.6, 20.0, 30.0), (0, 0, 15, 22)),            # clipped at the top-left
    ((240.2, 190.0, 30.0, 30.0), (240, 190, 250, 200)),    # clipped at the bottom-right
    ((260.0, 10.0, 5.0, 5.0), None),                       # wholly outside
    ((10.0, 10.0, 0.3, 20.0), None),                       # no whole pixel wide
    ((10.0, float("nan"), 5.0, 5.0), None), ((1.0, 1.0, -3.0, 5.0), None),
])
def test_crop_window_rounds_half_up_and_clips_to_the_frame(box, window):
    found = crop_window(box, *FRAME_SIZE)
    assert (found and (found.left, found.top, found.right, found.bottom)) == window


def test_keypoints_move_into_the_crop_and_nan_joints_are_cleared():
    frame = np.arange(200 * 250 * 3, dtype=np.uint32).astype(np.uint8).reshape(200, 250, 3)
    joints = np.tile([[30.0, 40.0, 0.9]], (17, 1))
    joints[3] = [np.nan, 5.0, 0.9]
    joints[4] = [12.0, 13.0, -0.5]
    crop = cut_person(frame, (20.5, 30.2, 50, 60), joints)
    assert (crop.window.left, crop.window.top) == (21, 30)
    np.testing.assert_array_equal(crop.image, frame[30:90, 21:71])
    assert crop.keypoints.dtype == np.float32 and crop.cleared_joints == 2
    np.testing.assert_array_equal(crop.keypoints[0], np.float32([9.0, 10.0, 0.9]))
    np.testing.assert_array_equal(crop.keypoints[3:5], 0.0)


# --- equal to infer.py on the same crops ----------------------------------------------------

def test_stream_embeddings_equal_infer_on_the_same_crops_cut_by_hand(scene, jsonl_run, reduced_onnx, tmp_path):
    folders = {}
    for camera, data in enumerate(scene):
        folders.update(cut_by_hand(decoded_frames(data["video"]), data["records"], tmp_path / f"cut{camera}", camera))
    expected = {}
    for camera in range(len(scene)):
        output = tmp_path / f"infer{camera}.npz"
        assert run_infer("--engine", reduced_onnx, "--tracklets", tmp_path / f"cut{camera}", "-o", output, "-q") == 0
        saved = np.load(output)
        expected.update({f"cam{camera}/" + str(name).split("_", 1)[1]: row
                         for name, row in zip(saved["tracklets"], saved["embeddings"])})
    assert set(jsonl_run["embeddings"]) == set(expected) == set(folders)
    assert len(expected) == 5
    for name, embedding in jsonl_run["embeddings"].items():
        assert relative_error(embedding, expected[name]) <= 1e-5, name


def test_each_track_line_is_whole_and_its_embedding_is_the_npz_row(jsonl_run):
    lines = {line["name"]: line for line in jsonl_run["lines"]}
    assert set(lines) == set(jsonl_run["embeddings"])
    for name, line in lines.items():
        np.testing.assert_array_equal(np.float32(line["embedding"]), jsonl_run["embeddings"][name])
        assert 0 < line["frames_used"] <= line["frames_seen"]
        assert line["clips"] == -(-line["frames_used"] // 4) and line["has_pose"] and line["error"] is None
        assert line["first_time"] == pytest.approx(line["first_frame"] / 25.0)


def test_matches_are_the_gallery_search_of_tracks_finished_before_on_other_cameras(jsonl_run):
    gallery = gallery_module.Gallery.load(jsonl_run["out"] / "gallery.npz")
    assert len(gallery) == len(jsonl_run["lines"])
    finished = []
    for line in jsonl_run["lines"]:              # in the order they finished
        earlier = gallery_module.Gallery(gallery.dim)
        for name, camera in finished:
            earlier.add(jsonl_run["embeddings"][name], camera=camera, name=name)
        expected = earlier.search(jsonl_run["embeddings"][line["name"]], k=5, camera=line["camera"], exclude="camera")
        assert [match["name"] for match in line["matches"]] == [match.name for match in expected]
        assert all(match["camera"] != line["camera"] for match in line["matches"])
        finished.append((line["name"], line["camera"]))
    assert any(line["matches"] for line in jsonl_run["lines"])


def test_the_figure_shows_each_track_beside_its_matches_without_a_blank_margin(jsonl_run):
    image = cv2.imread(str(jsonl_run["out"] / "tracks.png"))
    from keyreid.runtime.results import ranking_figure
    columns = 4 + max(len(line["matches"]) for line in jsonl_run["lines"])
    width, height = ranking_figure.figure_size(len(jsonl_run["lines"]), columns - 4, 4, legend_lines=3)
    assert image.shape[0] == height and image.shape[1] >= width
    right = image[:, width - ranking_figure.MARGIN - 2]
    assert (right != 255).any()      # the last column holds a match: no blank margin


@pytest.mark.parametrize("track_format", ["ultralytics-json", "ultralytics-txt", "mot"])
def test_every_track_format_gives_the_same_embeddings(scene, jsonl_run, reduced_onnx, tmp_path, track_format):
    argv = ["--engine", reduced_onnx, "-o", tmp_path / "out", "-q"]
    for camera, data in enumerate(scene):
        if track_format == "ultralytics-json":
            tracks, extra = write_ultralytics_json(tmp_path / f"cam{camera}.json", data["records"], NUM_FRAMES), []
        elif track_format == "ultralytics-txt":
            tracks, extra = write_ultralytics_txt(tmp_path / f"labels{camera}", data["records"]), []
        else:
            tracks = write_mot(tmp_path / f"cam{camera}.txt", tmp_path / f"kp{camera}.csv", data["records"])
            extra = [f"keypoints={tmp_path / f'kp{camera}.csv'}"]
        argv += ["--stream", data["video"], tracks, *extra]
    assert run_stream(*argv) == 0
    found = stream_outputs(tmp_path / "out")["embeddings"]
    assert set(found) == set(jsonl_run["embeddings"])
    for name, embedding in found.items():
        assert relative_error(embedding, jsonl_run["embeddings"][name]) <= 1e-5, name


def test_stride_embeds_every_nth_usable_crop_like_infer_on_those_crops(scene, reduced_onnx, tmp_path):
    data = scene[0]
    assert run_stream("--engine", reduced_onnx, "--stream", data["video"], data["tracks"], "--stride", 3,
                      "-o", tmp_path / "out", "-q") == 0
    found = stream_outputs(tmp_path / "out")
    cut_by_hand(decoded_frames(data["video"]), data["records"], tmp_path / "cut", 0, stride=3)
    assert run_infer("--engine", reduced_onnx, "--tracklets", tmp_path / "cut", "-o", tmp_path / "i.npz", "-q") == 0
    saved = np.load(tmp_path / "i.npz")
    for name, row in zip(saved["tracklets"], saved["embeddings"]):
        assert relative_error(found["embeddings"]["cam0/" + str(name).split("_", 1)[1]], row) <= 1e-5
    for line in found["lines"]:
        assert line["frames_used"] == -(-line["frames_seen"] // 3) or line["frames_used"] < line["frames_seen"]


# --- hostile input --------------------------------------------------------------------------

def test_bad_records_boxes_outside_nan_joints_and_missing_frames_are_skipped_and_counted(scene, reduced_onnx,
                                                                                            tmp_path, capsys):
    data = scene[0]
    records = [dict(record, people=[dict(person) for person in record["people"]]) for record in data["records"]]
    records[5]["people"][0]["keypoints"] = [float("nan")] * 3 + records[5]["people"][0]["keypoints"][3:]
    records[6]["people"].append({"track": 99, "box": [400, 10, 20, 40], "keypoints": None})   # outside the frame
    lines = [json.dumps(record) for record in records if record["frame"] not in (8, 9)]      # frames without tracks
    lines.insert(3, "{not json")
    lines.insert(4, json.dumps({"frame": 2, "people": [{"track": 1, "box": [0, 0, 5]}]}))
    lines.append(json.dumps({"frame": 500, "people": []}))                                   # past the end
    tracks = tmp_path / "bad.jsonl"
    tracks.write_text("\n".join(lines).replace("NaN", "null") + "\n")
    assert run_stream("--engine", reduced_onnx, "--stream", data["video"], tracks, "-o", tmp_path / "out", "-q") == 0
    out = capsys.readouterr().out
    assert "track records unreadable: 2 skipped (e.g." in out and "line 4: not JSON" in out
    assert "line 5: box must be 4 numbers" in out
    outside = sum(crop_window(person["box"], *FRAME_SIZE) is None for record in records for person in record["people"]
                  if record["frame"] not in (8, 9))
    assert f"{outside} boxes with no pixel in the frame" in out and "1 joints with NaN/inf" in out
    assert "1 without a usable crop" in out
    assert "1 track records for frames that never came" in out
    without = sum(1 for record in records if not record["people"] and record["frame"] not in (8, 9)) + 2
    assert f"{without} frames without tracks" in out
    lines_out = stream_outputs(tmp_path / "out")["lines"]
    assert {line["name"] for line in lines_out} >= {"cam0/track1", "cam0/track99"}
    assert [line["error"] for line in lines_out if line["name"] == "cam0/track99"] == [
        "no box of this track had pixels inside the frame"]


def test_a_damaged_video_fails_its_stream_and_the_other_camera_goes_on(scene, reduced_onnx, tmp_path, capsys):
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"RIFF" + os.urandom(4000))
    assert run_stream("--engine", reduced_onnx, "--stream", garbage, scene[0]["tracks"], "--stream",
                      scene[1]["video"], scene[1]["tracks"], "-o", tmp_path / "out", "-q") == 1
    captured = capsys.readouterr()
    assert "error: camera 0" in captured.err and "cannot read the video file" in captured.err
    names = {line["name"] for line in stream_outputs(tmp_path / "out")["lines"]}
    assert names and all(name.startswith("cam1/") for name in names)


def test_a_truncated_video_is_reported_and_its_tracks_so_far_are_written(scene, reduced_onnx, tmp_path, capsys):
    data = scene[0]
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data["video"].read_bytes()[:int(data["video"].stat().st_size * 0.5)])
    assert run_stream("--engine", reduced_onnx, "--stream", truncated, data["tracks"], "-o", tmp_path / "out",
                      "-q") == 0
    out = capsys.readouterr().out
    assert "the video ended after" in out and f"of the {NUM_FRAMES} frames its header announces" in out
    assert "track records for frames that never came" in out
    lines = stream_outputs(tmp_path / "out")["lines"]
    assert lines and all(line["embedding"] is not None for line in lines)


def test_a_track_without_keypoints_is_named_and_fails_unless_allowed(scene, reduced_onnx, tmp_path, capsys):
    data = scene[1]
    records = [dict(record, people=[dict(person, keypoints=None) if person["track"] == 11 else person
                                    for person in record["people"]]) for record in data["records"]]
    tracks = write_jsonl(tmp_path / "no_pose.jsonl", records)
    argv = ["--engine", reduced_onnx, "--stream", data["video"], tracks, "-q"]
    assert run_stream(*argv, "-o", tmp_path / "a") == 1
    err = capsys.readouterr().err
    assert "warning: cam0/track11 used no keypoints at all" in err and "error: 1 track(s) used no keypoints" in err
    assert run_stream(*argv, "-o", tmp_path / "b", "--allow-no-pose") == 0
    assert "cam0/track11 used no keypoints" in capsys.readouterr().err


def test_bad_usage_and_outputs_that_are_inputs_are_refused_before_anything_runs(scene, reduced_onnx, tmp_path, capsys):
    data = scene[0]
    with pytest.raises(SystemExit) as usage:
        stream.main(["--engine", str(reduced_onnx), "--stream", str(data["video"]), "-o", str(tmp_path)])
    assert usage.value.code == 2 and "needs SOURCE and TRACKS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stream.main(["--engine", str(reduced_onnx), "--stream", str(data["video"]), str(data["tracks"]), "speed=2",
                     "-o", str(tmp_path)])
    assert "'speed=2' is not one of camera=..." in capsys.readouterr().err
    assert run_stream("--engine", reduced_onnx, "--stream", data["video"], tmp_path / "tracks.jsonl",
                      "-o", tmp_path) == 1
    assert "is the tracks" in capsys.readouterr().err
    assert run_stream("--engine", reduced_onnx, "--stream", data["video"], data["tracks"], "camera=9",
                      "-o", tmp_path / "o") == 1
    assert "camera 9" in capsys.readouterr().err


def slow_engine_stream(delay_s: float, *argv) -> str:
    """A script running stream.py with ``argv`` in a process of its own, every engine call slowed by
    ``delay_s`` (the fault injected: an engine that lags behind a live stream)."""
    return textwrap.dedent(f"""
        import sys, time
        from keyreid.cli import run_main
        from keyreid.runtime.backends import onnxruntime as engine_ort
        from keyreid.runtime import stream
        original = engine_ort.OrtEngine.infer_impl
        def slow(self, feed):
            time.sleep({delay_s!r})
            return original(self, feed)
        engine_ort.OrtEngine.infer_impl = slow
        sys.exit(run_main(stream.main, {[str(arg) for arg in argv]!r}))
    """)


def test_a_lagging_engine_on_a_realtime_stream_drops_frames_and_says_which_stride_keeps_up(
        scene, reduced_onnx, tmp_path):
    data = scene[0]
    script = slow_engine_stream(0.25, "--engine", reduced_onnx, "--stream", data["video"], data["tracks"],
                                "--realtime", "--queue-frames", "2", "--max-tracks", "4", "--max-backlog", "8",
                                "--max-batch", "1", "--progress-seconds", "0.5", "-o", tmp_path / "o")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "warning: the engine could not keep up" in result.stderr
    assert "would keep up" in result.stderr.split("could not keep up")[1]
    dropped = int(result.stdout.split("decoded, ")[1].split(" dropped")[0])
    assert dropped > 0
    assert f"of {NUM_FRAMES} decoded" in result.stdout


def test_sigterm_mid_stream_writes_every_track_seen_so_far_whole(scene, reduced_onnx, tmp_path):
    data = scene[0]
    out = tmp_path / "out"
    script = slow_engine_stream(0.1, "--engine", reduced_onnx, "--stream", data["video"], data["tracks"],
                                "--realtime", "--track-timeout", "0.2", "-o", out)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=default_signal_handling)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / "tracks.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.6)                  # about 15 frames into the 36-frame video
    process.terminate()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "terminated" in stderr
    found = stream_outputs(out)
    decoded = int(stdout.split(" frames processed")[0].split(":")[-1])
    assert decoded < NUM_FRAMES
    seen = {f"cam0/track{person['track']}" for record in data["records"][:decoded] for person in record["people"]}
    assert {line["name"] for line in found["lines"]} == seen
    assert set(found["embeddings"]) == {line["name"] for line in found["lines"] if line["embedding"] is not None}
    assert leftover_partials(out) == []


def test_streams_may_share_the_unseen_camera_and_are_told_apart_by_id(scene, reduced_onnx, tmp_path):
    argv = ["--engine", reduced_onnx, "-o", tmp_path / "out", "-q"]
    for position, camera in enumerate(scene):
        argv += ["--stream", camera["video"], camera["tracks"], "camera=-1", f"id={7 + position}"]
    assert run_stream(*argv) == 0
    lines = stream_outputs(tmp_path / "out")["lines"]
    assert {line["name"].split("/")[0] for line in lines} == {"cam7", "cam8"}
    assert {line["model_camera"] for line in lines} == {-1}
    for line in lines:
        assert all(match["camera"] != line["camera"] for match in line["matches"])
    assert any(line["matches"] for line in lines)


def test_json_lines_read_from_a_fifo_as_the_tracker_writes_them(scene, jsonl_run, reduced_onnx, tmp_path):
    import threading
    data = scene[0]
    fifo = tmp_path / "tracker.jsonl"
    os.mkfifo(fifo)

    def tracker():                       # writes a line per frame, a little behind the video
        with open(fifo, "w") as out:
            for line in data["tracks"].read_text().splitlines():
                out.write(line + "\n")
                out.flush()
                time.sleep(0.005)

    writer = threading.Thread(target=tracker, daemon=True)
    writer.start()
    assert run_stream("--engine", reduced_onnx, "--stream", data["video"], fifo, "-o", tmp_path / "out", "-q") == 0
    writer.join(10)
    found = stream_outputs(tmp_path / "out")["embeddings"]
    expected = {name: row for name, row in jsonl_run["embeddings"].items() if name.startswith("cam0/")}
    assert set(found) == set(expected)
    for name, embedding in found.items():
        assert relative_error(embedding, expected[name]) <= 1e-5
