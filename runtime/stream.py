"""Re-identify people on live cameras: video files, camera devices or network streams, with the
appliance tracker's per-frame tracks, in; per-track features and cross-camera matches out.

    python runtime/stream.py --engine model.onnx --stream cam0.mp4 cam0.jsonl \\
                             --stream rtsp://10.0.0.7/live cam1.jsonl --output-dir out/

A thin layer over ``keyreid.runtime.serving.stream_session.StreamSession``: parse the streams, open the
engine, write each finished track as it ends, then the arrays, the gallery and the figure.
"""
import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from keyreid.cli import Steps, non_negative_float, non_negative_int, positive_float, positive_int, run_main
from keyreid.contract import MEAN_CAMERA
from keyreid.errors import KeyreidError
from keyreid.files import check_distinct_outputs, check_writable, write_bytes, write_npz
from keyreid.runtime.cli_args import (ENGINE_HELP, add_engine_arguments, check_engine_arguments, cpu_banner,
                                      engine_banner, engine_location, engine_options)
from keyreid.runtime.backends import open_engine
from keyreid.runtime.results.gallery_store import Gallery
from keyreid.runtime.serving.stream_session import (DEFAULT_BUSY_TIMEOUT_S, DEFAULT_MAX_BACKLOG, DEFAULT_MAX_TRACKS, DEFAULT_STRIDE,
                                            DEFAULT_TOP_K, DEFAULT_TRACK_TIMEOUT_S, FinishedTrack, StreamOptions,
                                            StreamSession, StreamSpec, StreamSummary)
from keyreid.runtime.inputs.stream_source import DEFAULT_QUEUE_FRAMES, DEFAULT_RECONNECT_TIMEOUT_S, is_live
from keyreid.runtime.results.track_figure import CROPS_PER_ROW, DEFAULT_ROWS, TrackFigure
from keyreid.runtime.inputs.track_formats import FORMATS

JSONL_NAME, NPZ_NAME, GALLERY_NAME, FIGURE_NAME = "tracks.jsonl", "tracks.npz", "gallery.npz", "tracks.png"
STREAM_OPTIONS = ("camera", "id", "format", "keypoints")
THUMBNAILS_KEPT = 8            # crops kept per track when a figure is asked for (spread over its life)

DESCRIPTION = """\
Re-identify people on cameras. For each stream (a video file, a camera device number, or a
network stream: rtsp://, http://, tcp://, udp://, ...) and its tracker's output, every tracked
person is cut from the decoded frames, every --stride-th crop of a track is embedded (clips of
4 frames, batched across cameras), and when a track ends (--track-timeout seconds of the stream
without it, or the end of the stream) its feature is written with its nearest tracks on the
other cameras, and joins the gallery the next tracks are matched against."""

