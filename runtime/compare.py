"""Run two engines on the same clips, or an engine on the clips of a reference file.

    python runtime/compare.py --engine model_fp16.plan --engine model.onnx
    python runtime/compare.py --engine model.onnx --reference ckpt_reference.npz
    python runtime/compare.py --engine a.onnx --engine b.onnx --tracklets DIR --clips 32

A reference file holds sample clips and the checkpoint's reference-model outputs on them; it is
written where torch is installed by ``export/reference_outputs.py`` (the runtime reads files of
the steps before it and never imports them).

Prints the comparator's per-output table (max / mean / p99 absolute error, relative error,
cosine) and how often the two agree on the top-k retrieval order when the clips are ranked
against each other by squared Euclidean distance.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np

from keyreid.cli import positive_int, program_name, run_main
from keyreid.comparator import ComparisonReport, Tolerance, compare_outputs
from keyreid.contract import camera_problem, stack_clips
from keyreid.errors import KeyreidError
from keyreid.tolerances import TOLERANCES, looser, precision_row
from keyreid.reference_results import read_reference_results
from keyreid.runtime.cli_args import (add_engine_arguments, add_frame_limit_argument, check_engine_arguments,
                                      cpu_banner, engine_banner, engine_location, engine_options)
from keyreid.runtime.backends.formats import model_kind
from keyreid.runtime.backends import Engine, open_engine
from keyreid.runtime.backends.base import run_in_pieces
from keyreid.runtime.results.evaluation import squared_euclidean_distances
from keyreid.runtime.serving.pipeline import load_tracklet_clips
from keyreid.plan_sidecar import check_built_from, read_sidecar
from keyreid.runtime.inputs.poses import PoseTally
from keyreid.runtime.serving.runner import DEFAULT_MAX_BATCH_SIZE
from keyreid.runtime.inputs.tracklets import DEFAULT_CAMERA, discover_tracklets
from keyreid.synthetic import synthetic_feed

DESCRIPTION = """\
Compare an engine against a second engine on the same clips (synthetic clips with realistic
poses by default, or clips cut from a folder of tracklets), or against a reference file: the
checkpoint's reference model (PyTorch, docs/contract.md sections 2-3 written out literally) run on sample
clips by export/reference_outputs.py. The first --engine is the one under test; the second
--engine, or --reference, is what the errors are measured against."""

EPILOG = """\
checks (exit 1 when one fails):
  embedding      relative error (worst row's max |a - b| over max |b|) <= --tolerance-rel,
                 and cosine >= --tolerance-cosine
  part_weights   max absolute error <= --part-weights-abs
  retrieval      with --min-agreement F: at least a fraction F of the clips has the same
                 top-k neighbours in the same order under both (default: only reported)
By default the tolerances are the ones the export verified the file at, by its precision or
the compute precision a backend lowers it to (TensorRT's tf32, OpenVINO's bf16), the looser of
two engines' (keyreid/tolerances.py):
{TOLERANCE_TABLE}
A --tolerance-* flag replaces that bound; pass "none" to skip that check.

Make a reference file where torch is installed:
  python export/reference_outputs.py ckpt.pth -o ref.npz --heatmap-mode MODE
with the heatmap mode the engine was exported with (compare.py warns when the engine's metadata
says another one).

exit status: 0 within tolerance; 1 outside it, or bad input; 2 wrong usage; 130 interrupted, 143 terminated."""

DEFAULT_CLIPS = 16
DEFAULT_TOP_K = 5
SKIP = "none"       # a tolerance flag's value that skips its check (not given: the table's bound)


def _tolerance_table() -> str:
    return "\n".join(f"  {row:<6} embedding {bounds['embedding'].describe()}, part_weights "
                     f"{bounds['part_weights'].describe()}" for row, bounds in TOLERANCES.items())


EPILOG = EPILOG.replace("{TOLERANCE_TABLE}", _tolerance_table())


def optional_float(text: str) -> Union[float, str]:
    if text.strip().lower() in ("none", "off"):
        return SKIP
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("compare.py"), description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=engine_location, action="append", required=True, metavar="FILE|URL",
                        help="engine under test; give it twice to compare two engines "
                             "(.onnx, .plan/.engine/.trt, grpc://HOST:PORT/MODEL, http://HOST:PORT/MODEL)")
    parser.add_argument("--reference", type=Path, metavar="REF.npz",
                        help="compare against this reference file (clips and the checkpoint's "
                             "reference outputs, from export/reference_outputs.py) instead")
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--tracklets", type=Path, metavar="DIR",
                        help="take clips from this folder of tracklet folders (the layout infer.py "
                             "reads) instead of synthetic ones")
    inputs.add_argument("--clips", type=positive_int, metavar="N",
                        help=f"synthetic clips to make, or the most clips taken from --tracklets "
                             f"(default: {DEFAULT_CLIPS} synthetic; all clips of the tracklets)")
    inputs.add_argument("--camera", type=int, default=None, metavar="N",
                        help=f"camera of --tracklets tracklets without one (default: {DEFAULT_CAMERA})")
    inputs.add_argument("--seed", type=int, default=0, help="seed of the synthetic clips (default: 0)")
    add_frame_limit_argument(inputs)
    checks = parser.add_argument_group("tolerances")
    checks.add_argument("--tolerance-rel", type=optional_float, metavar="X",
                        help="largest embedding relative error (default: by precision, below)")
    checks.add_argument("--tolerance-cosine", type=optional_float, metavar="C",
                        help="smallest embedding cosine similarity (default: by precision, below)")
    checks.add_argument("--part-weights-abs", type=optional_float, metavar="X",
                        help="largest part_weights absolute error (default: by precision, below)")
    checks.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K, metavar="K",
                        help="neighbours compared in the retrieval check (default: %(default)s)")
    checks.add_argument("--min-agreement", type=float, default=None, metavar="F",
                        help="fail when fewer than this fraction of clips keep their top-k order "
                             "(default: report only)")
    add_engine_arguments(parser)
    return parser


@dataclass(frozen=True)
class RetrievalAgreement:
    top_k: int
    agreeing: int         # clips whose top-k neighbour lists are identical, in order
    clips: int
    mean_overlap: float   # neighbours the two top-k lists share, on average

    @property
    def fraction(self) -> float:
        return self.agreeing / self.clips if self.clips else 1.0

    def summary(self) -> str:
        return (f"top-{self.top_k} retrieval order: {self.agreeing}/{self.clips} clips agree "
                f"({self.fraction:.1%}), on average {self.mean_overlap:.2f} of {self.top_k} neighbours shared")


def top_k_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """[N, k] indices of each clip's k nearest other clips, nearest first (stable on ties)."""
    distances = squared_euclidean_distances(embeddings, embeddings).astype(np.float64)
    np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def retrieval_agreement(actual: np.ndarray, expected: np.ndarray, top_k: int) -> Optional[RetrievalAgreement]:
    """How often ranking the clips against each other gives the same top-k; None below 2 clips."""
    clips = len(expected)
    k = min(top_k, clips - 1)
    if k < 1:
        return None
    mine, theirs = top_k_neighbours(actual, k), top_k_neighbours(expected, k)
    agreeing = int(np.all(mine == theirs, axis=1).sum())
    overlap = float(np.mean([len(set(a) & set(b)) for a, b in zip(mine.tolist(), theirs.tolist())]))
    return RetrievalAgreement(k, agreeing, clips, overlap)


def tracklet_clips(root: Path, limit: Optional[int], default_camera: int,
                   max_frame_side: int) -> Dict[str, np.ndarray]:
    scan = discover_tracklets(root, default_camera=default_camera)
    tally = PoseTally()
    clips = load_tracklet_clips(scan.tracklets, tally, limit, max_frame_side)
    if tally.without_pose:
        print(tally.summary(), file=sys.stderr)
    return stack_clips(clips)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if len(args.engine) > 2:
        parser.error("give --engine at most twice")
    if len(args.engine) == 2 and args.reference is not None:
        parser.error("compare against a second --engine or a --reference file, not both")
    if len(args.engine) == 1 and args.reference is None:
        parser.error("give a second --engine or a --reference file to compare against")
    if args.reference is not None and (args.tracklets is not None or args.clips is not None):
        parser.error("--reference brings its own clips; --tracklets and --clips apply to two engines")
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        parser.error("--min-agreement is a fraction between 0 and 1")
    if args.camera is not None and args.tracklets is None:
        parser.error("--camera applies to --tracklets only")


def _bound(given: Union[float, str, None], table_value: Optional[float]) -> Optional[float]:
    """A flag's value over the table's; SKIP turns the check off."""
    if given is None:
        return table_value
    return None if given == SKIP else given


def tolerances(args: argparse.Namespace, row: str) -> Dict[str, Tolerance]:
    """The bounds of TOLERANCES[row], with the tolerance flags given on top."""
    embedding, part_weights = TOLERANCES[row]["embedding"], TOLERANCES[row]["part_weights"]
    return {"embedding": Tolerance(max_rel=_bound(args.tolerance_rel, embedding.max_rel),
                                   min_cosine=_bound(args.tolerance_cosine, embedding.min_cosine)),
            "part_weights": Tolerance(max_abs=_bound(args.part_weights_abs, part_weights.max_abs))}


def engine_row(engine: Engine) -> str:
    """The TOLERANCES row of an active engine (keyreid/tolerances.py)."""
    return precision_row(engine.metadata.precision if engine.metadata else None, engine.compute_precision)


def compare(actual: Dict[str, np.ndarray], expected: Dict[str, np.ndarray],
            args: argparse.Namespace, row: str = "fp32") -> ComparisonReport:
    bounds = tolerances(args, row)
    try:
        return compare_outputs(actual, expected, bounds)
    except ValueError as exc:
        raise KeyreidError(f"the outputs cannot be compared: {exc}") from exc


def check_plan_sources(engines: Sequence[Union[str, Path]]) -> None:
    """A TensorRT plan compared with an ONNX file must have been built from that file: say so
    before spending minutes on two engines that were never meant to agree."""
    plans = [path for path in engines if model_kind(path) == "tensorrt"]
    models = [path for path in engines if model_kind(path) == "onnx"]
    if len(plans) == 1 and len(models) == 1:
        check_built_from(plans[0], read_sidecar(plans[0]), models[0])


def describe_engine(engine: Engine) -> str:
    metadata = engine.metadata
    details = [f"{engine.embedding_dim}-d"]
    if metadata is not None:
        details += [f"precision {metadata.precision}", f"heatmap_mode {metadata.heatmap_mode.value}"]
    return f"{engine.path} ({', '.join(details)}; {engine_banner(engine)})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    check_engine_arguments(parser, args, args.engine)
    check_plan_sources(args.engine)

    reference = read_reference_results(args.reference) if args.reference is not None else None
    with open_engine(args.engine[0], **engine_options(args, args.engine[0])) as engine:
        if reference is not None:
            feed = reference.feed
            source = f"{len(feed['camera'])} clips of {args.reference}"
        elif args.tracklets is not None:
            # A camera not given is checked with the clips, by the engine, naming --num-cameras.
            reason = camera_problem(args.camera, engine.num_cameras) if args.camera is not None else None
            if reason:
                raise KeyreidError(f"--camera {args.camera}: {reason}")
            feed = tracklet_clips(args.tracklets, args.clips, DEFAULT_CAMERA if args.camera is None else args.camera,
                                  args.max_frame_side)
            source = f"{len(feed['camera'])} clips from {args.tracklets}"
        else:
            feed = synthetic_feed(args.clips or DEFAULT_CLIPS, engine.num_cameras, args.seed)
            source = f"{len(feed['camera'])} synthetic clips (seed {args.seed})"
        print(cpu_banner())
        print(f"under test: {describe_engine(engine)}")
        batch = args.max_batch or engine.max_batch or DEFAULT_MAX_BATCH_SIZE
        actual = run_in_pieces(engine.infer, feed, batch)
        engine_mode = engine.metadata.heatmap_mode.value if engine.metadata else None
        row = engine_row(engine)

    if reference is not None:
        mode = reference.info.get("heatmap_mode")
        print(f"reference:  {args.reference} (checkpoint {reference.info.get('checkpoint', '?')}, "
              f"PyTorch reference model, heatmap mode {mode})")
        if engine_mode is not None and mode is not None and engine_mode != mode:
            print(f"warning: the engine was exported with heatmap mode {engine_mode}, the reference "
                  f"file used {mode}; part_weights will differ", file=sys.stderr)
        expected = reference.expected
    else:
        with open_engine(args.engine[1], **engine_options(args, args.engine[1], index=1)) as reference:
            print(f"reference:  {describe_engine(reference)}")
            expected = run_in_pieces(reference.infer, feed, min(batch, reference.max_batch or batch))
            row = looser(row, engine_row(reference))
    print(f"inputs:     {source}, batches of {batch}")
    print(f"tolerances: {row} (by precision; --tolerance-rel, --tolerance-cosine, --part-weights-abs override)")

    report = compare(actual, expected, args, row)
    print(report.table())
    agreement = retrieval_agreement(actual["embedding"], expected["embedding"], args.top_k)
    failures = report.failures()
    if agreement is None:
        print("retrieval order: not checked (needs at least 2 clips)")
    else:
        print(agreement.summary())
        if args.min_agreement is not None and agreement.fraction < args.min_agreement:
            failures.append(f"retrieval: {agreement.fraction:.1%} of clips keep their top-{agreement.top_k} "
                            f"order, below {args.min_agreement:.1%}")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
