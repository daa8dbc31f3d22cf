"""Engines timed in interleaved rounds, so that drift in a shared host's speed hits all alike.

    python benchmarks/interleaved.py fp32.onnx int8.onnx [model_int8.xml] [--openvino f32 bf16] [--batch-sizes 1 8]

Each turn runs one untimed call, then ``CLIPS_PER_TURN`` clips in consecutive calls.
``run.py`` measures one engine after another; on a shared virtual machine the host's load can
move an engine's speed by 20% between minutes (seen: the same int8 file at 5.5 and 7.0 clips/s
ten minutes apart), which distorts ratios between engines. Here every round times each engine
once per batch size, in turn, and the medians over rounds are reported, with each engine's
ratio to the first one. The ONNX files run on ONNX Runtime (``OrtEngine``, as users get it),
OpenVINO IR files (.xml, e.g. export/to_openvino.py's int8) on OpenVINO at f32;
``--openvino`` adds the first file on OpenVINO at the given compute precisions.
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

from keyreid.cli import positive_int, run_main

# Clips each engine runs per turn, in consecutive calls after one untimed call: steady-state speed
# (a single cold call right after another engine ran measures its wake-up, not its speed).
CLIPS_PER_TURN = 8
from keyreid.runtime.backends.formats import model_kind

HERE = Path(__file__).resolve().parent

from keyreid.benchmarks.machine import banner, describe
from keyreid.benchmarks.model_speed import onnxruntime_runner, openvino_runner, sample_feed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="ONNX files (ONNX Runtime) and OpenVINO IR .xml files (OpenVINO)")
    parser.add_argument("--openvino", nargs="*", default=[], choices=("f32", "bf16"),
                        help="also run the first file on OpenVINO at these compute precisions")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8], metavar="N")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--threads", type=positive_int, default=2, metavar="N",
                        help="inference threads of every engine (default: %(default)s)")
    parser.add_argument("--num-cameras", type=positive_int, default=6, metavar="C")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(banner(describe(args.threads)), flush=True)
    runners = {}
    for path in args.models:
        if model_kind(path) == "openvino":
            runners[f"openvino {path.stem}"] = openvino_runner(path, args.threads)
        else:
            runners[f"onnxruntime {path.stem}"] = onnxruntime_runner(path, args.threads)
    for precision in args.openvino:
        runners[f"openvino {precision} {args.models[0].stem}"] = openvino_runner(args.models[0], args.threads,
                                                                                 precision)
    feeds = {batch: sample_feed(batch, args.num_cameras) for batch in args.batch_sizes}
    for run in runners.values():            # warm-up, not timed
        run(feeds[args.batch_sizes[0]])
    rates = {(name, batch): [] for name in runners for batch in feeds}
    for round_index in range(args.rounds):
        for batch, feed in feeds.items():
            calls = math.ceil(CLIPS_PER_TURN / batch)
            for name, run in runners.items():
                run(feed)       # untimed: the engine's threads and caches warm up after the others ran
                start = time.perf_counter()
                for _ in range(calls):
                    run(feed)
                rates[name, batch].append(calls * batch / (time.perf_counter() - start))
        print(f"round {round_index + 1} of {args.rounds} done", flush=True)
    first = next(iter(runners))
    print(f"\n{'engine':<40}" + "".join(f"{f'batch {batch} clips/s':>20}{'ratio':>8}" for batch in feeds))
    for name in runners:
        cells = ""
        for batch in feeds:
            median = statistics.median(rates[name, batch])
            cells += f"{median:>20.3f}{median / statistics.median(rates[first, batch]):>7.2f}x"
        print(f"{name:<40}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
