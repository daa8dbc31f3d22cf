"""The stream tool's cost and speed: 1, 4 and 8 generated camera streams (720p, 25 fps, a few
people each) through ``StreamSession``, as fast as the engine goes and in real time.

    python benchmarks/bench_stream.py [--engine model.onnx | --reduced] [--streams 1 4 8]
                                      [--seconds 8] [--people 3] [--json out.json]
    python -m pytest benchmarks/bench_stream.py --benchmark-only

For each number of streams, two runs on the same videos (MJPEG AVI written by OpenCV, one
tracker JSON Lines file each):

- ``throughput``: the files (``--throughput-seconds`` long) read as fast as the engine takes
  their crops, every crop embedded (stride 1, nothing dropped). Reported: the decoding and cropping CPU time (reader threads'
  decode, camera threads' matching, cutting and resizing; thread CPU time) per embedded clip,
  divided by the engine's time per clip (wall time of its calls, which use every core), and the
  clips per second.
- ``realtime``: the files paced at 25 fps like cameras, with the per-track stride that fits the
  throughput run's clips/s (``--stride`` of the tool), and frames dropped when behind. Reported:
  the stride, clips/s, frames and crops dropped, and the same CPU ratio.

Without ``--engine`` the engine is a random ViT-B ONNX made by the export tools (``--reduced``:
the reduced-width model). Other jobs on the machine change the figures; read them as ratios.
"""
import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from keyreid.benchmarks.bench_runner import export_reduced_engine
from keyreid.benchmarks.machine import banner, describe
from keyreid.cli import program_name
from keyreid.files import write_json
from keyreid.runtime.backends import open_engine
from keyreid.runtime.serving.stream_session import StreamOptions, StreamSession, StreamSpec
from keyreid.synthetic_video import write_scene

FRAME_SIZE = (1280, 720)
FPS = 25.0
DISTINCT_VIDEOS = 2          # streams beyond this reuse a video (each is still decoded on its own)
HEADROOM = 0.8               # the realtime stride aims at this share of the measured clips/s


def write_videos(folder: Path, count: int, seconds: float, people: int, frame_size=FRAME_SIZE) -> List[Dict]:
    folder.mkdir(parents=True, exist_ok=True)
    frames = int(seconds * FPS)
    videos = []
    for index in range(min(count, DISTINCT_VIDEOS)):
        video, tracks = folder / f"cam{index}.avi", folder / f"cam{index}.jsonl"
        records = write_scene(video, tracks, np.random.default_rng(index), frame_size, frames, people, FPS)
        crops = sum(len(record["people"]) for record in records)
        videos.append({"video": video, "tracks": tracks, "crops": crops, "frames": frames})
    return [videos[index % len(videos)] for index in range(count)]


def draw_figure(engine_path: Path, workdir: Path, output: Path, people: int = 4, seconds: float = 3.0) -> None:
    """The README's picture: two 720p cameras that see the same people (each camera with its
    own light and box sizes), every track beside its nearest tracks on the other camera."""
    from keyreid.files import write_bytes
    from keyreid.runtime.results.ranking_figure import encode_png
    from keyreid.runtime.results.track_figure import TrackFigure
    from keyreid.synthetic_video import make_walkers, write_scene

    frames = int(seconds * FPS)
    first = make_walkers(np.random.default_rng(10), FRAME_SIZE, frames, people, first_track=1)
    second = make_walkers(np.random.default_rng(11), FRAME_SIZE, frames, people, first_track=21, looks=first)
    specs = []
    for camera, walkers in enumerate((first, second)):
        video, tracks = workdir / f"figure{camera}.avi", workdir / f"figure{camera}.jsonl"
        write_scene(video, tracks, np.random.default_rng(20 + camera), FRAME_SIZE, frames, people, FPS, walkers=walkers)
        specs.append(StreamSpec(str(video), tracks, camera))
    figure = TrackFigure(rows=2 * people, top_k=3)
    with open_engine(engine_path) as engine, \
            StreamSession(engine, specs, StreamOptions(stride=4, thumbnails=8, top_k=3), on_track=figure.add) as session:
        session.run()
    write_bytes(output, encode_png(figure.draw()))
    print(f"wrote {output}")


def export_vit_b_engine(workdir: Path) -> Path:
    """A random ViT-B checkpoint exported and verified as to_onnx.py does (kept between runs)."""
    from keyreid.export.config import VIT_B
    from keyreid.export.onnx_file import export_onnx
    from keyreid.export.random_checkpoint import write_random_checkpoint

    checkpoint, engine = workdir / "random_vit_b.pth", workdir / "random_vit_b.onnx"
    if not engine.exists():
        export_onnx(write_random_checkpoint(checkpoint, VIT_B), engine, progress=False)
        checkpoint.unlink()
    return engine