EPILOG = f"""\
streams (--stream SOURCE TRACKS [camera=N] [format=F] [keypoints=FILE], repeatable):
  camera=N      the model's camera index of this stream (default: its position, 0, 1, ...;
                -1: a camera the model never saw; several streams may share it)
  id=N          the camera's id in track names and the gallery, where a track is matched
                only against other ids (default: its position)
  format=F      {', '.join(FORMATS)} (default from TRACKS: a folder is ultralytics-txt, .json
                ultralytics-json, .txt/.csv mot, anything else jsonl)
  keypoints=F   mot only: frame,id,x0,y0,c0,...,x16,y16,c16 rows for the MOT boxes

track formats (frames are numbered in decode order; docs/streams.md has examples):
  jsonl             keyreid's JSON Lines, one line per frame, frame pixels, frames from 0:
                    {{"frame": 12, "time": 0.48, "people": [{{"track": 7, "box": [x, y, w, h],
                      "keypoints": [x0, y0, c0, ..., x16, y16, c16]}}]}}
                    read as it is written: a FIFO or - (standard input) works
  ultralytics-json  Results.to_json() of each frame of model.track(...) (a -pose model),
                    written one after another; frames from 0
  ultralytics-txt   the labels/ folder of model.track(..., save_txt=True); frames from 1
  mot               MOTChallenge frame,id,bb_left,bb_top,bb_width,bb_height,... (frames from
                    1) with keypoints=FILE

outputs (in --output-dir):
  {JSONL_NAME}      one line per finished track, written as it ends: camera, track, first and
                    last frame and time, frames seen and used, clips, embedding, matches
  {NPZ_NAME}        embeddings [M, E] and the infer.py --output arrays (tracklets, pids,
                    cameras) plus tracks, times and frames; gallery.py build reads it
  {GALLERY_NAME}     every finished track (and --gallery's entries), for gallery.py search
  {FIGURE_NAME}       with --figure: the last tracks' crops beside their cross-camera matches
  The .npz files and the figure are written whole (a temporary file, then renamed) at the
  end, on Ctrl-C/SIGTERM, and every --save-every seconds; each line of {JSONL_NAME} is one write.

what is skipped and counted (the summary lists each per stream), never fatal:
  unreadable track records, frames with no tracks, records for frames that never came (dropped
  or past the end), boxes with no pixel in the frame, NaN joints (cleared), crops the engine
  had no room for on a live stream.

live streams and speed:
  Files are read as fast as the engine takes their crops (nothing dropped; --realtime paces a
  file like a camera). Live streams never wait: when the engine falls behind, frames and crops
  are dropped and counted, and a warning says which --stride would keep up. A live stream that
  stops is reopened with back-off until it has failed for --reconnect-timeout seconds; its
  tracks go on meanwhile.

exit status:
  0    every stream ran to its end and every track has a feature
  1    bad input (nothing runs), or a stream failed (the others ran and were written), or a
       track failed or used no keypoints at all (--allow-no-pose makes the last one 0)
  2    wrong command-line usage
  130  interrupted (Ctrl-C), 143 terminated (SIGTERM): the tracks seen so far are finished and
       written first (a second signal stops at once)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream.py", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=engine_location, required=True, metavar="FILE|URL", help=ENGINE_HELP)
    parser.add_argument("--stream", action="append", nargs="+", required=True, metavar="SOURCE TRACKS",
                        help="a stream and its tracks, then optional camera=N format=F keypoints=FILE "
                             "(repeat for each camera; see below)")
    parser.add_argument("-o", "--output-dir", type=Path, required=True, metavar="DIR",
                        help="folder for the outputs (made if missing)")
    parser.add_argument("--stride", type=positive_int, default=DEFAULT_STRIDE, metavar="N",
                        help="embed every N-th usable crop of each track (default: %(default)s); a CPU "
                             "cannot embed every frame of every person in real time")
    parser.add_argument("--track-timeout", type=non_negative_float, default=DEFAULT_TRACK_TIMEOUT_S, metavar="S",
                        help="a track not seen for S seconds of its stream has ended (default: %(default)g)")
    parser.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K, metavar="K",
                        help="cross-camera matches per finished track (default: %(default)s)")
    parser.add_argument("--gallery", type=Path, metavar="GALLERY.npz",
                        help="start from this gallery (gallery.py build, or an earlier run's "
                             f"{GALLERY_NAME}); it is read, never written")
    parser.add_argument("--figure", action="store_true",
                        help=f"also draw {FIGURE_NAME}: each of the last --figure-tracks tracks' crops "
                             "beside its cross-camera matches")
    parser.add_argument("--figure-tracks", type=positive_int, default=DEFAULT_ROWS, metavar="N",
                        help="rows of the figure (default: %(default)s)")
    parser.add_argument("--allow-no-pose", action="store_true",
                        help="exit 0 even when a track used no keypoints at all (it is still reported)")
    parser.add_argument("--realtime", action="store_true",
                        help="pace video files at their frame rate and drop frames when behind, as a "
                             "camera would (for trials and benchmarks)")
    parser.add_argument("--reconnect-timeout", type=non_negative_float, default=DEFAULT_RECONNECT_TIMEOUT_S,
                        metavar="S", help="give a live stream up after S seconds of failed reconnects "
                                          "(default: %(default)g)")
    parser.add_argument("--queue-frames", type=positive_int, default=DEFAULT_QUEUE_FRAMES, metavar="N",
                        help="decoded frames held per stream; bounds memory (default: %(default)s)")
    parser.add_argument("--max-tracks", type=positive_int, default=DEFAULT_MAX_TRACKS, metavar="N",
                        help="live tracks over all streams; crops of more are refused and counted "
                             "(default: %(default)s)")
    parser.add_argument("--max-backlog", type=non_negative_int, default=DEFAULT_MAX_BACKLOG, metavar="N",
                        help="crops in clips waiting for the engine; past that, live streams drop crops "
                             "and files wait. Bounds memory and delay (default: %(default)s)")
    parser.add_argument("--busy-timeout", type=non_negative_float, default=DEFAULT_BUSY_TIMEOUT_S, metavar="S",
                        help="live streams: drop a crop the engine has had no room for during S seconds "
                             "(default: %(default)g)")
    parser.add_argument("--save-every", type=positive_float, default=60.0, metavar="S",
                        help=f"rewrite {NPZ_NAME}, {GALLERY_NAME} (and the figure) every S seconds "
                             "when tracks finished (default: %(default)g)")
    parser.add_argument("--progress-seconds", type=positive_float, default=2.0, metavar="S",
                        help="seconds between progress lines on stderr (default: %(default)g)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines and no line per track")
    add_engine_arguments(parser)
    return parser


def parse_streams(parser: argparse.ArgumentParser, given: List[List[str]]) -> List[StreamSpec]:
    """``--stream SOURCE TRACKS [key=value ...]`` -> StreamSpecs (a usage error for a bad one)."""
    specs = []
    for position, words in enumerate(given):
        if len(words) < 2:
            parser.error(f"--stream needs SOURCE and TRACKS, got {' '.join(words)!r}")
        source, tracks, *extras = words
        options: Dict[str, str] = {}
        for extra in extras:
            key, equals, value = extra.partition("=")
            if not equals or key not in STREAM_OPTIONS:
                parser.error(f"--stream {source}: {extra!r} is not one of " + ", ".join(f"{name}=..." for name in STREAM_OPTIONS))
            options[key] = value
        try:
            camera = int(options.get("camera", position))
            stream_id = int(options.get("id", position))
        except ValueError:
            parser.error(f"--stream {source}: camera= and id= take whole numbers, got {extras}")
        if camera < MEAN_CAMERA:
            parser.error(f"--stream {source}: camera must be a 0-based index or {MEAN_CAMERA}, got {camera}")
        if options.get("format") not in (None, *FORMATS):
            parser.error(f"--stream {source}: format={options['format']} is not one of {', '.join(FORMATS)}")
        tracks_path = "/dev/stdin" if tracks == "-" else tracks
        specs.append(StreamSpec(source, Path(tracks_path), camera, options.get("format"),
                                Path(options["keypoints"]) if "keypoints" in options else None, stream_id))
    return specs


def embedding_text(feature: np.ndarray) -> str:
    """A float32 vector as a JSON list whose numbers read back to the same float32 values."""
    return "[" + ",".join(f"{value:.9g}" for value in feature.tolist()) + "]"


def track_line(track: FinishedTrack) -> str:
    """One JSON line for a finished track (the embedding as float32-exact numbers)."""
    head = {"camera": track.camera, "model_camera": track.model_camera, "track": track.track, "name": track.name,
            "first_frame": track.first_frame, "last_frame": track.last_frame,
            "first_time": track.first_time, "last_time": track.last_time,
            "frames_seen": track.frames_seen, "frames_used": track.frames_used, "clips": track.clips,
            "has_pose": track.has_pose, "error": track.error,
            "matches": [{"name": match.name, "camera": match.camera, "distance": match.distance,
                         "time": None if math.isnan(match.timestamp) else match.timestamp}
                        for match in track.matches]}
    text = json.dumps(head, allow_nan=False)
    embedding = "null" if track.feature is None else embedding_text(track.feature)
    return text[:-1] + f', "embedding": {embedding}}}\n'


def track_arrays(tracks: Sequence[FinishedTrack], dim: int) -> Dict[str, np.ndarray]:
    """The npz of the tracks with a feature: infer.py's --output arrays, then the tracks' own."""
    kept = [track for track in tracks if track.feature is not None]
    return {"embeddings": np.stack([track.feature for track in kept]) if kept else np.zeros((0, dim), np.float32),
            "tracklets": np.array([track.name for track in kept], dtype=str).reshape(len(kept)),
            "pids": np.full(len(kept), -1, np.int64),
            "cameras": np.array([track.camera for track in kept], dtype=np.int64).reshape(len(kept)),
            "tracks": np.array([str(track.track) for track in kept], dtype=str).reshape(len(kept)),
            "first_frames": np.array([track.first_frame for track in kept], dtype=np.int64).reshape(len(kept)),
            "last_frames": np.array([track.last_frame for track in kept], dtype=np.int64).reshape(len(kept)),
            "first_times": np.array([track.first_time for track in kept], dtype=np.float64).reshape(len(kept)),
            "last_times": np.array([track.last_time for track in kept], dtype=np.float64).reshape(len(kept)),
            "frames_used": np.array([track.frames_used for track in kept], dtype=np.int64).reshape(len(kept))}


class Outputs:
    """The output folder: the JSON Lines file as tracks finish, the whole files on ``save``."""

    def __init__(self, folder: Path, figure: Optional[TrackFigure], quiet: bool):
        self.folder, self.figure, self.quiet = folder, figure, quiet
        self.tracks: List[FinishedTrack] = []
        self._lock = threading.Lock()
        self._saved = 0
        self._jsonl = os.open(folder / JSONL_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)

    def paths(self) -> Dict[str, Path]:
        names = [JSONL_NAME, NPZ_NAME, GALLERY_NAME] + ([FIGURE_NAME] if self.figure is not None else [])
        return {name: self.folder / name for name in names}

    def add(self, track: FinishedTrack) -> None:
        """A finished track (the finisher thread): its line at once, whole, in one write."""
        data = track_line(track).encode("utf-8")
        with self._lock:
            written = os.write(self._jsonl, data)
            if written != len(data):      # a regular file takes it whole unless the disk is full
                raise KeyreidError(f"cannot write {self.folder / JSONL_NAME}: the disk took {written} of {len(data)} bytes")
            self.tracks.append(track)
            if self.figure is not None:
                self.figure.add(track)
        if not self.quiet:
            print(describe_track(track), flush=True)

    def save(self, gallery: Gallery, dim: int, force: bool = False) -> None:
        """Rewrite the npz files (and the figure) whole, when tracks finished since the last save."""
        with self._lock:
            tracks = list(self.tracks)
            figure = self.figure.draw() if self.figure is not None and len(self.figure) else None
        if len(tracks) == self._saved and not force:
            return
        write_npz(self.folder / NPZ_NAME, track_arrays(tracks, dim))
        gallery.save(self.folder / GALLERY_NAME)
        if figure is not None:
            from keyreid.runtime.results.ranking_figure import encode_png
            write_bytes(self.folder / FIGURE_NAME, encode_png(figure))
        self._saved = len(tracks)

    def close(self) -> None:
        os.close(self._jsonl)


def describe_track(track: FinishedTrack) -> str:
    head = (f"{track.name}: frames {track.first_frame}-{track.last_frame} ({track.frames_seen} seen, "
            f"{track.frames_used} used, {track.clips} clips)")
    if track.feature is None:
        return f"{head}; no feature: {track.error}"
    if not track.matches:
        return f"{head}; no track on another camera yet"
    nearest = ", ".join(f"{match.name} ({match.distance:.4g})" for match in track.matches[:3])
    return f"{head}; nearest on other cameras: {nearest}"


class ProgressLines:
    """A progress line every interval, and a warning when live streams lose frames or crops."""

    def __init__(self, interval_s: float, enabled: bool):
        self.interval_s, self.enabled = interval_s, enabled
        self._last = None
        self._last_warning = -math.inf

    def totals(self, session: StreamSession) -> Dict[str, float]:
        counts = [camera.counts for camera in session.cameras]
        return {"time": time.monotonic(),
                "decoded": sum(camera.source.decoded for camera in session.cameras),
                "dropped": sum(camera.source.dropped for camera in session.cameras),
                "crops": sum(camera.counts.crops * camera.source.decoded / max(camera.counts.frames, 1)
                             for camera in session.cameras),
                "crops_dropped": sum(count.crops_dropped for count in counts),
                "clips": session.engine.clips}

    def __call__(self, session: StreamSession) -> None:
        now = self.totals(session)
        last = self._last or dict.fromkeys(now, 0.0) | {"time": session.started}
        self._last = now
        if not self.enabled:
            return
        seconds = max(now["time"] - last["time"], 1e-9)
        rate = {key: (now[key] - last[key]) / seconds for key in now if key != "time"}
        fps = sum(camera.source.fps for camera in session.cameras)
        live = sum(len(camera._live) for camera in session.cameras)
        print(f"      {now['time'] - session.started:.0f} s: {rate['decoded']:.1f} frames/s decoded "
              f"({rate['decoded'] / fps:.2f}x real time), {rate['clips']:.1f} clips/s embedded, {live} live tracks, "
              f"{len(session.finished)} finished; dropped {now['dropped']:.0f} frames, "
              f"{now['crops_dropped']:.0f} crops", file=sys.stderr, flush=True)
        lost = (now["dropped"] - last["dropped"]) + (now["crops_dropped"] - last["crops_dropped"])
        if lost and now["time"] - self._last_warning >= 10 * self.interval_s:
            self._last_warning = now["time"]
            print(f"warning: the engine cannot keep up: {lost:.0f} frames and crops dropped in the last "
                  f"{seconds:.1f} s{stride_advice(session.options.stride, rate['crops'], rate['clips'])}",
                  file=sys.stderr, flush=True)


def stride_advice(stride: int, crops_per_s: float, clips_per_s: float) -> str:
    """'; ... --stride N would keep up' when ``crops_per_s`` usable crops at ``stride`` are more
    than the engine's ``clips_per_s`` (4 crops a clip) can take; else nothing."""
    capacity = 4 * clips_per_s
    if capacity <= 0 or crops_per_s / stride <= capacity:
        return ""
    return (f"; about {crops_per_s:.0f} usable crops/s arrive and it embeds about {capacity:.0f}: "
            f"--stride {max(stride + 1, math.ceil(crops_per_s / capacity))} would keep up")


