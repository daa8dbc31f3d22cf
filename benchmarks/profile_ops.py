"""Where an ONNX model spends its time in ONNX Runtime: per-op-type and per-node totals.

    python benchmarks/profile_ops.py model.onnx [--batch 1] [--threads 2] [--runs 3] [--top 15]

Runs the model on sample clips with ONNX Runtime's profiler on (one warm-up call, then ``runs``
profiled calls) and prints the op types and the nodes that took the most time per call. Used to
find the int8 gap and the fp32 batch scaling (benchmarks/RESULTS.md).
"""
import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

from keyreid.cli import run_main


def profile(onnx_path: Path, batch: int, threads: int, runs: int, num_cameras: int = 6):
    """({op type: ms per call}, {node name: (op type, ms per call)})."""
    import onnxruntime as ort
    from keyreid.synthetic import MARS_CROP_SIZE, synthetic_feed

    feed = synthetic_feed(batch, num_cameras, crop_sizes=[MARS_CROP_SIZE])
    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(scratch, "profile")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_type, by_node = collections.Counter(), {}
    calls = 0
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            calls += 1
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op_type = event["args"].get("op_name", "?")
        node = event["name"][:-len("_kernel_time")]
        by_type[op_type] += event["dur"]
        previous = by_node.get(node, (op_type, 0))[1]
        by_node[node] = (op_type, previous + event["dur"])
    scale = 1e-3 / max(calls, 1)   # microseconds summed over all calls -> ms per call
    return ({name: value * scale for name, value in by_type.items()},
            {name: (op, value * scale) for name, (op, value) in by_node.items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="ONNX model to profile")
    parser.add_argument("--batch", type=int, default=1, help="clips per call (default: 1)")
    parser.add_argument("--threads", type=int, default=2,
                        help="inference threads: ONNX Runtime's, inside one operator (default: 2)")
    parser.add_argument("--runs", type=int, default=3, help="profiled calls after one warm-up (default: 3)")
    parser.add_argument("--top", type=int, default=15, help="nodes to list (default: 15)")
    args = parser.parse_args(argv)
    by_type, by_node = profile(args.model, args.batch, args.threads, args.runs)
    total = sum(by_type.values())
    print(f"{args.model.name}, batch {args.batch}, {args.threads} threads: {total:.1f} ms of kernel time per call "
          f"({total / args.batch:.1f} ms per clip)")
    print(f"{'op type':<28}{'ms/call':>10}{'share':>8}")
    for name, value in sorted(by_type.items(), key=lambda item: -item[1]):
        print(f"{name:<28}{value:>10.2f}{value / total:>8.1%}")
    print(f"\n{'node':<60}{'op type':<26}{'ms/call':>10}")
    for name, (op, value) in sorted(by_node.items(), key=lambda item: -item[1][1])[:args.top]:
        print(f"{name[:59]:<60}{op:<26}{value:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