def run_session(engine, videos: List[Dict], stride: int, realtime: bool) -> Dict[str, float]:
    """One StreamSession over ``videos``; its counters."""
    cameras = engine.num_cameras or 0     # streams past the model's cameras run as unseen ones (-1)
    specs = [StreamSpec(str(video["video"]), video["tracks"], index if index < cameras else -1)
             for index, video in enumerate(videos)]
    options = StreamOptions(stride=stride, realtime=realtime, track_timeout_s=1.0)
    with StreamSession(engine, specs, options) as session:
        started = time.perf_counter()
        summary = session.run()
        seconds = time.perf_counter() - started
    cameras = session.cameras
    decode_cpu = sum(camera.source.decode_cpu_s for camera in cameras)
    crop_cpu = sum(camera.counts.cpu_s for camera in cameras)
    clips = max(summary.clips, 1)
    engine_per_clip = summary.engine_seconds / clips
    return {"streams": len(videos), "stride": stride, "seconds": seconds, "clips": summary.clips,
            "clips_per_s": summary.clips / seconds, "tracks": summary.finished,
            "frames": sum(camera.source.decoded for camera in cameras),
            "frames_dropped": sum(camera.source.dropped for camera in cameras),
            "crops_dropped": sum(camera.counts.crops_dropped for camera in cameras),
            "decode_cpu_ms_per_clip": 1000 * decode_cpu / clips, "crop_cpu_ms_per_clip": 1000 * crop_cpu / clips,
            "engine_ms_per_clip": 1000 * engine_per_clip,
            "cpu_ratio": (decode_cpu + crop_cpu) / clips / engine_per_clip if engine_per_clip else math.nan}


def measure(engine_path: Path, workdir: Path, stream_counts, seconds: float, throughput_seconds: float,
            people: int) -> List[Dict]:
    rows = []
    with open_engine(engine_path) as engine:
        for count in stream_counts:
            short = write_videos(workdir / f"short{count}", count, throughput_seconds, people)
            throughput = run_session(engine, short, stride=1, realtime=False)
            rows.append({"mode": "throughput", **throughput})
            print(row_text(rows[-1]), flush=True)
            videos = write_videos(workdir / f"long{count}", count, seconds, people)
            crops_per_s = sum(video["crops"] / (video["frames"] / FPS) for video in videos)
            stride = max(1, math.ceil(crops_per_s / (4 * throughput["clips_per_s"] * HEADROOM)))
            rows.append({"mode": "realtime", **run_session(engine, videos, stride=stride, realtime=True)})
            print(row_text(rows[-1]), flush=True)
    return rows


def row_text(row: Dict) -> str:
    return (f"{row['streams']} stream(s) {row['mode']:<10} stride {row['stride']:>3}: {row['clips_per_s']:6.2f} clips/s, "
            f"decode {row['decode_cpu_ms_per_clip']:.1f} + crop {row['crop_cpu_ms_per_clip']:.1f} ms CPU per clip "
            f"= {100 * row['cpu_ratio']:.1f}% of the engine's {row['engine_ms_per_clip']:.0f} ms per clip; "
            f"{row['frames_dropped']} of {row['frames']} frames and {row['crops_dropped']} crops dropped")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("bench_stream.py"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, help="model to run (default: a random ViT-B, or --reduced)")
    parser.add_argument("--reduced", action="store_true", help="a random reduced-width model instead of ViT-B")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="length of each video of the realtime runs (default: %(default)s)")
    parser.add_argument("--throughput-seconds", type=float, default=2.0,
                        help="length of each video of the throughput runs, where every crop is embedded "
                             "(default: %(default)s)")
    parser.add_argument("--people", type=int, default=3, help="people per video (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the rows and the machine here")
    parser.add_argument("--figure", type=Path, metavar="PNG",
                        help="also draw two cameras seeing the same people, each track beside its matches")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as folder:
        workdir = Path(folder)
        engine = args.engine or (export_reduced_engine(workdir) if args.reduced else export_vit_b_engine(workdir))
        info = describe(threads=0)
        print(banner(info) + f"; engine {engine.name}", flush=True)
        rows = measure(engine, workdir, args.streams, args.seconds, args.throughput_seconds, args.people)
        if args.figure is not None:
            draw_figure(engine, workdir, args.figure)
    if args.json is not None:
        write_json(args.json, {"machine": info, "engine": engine.name,
                               "frame_size": FRAME_SIZE, "fps": FPS, "seconds": args.seconds,
                               "people": args.people, "rows": rows})
    return 0


# --- pytest-benchmark: one short stream on the reduced model, so the benchmark cannot rot ------

def test_stream_throughput(benchmark, bench_onnx, tmp_path):
    videos = write_videos(tmp_path, 1, 1.0, 2, frame_size=(320, 240))
    with open_engine(bench_onnx["fp32"]) as engine:
        row = benchmark(run_session, engine, videos, 1, False)
    assert row["clips"] > 0 and row["frames"] == videos[0]["frames"] and row["frames_dropped"] == 0


if __name__ == "__main__":
    sys.exit(main())