def keep_up_warning(summary: StreamSummary, stride: int) -> Optional[str]:
    """A warning for the summary when live streams lost frames or crops to a slow engine."""
    frames = sum(source.dropped for _, _, _, source, *_ in summary.cameras)
    crops = sum(counts.crops_dropped for _, _, counts, *_ in summary.cameras)
    if not frames and not crops:
        return None
    # Crops of dropped frames were never cut: scale by the frames decoded per frame processed.
    usable = sum(counts.crops * source.decoded / max(counts.frames, 1) for _, _, counts, source, *_ in summary.cameras)
    seconds = max(summary.seconds, 1e-9)
    return (f"warning: the engine could not keep up: {frames} frames and {crops} crops were dropped"
            f"{stride_advice(stride, usable / seconds, summary.clips / seconds)}")


def print_summary(summary: StreamSummary) -> None:
    for name, spec, counts, source, reader, error, note in summary.cameras:
        print(f"{name} ({spec.source}): {counts.frames} frames processed of {source.decoded} decoded, "
              f"{source.dropped} dropped, {source.reconnects} reconnects; {counts.tracks} tracks, "
              f"{counts.crops_pushed} crops embedded")
        details = [(counts.frames_without_tracks, "frames without tracks"),
                   (counts.records_without_frame, "track records for frames that never came (dropped or past the end)"),
                   (counts.boxes_outside, "boxes with no pixel in the frame"),
                   (counts.duplicate_people, "people given a track id already seen in the same frame (skipped)"),
                   (counts.cleared_joints, "joints with NaN/inf or a negative confidence cleared"),
                   (counts.crops_dropped, "crops dropped (the engine was behind)"),
                   (counts.crops_refused, f"crops refused ({counts.refused_example})")]
        for count, text in details:
            if count:
                print(f"  {count} {text}")
        if reader.problems.count:
            print(f"  track records unreadable: {reader.problems.summary()}")
        if note:
            print(f"  note: {note}")
        if error:
            print(f"  failed: {error}")
    clips_per_s = summary.clips / summary.seconds if summary.seconds > 0 else 0.0
    unusable = f", {summary.unusable} without a usable crop" if summary.unusable else ""
    print(f"tracks: {summary.finished} finished, {summary.failed} failed{unusable}; {summary.clips} clips in "
          f"{summary.seconds:.1f} s ({clips_per_s:.1f} clips/s, engine busy {summary.engine_seconds:.1f} s)")


