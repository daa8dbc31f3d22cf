"""End-to-end demo on made-up data: random checkpoint -> ONNX -> embeddings and retrieval.

    python -m keyreid.demo [DIR] [--reduced]

exit status: 0 done; 1 a step failed or DIR cannot be used; 2 wrong command-line usage.

The checkpoint has random weights (no trained weights can be downloaded here), so the numbers
mean nothing; the point is the workflow. Every step is one of the real command-line tools, run
as a module (``python -m keyreid.export.to_onnx ...``, so it works from any install), and the
command is printed first.
"""
import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from keyreid.cli import program_name, run_main
from keyreid.errors import KeyreidError


def write_demo_tracklets(root: Path, identities: int = 4, seed: int = 0) -> None:
    """MARS-style tracklet folders (frames + .pose files) for ``identities`` people on two cameras."""
    from keyreid.synthetic import synthetic_frames, write_synthetic_tracklet

    rng = np.random.default_rng(seed)
    for split, camera in (("query", 1), ("gallery", 2)):
        for pid in range(1, identities + 1):
            # One person looks alike on both cameras: same clothes, the light differs a little.
            person = synthetic_frames(np.random.default_rng(seed + pid), 2).reshape(-1, 256, 128, 3)
            frames = np.clip(person[: 5 + pid] * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
            name = f"{pid:04d}C{camera}T0001"
            write_synthetic_tracklet(root / split / name, len(frames), rng, frames=frames,
                                     stems=[f"{name}F{index + 1:03d}" for index in range(len(frames))])


def run(module: str, *arguments) -> None:
    """``python -m module arguments``, shown first, as a user would type it."""
    command = ["-m", module, *map(str, arguments)]
    shown = " ".join(shlex.quote(part) for part in command)
    print(f"\n$ python {shown}", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *command])
    if result.returncode:
        raise KeyreidError(f"demo step failed (exit {result.returncode}): python {shown}")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("python -m keyreid.demo"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", nargs="?", type=Path, default=Path("demo"),
                        help="folder for the demo's files (default: demo/ in the current folder)")
    parser.add_argument("--reduced", action="store_true",
                        help="a narrow model with the same structure, several times faster (measured "
                             "times: README)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyreidError(f"cannot use {args.workdir} as the demo folder: {exc.strerror or exc}") from exc
    checkpoint = workdir / ("keyreid_random_reduced.pth" if args.reduced else "keyreid_random.pth")
    model = checkpoint.with_suffix(".onnx")
    print("keyreid demo: random weights, synthetic people; the embeddings mean nothing.")
    run("keyreid.export.random_checkpoint", checkpoint, *(["--reduced"] if args.reduced else []))
    run("keyreid.export.to_onnx", checkpoint, "--output", model)
    write_demo_tracklets(workdir / "tracklets")
    print(f"\nwrote synthetic tracklets (frames + .pose files) under {workdir / 'tracklets'}")
    run("keyreid.runtime.infer", "--engine", model, "--tracklets", workdir / "tracklets" / "gallery",
        "--output", workdir / "gallery_embeddings.npz")
    run("keyreid.runtime.infer", "--engine", model, "--query", workdir / "tracklets" / "query",
        "--gallery", workdir / "tracklets" / "gallery", "--report", workdir / "report.json",
        "--ranking-png", workdir / "ranking.png")
    print(f"\ndemo finished: model {model}, embeddings {workdir / 'gallery_embeddings.npz'}, "
          f"report {workdir / 'report.json'}, ranking figure {workdir / 'ranking.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
