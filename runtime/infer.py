"""Tracklet embeddings and re-identification metrics from an engine (docs/contract.md §4).

    python runtime/infer.py --engine model.onnx --tracklets DIR --output embeddings.npz
    python runtime/infer.py --engine model.onnx --dataset mars --root MARS [--report report.json]
    python runtime/infer.py --engine model.onnx --query DIR --gallery DIR [--report report.json]
                            [--ranking-png ranking.png]

A thin layer over ``keyreid.runtime.serving.pipeline``: find the tracklets, run them through a Runner
(decoding on worker threads while the engine runs), then write embeddings, metrics and figures.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from keyreid.cli import Steps, program_name, run_main
from keyreid.contract import MEAN_CAMERA, camera_problem
from keyreid.errors import KeyreidError
from keyreid.runtime.cli_args import (ENGINE_HELP, add_engine_arguments, add_frame_limit_argument,
                                      add_runner_arguments, check_engine_arguments, cpu_banner, engine_banner,
                                      engine_location, engine_options, runner_options)
from keyreid.runtime.backends import open_engine
from keyreid.runtime.serving.pipeline import Progress, TrackletRun, clip_loader, run_tracklets, total_clips
from keyreid.runtime.results.query_gallery import QueryGalleryResult, evaluate_query_gallery
from keyreid.runtime.inputs.poses import PoseTally
from keyreid.files import check_distinct_outputs, check_not_among, check_writable, write_bytes, write_json, write_npz
from keyreid.runtime.serving.runner import Runner
from keyreid.runtime.inputs.tracklets import (DEFAULT_CAMERA, MANIFEST_NAME, Tracklet, TrackletFailure, TrackletScan,
                                              discover_tracklets, failure_lines)

DESCRIPTION = """\
Run a KeyRe-ID engine (.onnx on ONNX Runtime or OpenVINO, .plan/.engine/.trt on TensorRT, or a
model on a Triton Inference Server at grpc://HOST:PORT/MODEL) over tracklets:
each tracklet is cut into clips of 4 frames (the last one cycling its own frames, at most the
first 41 clips), every clip is embedded, and the tracklet's feature is the mean of its clips'
embeddings. Frames are decoded on worker threads while the engine runs batches.

modes (choose one):
  --tracklets DIR --output OUT.npz
        embed every tracklet folder under DIR
  --dataset mars --root DIR [--keypoints DIR]
        the MARS test split (bbox_test/, info/test_name.txt, info/tracks_test_info.mat,
        info/query_IDX.mat): query and gallery features, then CMC rank-1/5/10/20 and mAP
  --query DIR --gallery DIR
        the same evaluation for two tracklet folders"""

EPILOG = f"""\
tracklet folders (--tracklets, --query, --gallery):
  DIR/<tracklet>/<frame>.jpg|.jpeg|.png   frames in file-name order
  DIR/<tracklet>/<frame>.pose             same stem: 17 COCO keypoints [[x, y, conf], ...]
                                          in pixels of the frame (OpenPifPaf output)
  DIR/<tracklet>/keypoints.json           or: COCO keypoint results for the folder's frames
                                          (MMPose, YOLO-pose, OpenPifPaf), matched by
                                          "file_name"/"image_id"; see docs/usage.md
  {('DIR/' + MANIFEST_NAME).ljust(40)}optional: columns tracklet,pid,camera
  Identity and camera come from the manifest, else from MARS-style frame names
  (0001C2T0003F001.jpg: pid 1, camera 1), else pid -1 (unknown) and --camera.
  Cameras are 0-based model indices; -1 uses the mean camera embedding (unseen camera).

outputs (each written whole: a temporary file, then renamed):
  --output OUT.npz   embeddings [M, E] float32, tracklets [M] names, pids [M], cameras [M];
                     in evaluation modes also is_query [M]
  --report OUT.json  metrics, counts, failures and pose-file counts (evaluation modes)
  --ranking-png PNG  the top-10 gallery tracklets of a few queries, green border = same
                     identity, red = another one (evaluation modes)

what fails and what does not:
  A frame that cannot be decoded (corrupt, truncated, 16-bit, missing, not JPEG/PNG, or larger
  than --max-frame-side), an empty tracklet folder, a camera the engine does not know, or NaN
  or infinite engine outputs fail that tracklet. The others still run and are written; the
  failures are listed at the end.
  A missing, unreadable or malformed .pose file is not a failure: the frame runs with no joints
  visible, and the number of such frames is reported, as are folder entries that are neither
  frames nor .pose files (they are ignored). A tracklet with no keypoints at all (no .pose file
  or keypoints.json entry for any frame) runs, but gets a warning: its part features carry no
  pose information; it makes the exit status 1 unless --allow-no-pose.
  A symbolic link in a tracklet folder that loops back to it fails that tracklet.
  An output path that is the engine, a frame, a pose file, a manifest, a MARS table or another
  output is refused before anything runs.

exit status:
  0    every tracklet ran and every output was written
  1    bad input (engine file, directory, option value; nothing is written), or some
       tracklets failed (outputs hold the others; --keep-going makes this 0), or some had no
       keypoints at all (outputs hold them too; --allow-no-pose makes this 0)
  2    wrong command-line usage
  130  interrupted (Ctrl-C), 143 terminated (SIGTERM): queued clips are cancelled, nothing is
       written"""

MAX_LISTED_WITHOUT_POSE = 10


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("infer.py"), description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=engine_location, required=True, metavar="FILE|URL", help=ENGINE_HELP)
    modes = parser.add_mutually_exclusive_group(required=True)
    modes.add_argument("--tracklets", type=Path, metavar="DIR", help="folder of tracklet folders to embed")
    modes.add_argument("--dataset", choices=("mars",), help="evaluate on a dataset's test split")
    modes.add_argument("--query", type=Path, metavar="DIR", help="folder of query tracklet folders")
    parser.add_argument("--gallery", type=Path, metavar="DIR",
                        help="folder of gallery tracklet folders (with --query)")
    parser.add_argument("--root", type=Path, metavar="DIR", help="dataset root (with --dataset)")
    parser.add_argument("--keypoints", type=Path, metavar="DIR",
                        help="MARS pose files as <pid>/<frame stem>.pose (default: "
                             "ROOT/keypoints/bbox_test, where upstream's extraction script puts them)")
    parser.add_argument("--camera", type=int, default=None, metavar="N",
                        help="camera of tracklets the manifest and frame names say nothing about; "
                             f"-1 = unseen camera (mean camera embedding) (default: {DEFAULT_CAMERA})")
    parser.add_argument("-o", "--output", type=Path, metavar="OUT.npz", help="write the tracklet embeddings")
    parser.add_argument("--report", type=Path, metavar="OUT.json", help="write the metrics as JSON")
    parser.add_argument("--ranking-png", type=Path, metavar="OUT.png", help="draw the ranking of a few queries")
    parser.add_argument("--ranking-queries", type=int, default=5, metavar="N",
                        help="queries drawn in --ranking-png (default: %(default)s)")
    parser.add_argument("--keep-going", action="store_true",
                        help="exit 0 even when some tracklets failed (they are still reported)")
    parser.add_argument("--allow-no-pose", action="store_true",
                        help="exit 0 even when a tracklet has no keypoints at all (no .pose file or "
                             "keypoints.json entry for any frame); it is still reported")
    parser.add_argument("--progress-seconds", type=float, default=2.0, metavar="S",
                        help="seconds between progress lines on stderr (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    add_engine_arguments(parser)
    add_frame_limit_argument(add_runner_arguments(parser))
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The mode ("tracklets", "mars", "query_gallery"); a usage error (exit 2) for a bad mix."""
    if args.tracklets is not None:
        mode = "tracklets"
        if args.output is None:
            parser.error("--tracklets needs --output OUT.npz")
    elif args.dataset is not None:
        mode = "mars"
        if args.root is None:
            parser.error("--dataset mars needs --root DIR (the MARS folder)")
    else:
        mode = "query_gallery"
        if args.gallery is None:
            parser.error("--query needs --gallery DIR")
    wrong = [flag for flag, given, allowed in (
        ("--gallery", args.gallery is not None, mode == "query_gallery"),
        ("--root", args.root is not None, mode == "mars"),
        ("--keypoints", args.keypoints is not None, mode == "mars"),
        ("--camera", args.camera is not None, mode != "mars"),
        ("--report", args.report is not None, mode != "tracklets"),
        ("--ranking-png", args.ranking_png is not None, mode != "tracklets"),
    ) if given and not allowed]
    if wrong:
        parser.error(f"{', '.join(wrong)} cannot be used with {'--dataset mars' if mode == 'mars' else '--' + mode.split('_')[0]}")
    if args.camera is not None and args.camera < MEAN_CAMERA:
        parser.error(f"--camera must be a 0-based camera index or {MEAN_CAMERA} (unseen camera), got {args.camera}")
    if args.ranking_queries < 1:
        parser.error("--ranking-queries must be at least 1")
    return mode


class Sets:
    """The tracklets to run and the failures found while looking for them, by set name."""

    def __init__(self):
        self.tracklets: Dict[str, List[Tracklet]] = {}
        self.failures: List[TrackletFailure] = []
        self.notes: List[str] = []                  # warnings printed before the run
        self.ignored: List[str] = []                # summary lines about ignored folder entries
        self.ignored_entries = 0
        self.input_files: List[Path] = []           # manifests and dataset files, besides frames and poses
        self.mars_info: Dict[str, object] = {}

    def add(self, name: str, tracklets: List[Tracklet], failures: Sequence[TrackletFailure] = (),
            prefix: str = "") -> None:
        self.tracklets[name] = tracklets
        self.failures += [TrackletFailure(prefix + failure.name, failure.reason) for failure in failures]

    def add_scan(self, name: str, scan: TrackletScan, prefix: str = "") -> None:
        self.add(name, scan.tracklets, scan.failures, prefix)
        self.input_files.append(scan.root / MANIFEST_NAME)
        self.ignored_entries += len(scan.ignored)
        ignored = scan.ignored_summary()
        if ignored:
            self.ignored.append(f"{prefix}{ignored}")

    @property
    def all(self) -> List[Tracklet]:
        return [tracklet for tracklets in self.tracklets.values() for tracklet in tracklets]


def find_tracklets(args: argparse.Namespace, mode: str) -> Sets:
    sets = Sets()
    camera = DEFAULT_CAMERA if args.camera is None else args.camera
    if mode == "tracklets":
        sets.add_scan("tracklets", discover_tracklets(args.tracklets, default_camera=camera))
    elif mode == "query_gallery":
        for name, root in (("query", args.query), ("gallery", args.gallery)):
            sets.add_scan(name, discover_tracklets(root, default_camera=camera), prefix=f"{name}/")
    else:
        from keyreid.runtime.inputs.mars import MARS_FILES, load_mars_test
        split = load_mars_test(args.root, args.keypoints)
        sets.input_files += [args.root / name for name in MARS_FILES]
        sets.add("query", split.query, split.failures)
        sets.add("gallery", split.gallery)
        sets.mars_info = {"junk_rows": split.junk_rows, "keypoints_dir": str(split.keypoints_dir),
                          "keypoints_dir_exists": split.keypoints_dir_exists}
        if not split.keypoints_dir_exists:
            sets.notes.append(f"warning: keypoints directory {split.keypoints_dir} does not exist; "
                              "every frame runs with no joints visible (see --keypoints)")
        if not split.query or not split.gallery:
            raise KeyreidError(f"{args.root}: the MARS test split has {len(split.query)} query and "
                               f"{len(split.gallery)} gallery tracklets; it needs both")
    return sets


def check_cameras(given_camera: Optional[int], tracklets: Sequence[Tracklet], num_cameras: Optional[int]) -> None:
    """One error before anything runs when the cameras cannot be fed to the engine, naming the
    flag to add: a --camera given out of range, or camera indices (from names, a manifest or the
    default) for an engine that does not record how many cameras it knows."""
    if given_camera is not None:
        reason = camera_problem(given_camera, num_cameras)
        if reason:
            raise KeyreidError(f"--camera {given_camera}: {reason}")
    if num_cameras is None:
        indexed = sorted({tracklet.camera for tracklet in tracklets} - {MEAN_CAMERA})
        if indexed:
            raise KeyreidError(
                f"the engine does not record how many cameras it knows (a model served without keyreid's "
                f"parameters, such as through serve_triton.py), so camera {indexed[0]} of the tracklets "
                f"cannot be checked: add --num-cameras C (the cameras the model was trained with), or "
                f"--camera {MEAN_CAMERA} to run tracklets without a camera on the mean camera embedding")


def print_summary(run: TrackletRun, failures: List[TrackletFailure], sets: Sets) -> None:
    print(f"tracklets: {len(run.indices)} done, {len(failures)} failed "
          f"({run.num_clips} clips in {run.seconds:.1f} s, {run.clips_per_second:.1f} clips/s)")
    for line in failure_lines(failures):
        print(line)
    print(run.pose_tally.summary())
    for line in sets.ignored:
        print(line)


def pose_counts(tally: PoseTally) -> Dict[str, object]:
    return {"read": tally.ok, "missing": tally.missing, "unreadable": tally.unreadable,
            "malformed": tally.malformed, "frames_without_pose": tally.without_pose,
            "cleared_joints": tally.cleared_joints, "examples": list(tally.examples)}


def split_run(run: TrackletRun, sets: Sets) -> Tuple[List[Tracklet], np.ndarray, List[Tracklet], np.ndarray]:
    """Query and gallery tracklets that produced a feature, with their features."""
    num_query = len(sets.tracklets["query"])
    is_query = run.indices < num_query
    succeeded = run.succeeded
    query = [tracklet for tracklet, flag in zip(succeeded, is_query) if flag]
    gallery = [tracklet for tracklet, flag in zip(succeeded, is_query) if not flag]
    return query, run.features[is_query], gallery, run.features[~is_query]


def build_report(args: argparse.Namespace, mode: str, sets: Sets, run: TrackletRun,
                 failures: List[TrackletFailure], evaluation: QueryGalleryResult) -> Dict[str, object]:
    ranking = evaluation.ranking
    num_query = len(sets.tracklets["query"])
    report: Dict[str, object] = {
        "engine": str(args.engine),
        "mode": mode,
        "mAP": ranking.mean_ap,
        "cmc": {str(rank): value for rank, value in ranking.cmc.items()},
        "queries": {"tracklets": num_query,
                    "failed": int(num_query - np.count_nonzero(run.indices < num_query)),
                    "unlabelled": len(evaluation.unlabelled_queries),
                    "ranked": ranking.num_queries, "evaluated": ranking.num_evaluated,
                    "skipped_without_match": ranking.num_skipped},
        "gallery": {"tracklets": len(sets.tracklets["gallery"]), "ranked": len(evaluation.gallery)},
        "failures": [{"tracklet": failure.name, "reason": failure.reason} for failure in failures],
        "poses": pose_counts(run.pose_tally),
        "ignored_entries": sets.ignored_entries,
        "clips": run.num_clips,
        "seconds": round(run.seconds, 3),
        "clips_per_second": round(run.clips_per_second, 3),
    }
    if mode == "mars":
        report["dataset"] = {"name": "mars", "root": str(args.root), **sets.mars_info}
    else:
        report["dataset"] = {"query": str(args.query), "gallery": str(args.gallery)}
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = check_arguments(parser, args)
    check_engine_arguments(parser, args, [args.engine])
    outputs = {"--output": args.output, "--report": args.report, "--ranking-png": args.ranking_png}
    check_distinct_outputs(outputs, {"the engine": args.engine})
    for flag, path in outputs.items():
        if path is not None:
            check_writable(path, flag)

    evaluating = mode != "tracklets"
    steps = Steps(total=4 + int(evaluating), quiet=args.quiet)
    steps("finding tracklets")
    sets = find_tracklets(args, mode)
    for note in sets.notes:
        print(note, file=sys.stderr)
    tracklets = sets.all
    without_pose = [tracklet.name for tracklet in tracklets if not tracklet.has_pose_source]
    inputs = [path for tracklet in tracklets for path in tracklet.input_files]
    check_not_among(outputs, inputs + sets.input_files, "input files (frames, poses, manifests, dataset tables)")

    steps(f"loading engine {args.engine}")
    with open_engine(args.engine, **engine_options(args, args.engine)) as engine:
        check_cameras(args.camera, tracklets, engine.num_cameras)
        if not args.quiet:
            print(f"      {engine_banner(engine)}; {cpu_banner()}", file=sys.stderr, flush=True)
        steps(f"running {len(tracklets)} tracklets ({total_clips(tracklets)} clips)")
        tally = PoseTally()
        progress = Progress(len(tracklets), total_clips(tracklets), interval_s=args.progress_seconds,
                            enabled=not args.quiet)
        with Runner(engine, preprocess=clip_loader(tally, args.max_frame_side), **runner_options(args).as_kwargs()) as runner:
            run = run_tracklets(runner, tracklets, tally, progress, stall_timeout_s=args.stall_timeout)
    steps.done()

    failures = sets.failures + run.failures
    print_summary(run, failures, sets)
    warn_without_pose(without_pose)
    if len(run.indices) == 0:
        raise KeyreidError(f"no tracklet produced a feature ({len(failures)} failed); nothing was written")

    if not evaluating:
        steps(f"writing {args.output}")
        write_npz(args.output, run.arrays())
    else:
        steps("evaluating")
        query, query_features, gallery, gallery_features = split_run(run, sets)
        if not query:
            raise KeyreidError("no query tracklet produced a feature; nothing to evaluate")
        evaluation = evaluate_query_gallery(query, query_features, gallery, gallery_features)
        steps("writing results")
        if args.output is not None:
            arrays = run.arrays()
            arrays["is_query"] = run.indices < len(sets.tracklets["query"])
            write_npz(args.output, arrays)
        if args.report is not None:
            write_json(args.report, build_report(args, mode, sets, run, failures, evaluation))
        if args.ranking_png is not None:
            from keyreid.runtime.results.ranking_figure import encode_png, ranking_figure
            write_bytes(args.ranking_png, encode_png(ranking_figure(evaluation, args.ranking_queries)))
        if evaluation.unlabelled_queries:
            print(f"{len(evaluation.unlabelled_queries)} queries without an identity were not ranked "
                  f"(e.g. {evaluation.unlabelled_queries[0]})")
        print(evaluation.ranking.summary())
    steps.done()
    for path in (args.output, args.report, args.ranking_png):
        if path is not None:
            print(f"wrote {path}")

    if failures and not args.keep_going:
        print(f"error: {len(failures)} tracklet(s) failed; the outputs hold the others "
              "(--keep-going exits 0)", file=sys.stderr)
        return 1
    if without_pose and not args.allow_no_pose:
        print(f"error: {len(without_pose)} tracklet(s) have no keypoints at all (listed above); their part "
              "features carry no pose information (--allow-no-pose exits 0)", file=sys.stderr)
        return 1
    return 0


def warn_without_pose(names: List[str]) -> None:
    """One warning per tracklet without any pose source (the first MAX_LISTED_WITHOUT_POSE)."""
    for name in names[:MAX_LISTED_WITHOUT_POSE]:
        print(f"warning: tracklet {name} has no keypoints at all (no .pose file or keypoints.json entry "
              "for any frame): its part features carry no pose information", file=sys.stderr)
    if len(names) > MAX_LISTED_WITHOUT_POSE:
        print(f"warning: ... and {len(names) - MAX_LISTED_WITHOUT_POSE} more tracklets without keypoints",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_main(main))