def check_outputs(args: argparse.Namespace, specs: List[StreamSpec]) -> Dict[str, Path]:
    folder = args.output_dir
    if folder.exists() and not folder.is_dir():
        raise KeyreidError(f"--output-dir {folder} is a file; give a folder")
    if not folder.parent.is_dir():
        raise KeyreidError(f"--output-dir {folder}: folder {folder.parent} does not exist")
    folder.mkdir(exist_ok=True)
    names = [JSONL_NAME, NPZ_NAME, GALLERY_NAME] + ([FIGURE_NAME] if args.figure else [])
    outputs = {name: folder / name for name in names}
    inputs: Dict[str, Optional[Path]] = {"the engine": None if isinstance(args.engine, str) else args.engine,
                                         "--gallery": args.gallery}
    for spec in specs:
        if not is_live(spec.source):
            inputs[f"the video {spec.source}"] = Path(spec.source)
        inputs[f"the tracks {spec.tracks}"] = Path(spec.tracks)
        if spec.keypoints is not None:
            inputs[f"the keypoints {spec.keypoints}"] = spec.keypoints
    check_distinct_outputs(outputs, inputs)
    for name, path in outputs.items():
        check_writable(path, f"output {name}")
    return outputs


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    specs = parse_streams(parser, args.stream)
    check_engine_arguments(parser, args, [args.engine])
    check_outputs(args, specs)
    steps = Steps(total=2, quiet=args.quiet)
    steps(f"loading engine {args.engine}")
    with open_engine(args.engine, **engine_options(args, args.engine)) as engine:
        if not args.quiet:
            print(f"      {engine_banner(engine)}; {cpu_banner()}", file=sys.stderr, flush=True)
        gallery = Gallery.load(args.gallery, dim=engine.embedding_dim) if args.gallery is not None else None
        options = StreamOptions(stride=args.stride, track_timeout_s=args.track_timeout, top_k=args.top_k,
                                realtime=args.realtime, queue_frames=args.queue_frames,
                                reconnect_timeout_s=args.reconnect_timeout, max_tracks=args.max_tracks,
                                max_backlog=args.max_backlog,
                                busy_timeout_s=args.busy_timeout,
                                thumbnails=THUMBNAILS_KEPT if args.figure else 0, max_batch_size=args.max_batch)
        figure = TrackFigure(args.figure_tracks, min(args.top_k, 10)) if args.figure else None
        outputs = Outputs(args.output_dir, figure, args.quiet)
        try:
            with StreamSession(engine, specs, options, gallery=gallery, on_track=outputs.add) as session:
                steps(f"running {len(specs)} stream(s)")
                summary, signum = run_until_done(session, outputs, args)
                steps.done()
                outputs.save(session.gallery, engine.embedding_dim, force=True)
        finally:
            outputs.close()
    print_summary(summary)
    warning = keep_up_warning(summary, args.stride)
    if warning:
        print(warning, file=sys.stderr)
    for name, path in outputs.paths().items():
        if path.exists():
            print(f"wrote {path}")
    return exit_status(summary, signum, args)


