"""Online encoder throughput: 50 concurrent tracks pushed frame by frame vs whole tracklets.

    python benchmarks/bench_online.py [--engine model.onnx] [--tracks 50] [--frames 24] [--json out.json]
    python -m pytest benchmarks/bench_online.py --benchmark-only

The same crops (BGR, as a tracker hands them over, in three sizes so most are resized) go
through two paths on the same engine, in one run:

- ``online``: an ``OnlineEncoder``; one thread per camera (``--cameras``) pushes one frame of
  each of its tracks in turn, as a tracker does, then finishes every track;
- ``tracklets``: the batch path: each track's clips go as one tracklet to a ``Runner`` whose
  preprocessing threads resize the crops (what ``infer.py`` does after decoding files).

Reported: clips/s of each (median of interleaved passes after a warm-up), their ratio, and
the push latency (p50/p95/max: ``push`` should return at once) and the most frames the encoder
held. Without ``--engine`` the engine is a random reduced-width ONNX made by the export CLIs.
"""
import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent

from keyreid.benchmarks.bench_runner import export_reduced_engine, interleaved_median_seconds
from keyreid.benchmarks.machine import banner, describe

from keyreid.files import write_json
from keyreid.runtime.backends import open_engine
from keyreid.runtime.inputs.images import resize_like_pil
from keyreid.runtime.serving.online import OnlineEncoder
from keyreid.runtime.serving.runner import Runner
from keyreid.runtime.inputs.tracklets import num_clips, split_into_clips

CROP_SIZES = ((128, 256), (64, 128), (90, 300))     # (width, height): MARS, and two tracker sizes
MAX_BATCH = 8


