"""Batch embedding on Ray Data: tracklet folders or MARS -> Parquet, on one machine or a cluster.

    python runtime/batch.py --engine model.onnx --tracklets DIR [DIR ...] -o OUT
    python runtime/batch.py --engine model.plan --mars ROOT -o OUT --address HEAD:6379 --actors 8

A thin layer: find the tracklets (runtime/inputs/tracklets.py, runtime/inputs/mars.py), leave out those the
output folder already holds (runtime/results/batch_output.py), run the rest through the Ray Data pipeline
(runtime/serving/ray_pipeline.py) and write what comes back as Parquet parts, whole, as it comes.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from keyreid.cli import Steps, non_negative_float, non_negative_int, positive_float, positive_int, run_main
from keyreid.contract import MEAN_CAMERA
from keyreid.errors import KeyreidError
from keyreid.lazy import require
from keyreid.runtime.results.batch_output import (EMBEDDING_COLUMN, LABEL_COLUMNS, PART_PREFIX, PART_SUFFIX, BatchOutput,
                                          engine_identity)
from keyreid.runtime.cli_args import ENGINE_HELP, add_engine_arguments, add_frame_limit_argument, \
    check_engine_arguments, engine_location, engine_options
from keyreid.runtime.backends import backend_named, open_engine
from keyreid.runtime.serving.pipeline import describe_failure
from keyreid.runtime.inputs.poses import PoseTally
from keyreid.runtime.serving.ray_pipeline import PipelineOptions, add_pose_counts, embedding_dataset, work_rows
from keyreid.runtime.inputs.tracklets import TrackletFailure, discover_tracklets, failure_lines

DESCRIPTION = """\
Embed tracklets with a KeyRe-ID engine on Ray Data, on this machine (a local Ray instance) or
on a Ray cluster (--address), and write one Parquet row per tracklet: name, source, pid,
camera, frames, clips and the embedding (the mean of its clips' embeddings, as infer.py
computes it). Frames are decoded by Ray tasks on CPUs; the engine runs in a pool of Ray actors,
one engine each, on GPUs where the backend needs one.

The output folder is resumable: parts are written whole as results come in, and a rerun skips
every tracklet the folder already holds, so each tracklet is written exactly once, even when a
worker, a node or the run itself dies. On a cluster, every node needs keyreid with the [ray]
extra, and the frames, the engine file and the output folder must be at the same paths on
every node (a shared file system)."""

EPILOG = f"""\
output (-o DIR):
  DIR/{PART_PREFIX}<run>-<n>{PART_SUFFIX}   columns name (string), source (the --tracklets folder's
                                  name, or query/gallery for --mars), pid (-1: unknown), camera,
                                  frames, clips, embedding (float32 [E]); see docs/contract.md
  With more than one --tracklets folder, names are <folder>/<tracklet>.
  python runtime/gallery.py build DIR -o ARCHIVE adds them to an archive gallery (LanceDB).

what fails and what does not:
  A tracklet whose frames cannot be decoded, whose camera the engine does not know, or whose
  outputs are NaN or infinite fails alone; the others are written, and the failures are listed
  at the end (a rerun tries them again). A worker or actor that dies is replaced by Ray and its
  work redone (--max-restarts). A run that stops (Ctrl-C, a lost cluster) keeps every part it
  wrote; run the same command again to go on.