def run_until_done(session: StreamSession, outputs: Outputs, args: argparse.Namespace) -> Tuple[StreamSummary, int]:
    """Run the session: (its summary, the signal that stopped it or 0). SIGINT/SIGTERM stop it
    (the tracks seen so far are finished and written); a second signal stops at once."""
    received: List[int] = []
    progress = ProgressLines(args.progress_seconds, not args.quiet)
    last_save = [time.monotonic()]

    def on_signal(signum, frame):
        if received:          # the second one: leave now (files being written are removed whole)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt()
        received.append(signum)
        session.stop()

    def on_tick(running: StreamSession) -> None:
        progress(running)
        if time.monotonic() - last_save[0] >= args.save_every:
            last_save[0] = time.monotonic()
            outputs.save(running.gallery, running.engine.embedding_dim)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = session.run(on_tick, tick_s=min(args.progress_seconds, args.save_every))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return summary, (received[0] if received else 0)


def exit_status(summary: StreamSummary, signum: int, args: argparse.Namespace) -> int:
    for error in summary.failed_streams:
        print(f"error: {error}", file=sys.stderr)
    for name in summary.without_pose:
        print(f"warning: {name} used no keypoints at all: its part features carry no pose information "
              "(does the tracker run a pose model?)", file=sys.stderr)
    if signum:
        print("terminated" if signum == signal.SIGTERM else "interrupted", file=sys.stderr)
        return 128 + signum
    if summary.failed_streams or summary.failed:
        return 1
    if summary.without_pose and not args.allow_no_pose:
        print(f"error: {len(summary.without_pose)} track(s) used no keypoints (--allow-no-pose exits 0)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