def make_tracks(num_tracks: int, num_frames: int, seed: int = 0) -> List[Dict[str, np.ndarray]]:
    """Person-like crops (BGR) with realistic keypoints, one dict per track."""
    import cv2
    from keyreid.synthetic import realistic_keypoints, synthetic_frames
    rng = np.random.default_rng(seed)
    clips = -(-num_frames // 4)
    tracks = []
    for index in range(num_tracks):
        width, height = CROP_SIZES[index % len(CROP_SIZES)]
        frames = synthetic_frames(rng, clips).reshape(-1, 256, 128, 3)[:num_frames]
        keypoints, _ = realistic_keypoints(rng, clips, crop_sizes=[(width, height)], size_jitter_px=0)
        crops = [np.ascontiguousarray(frame[:, :, ::-1]) if (width, height) == (128, 256)
                 else cv2.resize(frame[:, :, ::-1], (width, height), interpolation=cv2.INTER_AREA) for frame in frames]
        tracks.append({"crops": crops, "keypoints": keypoints.reshape(-1, 17, 3)[:num_frames]})
    return tracks


class OnlineBench:
    def __init__(self, engine, tracks, cameras: int):
        self.engine, self.tracks, self.cameras = engine, tracks, cameras
        self.push_seconds: List[float] = []
        self.most_buffered = 0

    def online(self) -> Dict[int, np.ndarray]:
        features: Dict[int, np.ndarray] = {}
        lock = threading.Lock()
        with OnlineEncoder(self.engine, color="bgr", max_tracks=len(self.tracks), idle_timeout_s=None,
                           max_batch_size=MAX_BATCH) as encoder:
            def camera_thread(camera: int) -> None:
                mine = list(range(camera, len(self.tracks), self.cameras))
                latencies = []
                for frame in range(len(self.tracks[0]["crops"])):
                    for track in mine:
                        started = time.perf_counter()
                        encoder.push(track, self.tracks[track]["crops"][frame], self.tracks[track]["keypoints"][frame],
                                     camera=camera % 6)
                        latencies.append(time.perf_counter() - started)
                        self.most_buffered = max(self.most_buffered, encoder.buffered_frames)
                finished = {track: encoder.finish(track).feature for track in mine}
                with lock:
                    features.update(finished)
                    self.push_seconds += latencies
            threads = [threading.Thread(target=camera_thread, args=(camera,)) for camera in range(self.cameras)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return features

    def tracklets(self) -> Dict[int, np.ndarray]:
        def resize_clip(clip):
            return {**clip, "frames": np.stack([resize_like_pil(crop[:, :, ::-1]) for crop in clip["frames"]])}
        with Runner(self.engine, max_batch_size=MAX_BATCH, preprocess=resize_clip, preprocess_workers=2) as runner:
            futures = {}
            for index, track in enumerate(self.tracks):
                clips = [{"frames": [track["crops"][i] for i in order], "keypoints": track["keypoints"][order],
                          "crop_size": np.array([track["crops"][i].shape[1::-1] for i in order], np.float32),
                          "camera": (index % self.cameras) % 6}
                         for order in split_into_clips(len(track["crops"]))]
                futures[index] = runner.submit_tracklet(clips)
            return {index: future.result() for index, future in futures.items()}


def measure(engine_path, num_tracks: int, num_frames: int, cameras: int, repeats: int) -> dict:
    tracks = make_tracks(num_tracks, num_frames)
    clips = num_tracks * num_clips(num_frames)
    with open_engine(engine_path) as engine:
        bench = OnlineBench(engine, tracks, cameras)
        online, batch = bench.online(), bench.tracklets()
        worst = max(float(np.abs(online[i] - batch[i]).max() / np.abs(batch[i]).max()) for i in online)
        bench.push_seconds.clear()
        seconds = interleaved_median_seconds({"online": bench.online, "tracklets": bench.tracklets}, repeats)
    pushes = np.array(bench.push_seconds) * 1e3
    return {"machine": describe("onnxruntime default"), "tracks": num_tracks, "frames_per_track": num_frames,
            "cameras": cameras, "clips": clips, "max_batch": MAX_BATCH, "repeats": repeats,
            "clips_per_second": {name: clips / value for name, value in seconds.items()},
            "frames_per_second_online": num_tracks * num_frames / seconds["online"],
            "push_ms": {"p50": float(np.percentile(pushes, 50)), "p95": float(np.percentile(pushes, 95)),
                        "max": float(pushes.max())},
            "most_buffered_frames": bench.most_buffered,
            "online_vs_tracklets_max_relative_difference": worst}


@pytest.fixture(scope="module")
def online_inputs(bench_onnx):
    return bench_onnx["fp32"], make_tracks(50, 8)


def test_online_encoder_50_tracks(benchmark, online_inputs):
    engine_path, tracks = online_inputs
    benchmark.group = "online encoder (reduced model)"
    with open_engine(engine_path) as engine:
        bench = OnlineBench(engine, tracks, cameras=5)
        bench.online()
        benchmark.pedantic(bench.online, rounds=3, iterations=1)
        clips = sum(num_clips(len(track["crops"])) for track in tracks)
        benchmark.extra_info["clips_per_second"] = clips / benchmark.stats.stats.median


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, help="engine to run (default: a random reduced ONNX, exported here)")
    parser.add_argument("--tracks", type=int, default=50)
    parser.add_argument("--frames", type=int, default=24, help="frames per track")
    parser.add_argument("--cameras", type=int, default=5, help="pushing threads, one per camera")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        if args.engine is None:
            print("exporting a random reduced model (not timed)")
        engine = args.engine or export_reduced_engine(Path(scratch))
        print(banner(describe("onnxruntime default")))
        results = measure(engine, args.tracks, args.frames, args.cameras, args.repeats)
    speeds = results["clips_per_second"]
    print(f"{args.tracks} tracks x {args.frames} frames ({results['clips']} clips), {args.cameras} pushing threads, "
          f"max batch {MAX_BATCH}")
    for name, value in speeds.items():
        print(f"  {name:<10} {value:8.1f} clips/s  {value / speeds['tracklets']:.2f}x")
    print(f"  push latency ms: {results['push_ms']}; most frames held {results['most_buffered_frames']}; "
          f"online vs tracklets max relative difference {results['online_vs_tracklets_max_relative_difference']:.1e}")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