exit status:
  0    every tracklet is in the output folder
  1    bad input (engine, folders, options; nothing is written), the Ray pipeline stopped
       (what was written stays), or some tracklets failed (--keep-going makes this 0)
  2    wrong command-line usage
  130  interrupted (Ctrl-C), 143 terminated (SIGTERM): finished rows are written first"""

DEFAULT_ROWS_PER_PART = 1000        # ViT-B: 77 MB of embeddings per part
DEFAULT_PART_SECONDS = 60.0         # a slow run still saves its progress every minute
RAY_LOGGERS = ("ray", "ray.data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch.py", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=engine_location, required=True, metavar="FILE|URL", help=ENGINE_HELP)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--tracklets", type=Path, nargs="+", metavar="DIR",
                        help="folders of tracklet folders (infer.py's layout, manifest.csv included)")
    inputs.add_argument("--mars", type=Path, metavar="ROOT", help="the MARS test split under ROOT (query and gallery)")
    parser.add_argument("--keypoints", type=Path, metavar="DIR",
                        help="MARS pose files as <pid>/<frame stem>.pose (default: ROOT/keypoints/bbox_test)")
    parser.add_argument("--camera", type=int, default=0, metavar="N",
                        help="camera of tracklets the manifest and frame names say nothing about; -1 = "
                             "unseen camera (default: %(default)s)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                        help="output folder of Parquet parts (created if missing; a rerun goes on where it stopped)")
    parser.add_argument("--keep-going", action="store_true",
                        help="exit 0 even when some tracklets failed (they are still listed)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines")
    ray_group = parser.add_argument_group("Ray options")
    ray_group.add_argument("--address", metavar="HOST:PORT",
                           help="a running Ray cluster (ray start --head), or 'auto' for the one this "
                                "machine belongs to (default: start a local Ray instance on this machine)")
    ray_group.add_argument("--actors", type=positive_int, default=1, metavar="N",
                           help="engines running at once, one per Ray actor (default: %(default)s)")
    ray_group.add_argument("--gpus-per-actor", type=non_negative_float, metavar="G",
                           help="GPUs each actor reserves; a fraction shares a GPU (default: 1 for TensorRT "
                                "engines and ONNX Runtime with --providers cuda/tensorrt, else 0)")
    ray_group.add_argument("--cpus-per-actor", type=non_negative_float, default=1.0, metavar="C",
                           help="CPUs each actor reserves in Ray's accounting (default: %(default)g)")
    ray_group.add_argument("--decode-cpus", type=positive_float, default=1.0, metavar="C",
                           help="CPUs each decoding task reserves; 0.5 runs two per core (default: %(default)g)")
    ray_group.add_argument("--tracklets-per-batch", type=positive_int, default=4, metavar="N",
                           help="tracklets an actor gets per call; their clips share engine batches "
                                "(default: %(default)s)")
    ray_group.add_argument("--max-restarts", type=non_negative_int, default=3, metavar="N",
                           help="times a dead actor is restarted and its batch retried (default: %(default)s)")
    ray_group.add_argument("--object-store-gib", type=positive_float, metavar="GIB",
                           help="local Ray only: shared memory for decoded frames in flight (default: Ray's, "
                                "30%% of the memory); Ray Data slows decoding down before it fills")
    out_group = parser.add_argument_group("output options")
    out_group.add_argument("--rows-per-part", type=positive_int, default=DEFAULT_ROWS_PER_PART, metavar="N",
                           help="tracklets per Parquet part; bounds the rows held before writing (default: %(default)s)")
    out_group.add_argument("--part-seconds", type=positive_float, default=DEFAULT_PART_SECONDS, metavar="S",
                           help="write a part at least this often while rows come in (default: %(default)g)")
    add_engine_arguments(parser)
    add_frame_limit_argument(parser)
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.keypoints is not None and args.mars is None:
        parser.error("--keypoints is for --mars")
    if args.camera < MEAN_CAMERA:
        parser.error(f"--camera must be a 0-based camera index or {MEAN_CAMERA} (unseen camera), got {args.camera}")
    if args.object_store_gib is not None and args.address is not None:
        parser.error("--object-store-gib sizes a local Ray instance; a cluster's is set by ray start")
    check_engine_arguments(parser, args, [args.engine])


def default_gpus(args: argparse.Namespace, options: Dict[str, object]) -> float:
    """A GPU per actor where the backend needs one (its declaration says so) or is told to use
    one (ONNX Runtime's GPU providers)."""
    if "backend" in options and backend_named(str(options["backend"])).needs_gpu:
        return 1.0
    providers = args.providers or []
    return 1.0 if any(name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for name in providers) else 0.0


# ----------------------------------------------------------------------------- the work

def find_work(args: argparse.Namespace) -> Tuple[List[Dict[str, object]], List[TrackletFailure], List[Path]]:
    """Work rows of every tracklet, the failures found while looking, and the input folders."""
    rows: List[Dict[str, object]] = []
    failures: List[TrackletFailure] = []
    if args.mars is not None:
        from keyreid.runtime.inputs.mars import load_mars_test
        split = load_mars_test(args.mars, args.keypoints)
        if not split.keypoints_dir_exists:
            print(f"warning: keypoints directory {split.keypoints_dir} does not exist; every frame runs "
                  "with no joints visible (see --keypoints)", file=sys.stderr)
        rows += work_rows(split.query, "query") + work_rows(split.gallery, "gallery")
        return rows, list(split.failures), [args.mars]
    sources = [folder.name or str(folder) for folder in args.tracklets]
    if len(set(sources)) < len(sources):
        raise KeyreidError(f"--tracklets folders must have different names (they prefix the tracklet names), "
                           f"got {', '.join(map(str, args.tracklets))}")
    prefixed = len(args.tracklets) > 1
    for folder, source in zip(args.tracklets, sources):
        scan = discover_tracklets(folder, default_camera=args.camera)
        prefix = f"{source}/" if prefixed else ""
        for row in work_rows(scan.tracklets, source):
            row["name"] = prefix + str(row["name"])
            rows.append(row)
        failures += [TrackletFailure(prefix + failure.name, failure.reason) for failure in scan.failures]
        ignored = scan.ignored_summary()
        if ignored:
            print(ignored, file=sys.stderr)
    return rows, failures, list(args.tracklets)


def check_output_folder(output: Path, inputs: Sequence[Path], engine: object) -> None:
    """The output folder may not be, or lie inside, an input folder, nor be the engine."""
    resolved = output.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if resolved == folder or folder in resolved.parents:
            raise KeyreidError(f"--output {output} is inside the input folder {folder}; give a folder elsewhere")
    if isinstance(engine, Path) and resolved == engine.resolve():
        raise KeyreidError(f"--output {output} is the engine file")


# ----------------------------------------------------------------------------- Ray

def start_ray(ray, args: argparse.Namespace) -> None:
    """``ray.init`` on a new local instance, or connected to the cluster at --address."""
    options = {"log_to_driver": not args.quiet, "logging_level": logging.WARNING if args.quiet else logging.INFO}
    if args.address is None:
        options.update(address="local", include_dashboard=False)
        if args.object_store_gib is not None:
            options["object_store_memory"] = int(args.object_store_gib * (1 << 30))
    else:
        options["address"] = args.address
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {args.address}" if args.address else "a local Ray instance"
        raise KeyreidError(f"cannot start or reach {where}: {str(exc).strip().splitlines()[0]}") from exc
    context = require("ray.data").DataContext.get_current()
    context.enable_progress_bars = not args.quiet
    if args.quiet:          # after ray.init and Ray Data's import, which set up their loggers
        for name in RAY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def pipeline_failure(exc: BaseException, written: int, output: Path) -> KeyreidError:
    """One sentence for a pipeline Ray gave up on: the KeyreidError inside it if there is one
    (an engine that would not open), else Ray's own first line."""
    cause: Optional[BaseException] = exc
    while cause is not None and not isinstance(cause, KeyreidError):
        cause = getattr(cause, "cause", None) or cause.__cause__
    reason = str(cause) if cause is not None else describe_failure(exc)
    return KeyreidError(f"the Ray pipeline stopped: {reason}. {written} tracklets were written to {output}; "
                        "run the same command again to go on")


class PartWriter:
    """Rows from the pipeline -> parts of at most N rows, written whole when N rows are in, or
    S seconds after the last part, whichever comes first."""

    def __init__(self, output: BatchOutput, rows_per_part: int, part_seconds: float, quiet: bool):
        self.output, self.rows_per_part, self.part_seconds, self.quiet = output, rows_per_part, part_seconds, quiet
        self._pieces: List[Dict[str, np.ndarray]] = []
        self._count = 0
        self._since = time.monotonic()
        self.names: set = set()

    def add(self, batch: Dict[str, np.ndarray], keep: np.ndarray) -> None:
        self._pieces.append({name: np.asarray(batch[name])[keep] for name in (*LABEL_COLUMNS, EMBEDDING_COLUMN)})
        self._count += int(keep.sum())
        while self._count >= self.rows_per_part:
            self._write(self.rows_per_part)
        if time.monotonic() - self._since >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        """Write every row held (on time, at the end, or when the run stops)."""
        if self._count:
            self._write(self._count)

    def _write(self, count: int) -> None:
        rows = {name: np.concatenate([piece[name] for piece in self._pieces]) for name in self._pieces[0]}
        path = self.output.write_part({name: values[:count] for name, values in rows.items()})
        self._pieces = [{name: values[count:] for name, values in rows.items()}]
        self._count -= count
        self._since = time.monotonic()
        if not self.quiet:
            print(f"      wrote {path.name} ({count} tracklets)", file=sys.stderr, flush=True)


def run_pipeline(ray, rows: List[Dict[str, object]], options: PipelineOptions, writer: PartWriter,
                 tally: PoseTally) -> Tuple[List[TrackletFailure], int]:
    """Run ``rows`` and write what comes back; (failures, clips of the written tracklets)."""
    failures: List[TrackletFailure] = []
    clips = 0
    stopped: Optional[BaseException] = None
    try:
        for batch in embedding_dataset(rows, options).iter_batches(batch_size=None, batch_format="numpy"):
            errors = np.asarray(batch["error"], dtype=str)
            names = np.asarray(batch["name"], dtype=str)
            for counts in batch["poses"]:
                add_pose_counts(tally, str(counts))
            # Ray hands each row over once; a name seen twice (never expected) is not written twice.
            fresh = np.array([name not in writer.names for name in names], dtype=bool)
            keep = (errors == "") & fresh
            failures += [TrackletFailure(name, reason) for name, reason in zip(names[errors != ""], errors[errors != ""])]
            writer.names.update(names[keep].tolist())
            clips += int(np.asarray(batch["clips"])[keep].sum())
            writer.add(batch, keep)
    except ray.exceptions.RayError as exc:
        stopped = exc
    finally:
        writer.flush()          # finished rows are kept, also on Ctrl-C or an error
    if stopped is not None:
        raise pipeline_failure(stopped, writer.output.written_rows, writer.output.folder) from stopped
    return failures, clips


def print_summary(failures: List[TrackletFailure], done: int, skipped: int, clips: int, seconds: float,
                  tally: PoseTally) -> None:
    rate = clips / seconds if seconds > 0 else 0.0
    print(f"tracklets: {done} written, {len(failures)} failed, {skipped} already in the output "
          f"({clips} clips in {seconds:.1f} s, {rate:.1f} clips/s)")
    for line in failure_lines(failures):
        print(line)
    if tally.total:
        print(tally.summary())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    options = engine_options(args, args.engine)
    engine = open_engine(args.engine, **options)        # checks the file and the options
    if not default_gpus(args, options):
        # Load it once here, where a bad file is one clear error, before Ray starts any actor
        # (an actor's failure to load would come back wrapped in Ray's own errors). A GPU engine
        # is left to the actors: the driver of a cluster may have no GPU.
        with engine:
            pass
    ray = require("ray")                        # before anything is made: says which extra is missing

    steps = Steps(total=3, quiet=args.quiet)
    steps("finding tracklets")
    rows, failures, inputs = find_work(args)
    check_output_folder(args.output, inputs, args.engine)
    names = [str(row["name"]) for row in rows]
    if len(set(names)) < len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise KeyreidError(f"tracklet name {duplicate!r} occurs twice; names identify rows of the output")

    with BatchOutput(args.output, engine_identity(args.engine)) as output:
        done = output.done_names()
        todo = [row for row in rows if row["name"] not in done]
        skipped = len(rows) - len(todo)
        tally = PoseTally()
        clips, seconds = 0, 0.0
        if todo:
            steps(f"starting Ray ({'cluster at ' + args.address if args.address else 'local instance'})")
            start_ray(ray, args)
            pipeline = PipelineOptions(
                engine=args.engine, engine_options=options, actors=args.actors,
                cpus_per_actor=args.cpus_per_actor,
                gpus_per_actor=default_gpus(args, options) if args.gpus_per_actor is None else args.gpus_per_actor,
                decode_cpus=args.decode_cpus, tracklets_per_batch=args.tracklets_per_batch,
                max_batch_size=args.max_batch, max_frame_side=args.max_frame_side, max_restarts=args.max_restarts)
            steps(f"embedding {len(todo)} tracklets ({sum(int(row['clips']) for row in todo)} clips; "
                  f"{skipped} already in {args.output})")
            writer = PartWriter(output, args.rows_per_part, args.part_seconds, args.quiet)
            started = time.perf_counter()
            try:
                run_failures, clips = run_pipeline(ray, todo, pipeline, writer, tally)
            finally:
                ray.shutdown()
            seconds = time.perf_counter() - started
            failures += run_failures
        steps.done()
        print_summary(failures, output.written_rows, skipped, clips, seconds, tally)
        print(f"wrote {len(output.written_parts)} part(s) to {args.output}" if output.written_parts
              else f"nothing new to write to {args.output}")

    if failures and not args.keep_going:
        print(f"error: {len(failures)} tracklet(s) failed; the output holds the others "
              "(--keep-going exits 0; a rerun tries the failed ones again)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
