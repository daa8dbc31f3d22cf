"""Archives at scale: batch.py against infer.py, and the LanceDB archive gallery at 100 000 ViT-B
features.

    python benchmarks/bench_archive.py batch --engine vit_b.onnx [--tracklets 24] [--rounds 2]
    python benchmarks/bench_archive.py archive [--rows 100000] [--workdir DIR]
    python -m pytest benchmarks/bench_archive.py --benchmark-only      (a small archive, quickly)

``batch`` times both tools on the same synthetic tracklet folder, in interleaved rounds (so host
drift hits both alike), each as its own process from start to exit, and reads the clips/s each
prints for its embedding loop. Both use the same ONNX Runtime threads.

``archive`` measures search in an archive of ``--rows`` features of ViT-B's width (19 200 floats,
77 KB each: 7.7 GB at 100 000). The features have the structure of re-id features, so recall is
meaningful: identities fall into look-alike groups (people dressed alike), an identity is seen in
``--per-identity`` tracklets, each tracklet is its identity's centre plus noise and a bias of
its camera; group and identity centres lie in a low-rank subspace, as learned features do. A
query is a new tracklet of a known identity. Recall@10 is against exact search (NumPy, over the
same features regenerated from their seeds), latency is per query, p50/p95, through
``ArchiveGallery.search`` (IVF-PQ, then exact re-ranking), also with a camera filter.

Everything is kept in ``--workdir`` and resumed: features are added in chunks, each from its own
seed, and a rerun continues after the last whole chunk; the index and the exact neighbours are
made once. Results go to ``--workdir``/results.json and are printed. Nothing here passes or fails
on speed.
"""
import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from keyreid.cli import program_name

REPO = Path(__file__).resolve().parent.parent
VIT_B_DIM = 19200
CHUNK_ROWS = 2000                   # features generated and added per step (154 MB at ViT-B width)
NUM_CAMERAS = 6
SUBSPACE = 256                      # rank of the identity structure
GROUP_SIZE = 10                     # identities per look-alike group
IDENTITY_SPREAD, TRACKLET_NOISE, CAMERA_BIAS = 0.6, 0.55, 0.25
K = 10
FILTERS = ("all", "other_camera", "window")
WINDOW_CAMERAS = (0, 1, 2)
WINDOW_SPAN = 0.5                   # a window covers this share of the archive's time ...
START_TIME = 1.7e9                  # ... where entry i was seen at START_TIME + i seconds


# ----------------------------------------------------------------------------- synthetic features

class FeatureSpace:
    """Deterministic re-id-like features: everything derives from ``seed``, a chunk from its index."""

    def __init__(self, dim: int, identities: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.identities = dim, identities
        basis = rng.standard_normal((SUBSPACE, dim), dtype=np.float32) / np.sqrt(SUBSPACE)
        groups = rng.standard_normal((-(-identities // GROUP_SIZE), SUBSPACE), dtype=np.float32)
        offsets = IDENTITY_SPREAD * rng.standard_normal((identities, SUBSPACE), dtype=np.float32)
        self.centres = (groups[np.arange(identities) // GROUP_SIZE] + offsets) @ basis      # [I, dim]
        self.camera_bias = CAMERA_BIAS * rng.standard_normal((NUM_CAMERAS, dim), dtype=np.float32)
        self.seed = seed

    def tracklets(self, identities: np.ndarray, cameras: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, seed])
        noise = rng.standard_normal((len(identities), self.dim), dtype=np.float32)
        return self.centres[identities] + self.camera_bias[cameras] + TRACKLET_NOISE * noise

    def chunk(self, index: int, per_identity: int):
        """Rows [index * CHUNK_ROWS, ...): (features, identities, cameras, names)."""
        rows = np.arange(index * CHUNK_ROWS, (index + 1) * CHUNK_ROWS)
        identities = rows // per_identity
        cameras = (rows * 7 + identities) % NUM_CAMERAS
        return (self.tracklets(identities, cameras, 1 + index), identities, cameras,
                [f"t{row:07d}" for row in rows])

    def queries(self, count: int):
        rng = np.random.default_rng([self.seed, 0])
        identities = rng.integers(0, self.identities, count)
        cameras = rng.integers(0, NUM_CAMERAS, count)
        return self.tracklets(identities, cameras, 10 ** 9), identities, cameras


def exact_neighbours(space: FeatureSpace, chunks: int, per_identity: int, queries: np.ndarray,
                     query_cameras: np.ndarray, windows: np.ndarray, k: int = K) -> dict:
    """Exact top-k rows and squared distances per query and filter (``FILTERS``), over every chunk
    regenerated from its seed, in float64."""
    queries64 = queries.astype(np.float64)
    query_norms = (queries64 ** 2).sum(1)
    best = {key: (np.zeros((len(queries), 0)), np.zeros((len(queries), 0), np.int64)) for key in FILTERS}
    for index in range(chunks):
        features, _, cameras, _ = space.chunk(index, per_identity)
        features = features.astype(np.float64)
        distances = (features ** 2).sum(1)[None, :] + query_norms[:, None] - 2.0 * queries64 @ features.T
        rows = index * CHUNK_ROWS + np.arange(CHUNK_ROWS)
        for key, (old_distances, old_rows) in best.items():
            masked = np.where(_allowed(key, query_cameras, windows, cameras, rows), distances, np.inf)
            merged = np.concatenate([old_distances, masked], 1)
            keep = np.argsort(merged, 1, kind="stable")[:, :k]
            merged_rows = np.concatenate([old_rows, np.broadcast_to(rows, masked.shape)], 1)
            best[key] = (np.take_along_axis(merged, keep, 1), np.take_along_axis(merged_rows, keep, 1))
    return {key: {"rows": rows, "distances": distances} for key, (distances, rows) in best.items()}


# Filters measured besides the plain search: the query's camera left out (find the person
# elsewhere), and three cameras within a time window around the query's own sightings (a search
# of the hours around an incident; a window without them would rank strangers at nearly one
# distance, where recall means nothing).
def query_windows(identities: np.ndarray, per_identity: int, rows: int) -> np.ndarray:
    """[Q, 2] first and last row (= seconds after START_TIME) of each query's window."""
    centre = identities * per_identity
    half = int(rows * WINDOW_SPAN / 2)
    return np.stack([np.maximum(centre - half, 0), np.minimum(centre + half, rows - 1)], axis=1)


def _allowed(key: str, query_cameras: np.ndarray, windows: np.ndarray, cameras: np.ndarray,
             rows: np.ndarray) -> np.ndarray:
    if key == "other_camera":
        return cameras[None, :] != query_cameras[:, None]
    if key == "window":
        return (np.isin(cameras, WINDOW_CAMERAS)[None, :] & (rows[None, :] >= windows[:, :1])
                & (rows[None, :] <= windows[:, 1:]))
    return np.ones((len(query_cameras), len(rows)), bool)


def _search_options(key: str, camera: int, window: np.ndarray) -> dict:
    if key == "other_camera":
        return {"camera": camera, "exclude": "camera"}
    if key == "window":
        return {"cameras": list(WINDOW_CAMERAS), "since": START_TIME + int(window[0]),
                "until": START_TIME + int(window[1])}
    return {}


def _percentiles(seconds) -> dict:
    values = np.asarray(seconds) * 1000.0
    return {"p50_ms": round(float(np.percentile(values, 50)), 2), "p95_ms": round(float(np.percentile(values, 95)), 2)}


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _load_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"add_seconds": 0.0}


def _save_state(path: Path, state: dict) -> None:
    from keyreid.files import write_json
    write_json(path, state)


def archive_command(args) -> dict:
    from keyreid.runtime.results.archive_gallery import ArchiveGallery

    if args.rows % CHUNK_ROWS or args.rows % args.per_identity:
        raise SystemExit(f"--rows must be a multiple of {CHUNK_ROWS} and of --per-identity")
    args.workdir.mkdir(parents=True, exist_ok=True)
    state_path = args.workdir / "state.json"
    state = _load_state(state_path)
    key = {"rows": args.rows, "dim": args.dim, "per_identity": args.per_identity, "seed": args.seed}
    if state.get("data", key) != key:
        raise SystemExit(f"{args.workdir} holds another data set ({state['data']}); give another --workdir")
    state["data"] = key
    space = FeatureSpace(args.dim, args.rows // args.per_identity, args.seed)
    archive = ArchiveGallery(args.workdir / "archive.lance", create=True, dim=args.dim)

    chunks = args.rows // CHUNK_ROWS
    done, rest = divmod(len(archive), CHUNK_ROWS)
    if rest:
        raise SystemExit(f"the archive holds {len(archive)} rows, not whole chunks; remove {args.workdir}")
    for index in range(done, chunks):          # resumed after the last whole chunk
        started = time.perf_counter()
        features, identities, cameras, names = space.chunk(index, args.per_identity)
        rows = index * CHUNK_ROWS + np.arange(CHUNK_ROWS)
        archive.add_many(features, cameras, names, START_TIME + rows, [str(i) for i in identities], ["bench"] * CHUNK_ROWS)
        state["add_seconds"] += time.perf_counter() - started
        _save_state(state_path, state)
        print(f"added chunk {index + 1}/{chunks} ({len(archive)} rows, "
              f"{(index + 1 - done) * CHUNK_ROWS * args.dim * 4 / 1e6 / state['add_seconds']:.0f} MB/s so far)",
              file=sys.stderr, flush=True)

    index_params = {"num_partitions": args.partitions, "num_sub_vectors": args.sub_vectors,
                    "sample_rate": args.sample_rate, "max_iterations": args.iterations}
    if not archive.has_index or state.get("index_params") != index_params:
        print(f"building the IVF-PQ index {index_params} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        archive.build_index(**index_params)
        state.update(index_seconds=time.perf_counter() - started, index_params=index_params,
                     peak_rss_gib_after_index=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2))
        _save_state(state_path, state)

    queries, query_identities, query_cameras = space.queries(args.queries)
    windows = query_windows(query_identities, args.per_identity, args.rows)
    truth_path = args.workdir / f"exact-{args.queries}-windows.npz"
    if not truth_path.is_file():
        print("exact neighbours (NumPy, float64) ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        truth = exact_neighbours(space, chunks, args.per_identity, queries, query_cameras, windows)
        np.savez(truth_path, **{f"{key}_{name}": values for key, found in truth.items() for name, values in found.items()})
        state["exact_seconds"] = time.perf_counter() - started
        _save_state(state_path, state)
    truth = np.load(truth_path)

    results = {"rows": args.rows, "dim": args.dim, "archive_bytes": _folder_bytes(args.workdir / "archive.lance"),
               "add_seconds": round(state["add_seconds"], 1), "index_seconds": round(state["index_seconds"], 1),
               "peak_rss_gib_after_index": state.get("peak_rss_gib_after_index"),
               "index_params": index_params, "nprobes": args.nprobes, "refine_factor": args.refine_factor,
               "queries": args.queries, "k": K, "load_before": os.getloadavg()[0]}
    for key in FILTERS:
        for run in ("first pass", "second pass"):
            latencies, found, same_identity = [], 0, 0
            for query, camera, identity, window, expected in zip(queries, query_cameras, query_identities, windows,
                                                                 truth[f"{key}_rows"]):
                started = time.perf_counter()
                matches = archive.search(query, K, nprobes=args.nprobes, refine_factor=args.refine_factor,
                                         **_search_options(key, int(camera), window))
                latencies.append(time.perf_counter() - started)
                rows = {int(match.name[1:]) for match in matches}
                found += len(rows & set(expected.tolist()))
                same_identity += sum(int(match.label) == identity for match in matches)
            results[f"{key}, {run}"] = {"recall_at_10": round(found / (K * len(queries)), 4),
                                        "same_identity_in_top10": round(float(same_identity) / (K * len(queries)), 3),
                                        **_percentiles(latencies)}
            print(f"{key}, {run}: {results[f'{key}, {run}']}", file=sys.stderr, flush=True)
    scans = []
    for query in queries[:args.exact_scans]:
        started = time.perf_counter()
        archive.search(query, K, exact=True)
        scans.append(time.perf_counter() - started)
    if scans:
        results["exact scan (no index)"] = {"queries": len(scans), **_percentiles(scans)}
    results["load_after"] = os.getloadavg()[0]
    from keyreid.files import write_json
    write_json(args.workdir / "results.json", results)
    return results


# ----------------------------------------------------------------------------- batch.py vs infer.py

_RATE = re.compile(r"\((\d+) clips in ([\d.]+) s, ([\d.]+) clips/s\)")


def _timed(command) -> dict:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    clips, seconds, rate = _RATE.search(result.stdout).groups()
    return {"wall_s": round(wall, 2), "clips": int(clips), "loop_s": float(seconds), "loop_clips_per_s": float(rate),
            "end_to_end_clips_per_s": round(int(clips) / wall, 3)}


def _batch_rounds(args, work: Path):
    """The interleaved rounds in ``work``: ({tool: [measurements]}, largest relative difference)."""
    from keyreid.runtime.results.batch_output import read_output
    from keyreid.synthetic import write_synthetic_tracklet

    rng = np.random.default_rng(0)
    for index in range(args.tracklets):
        write_synthetic_tracklet(work / "tracklets" / f"t{index:03d}", args.frames, rng)
    common = ["--engine", str(args.engine), "--tracklets", str(work / "tracklets"), "--threads", str(args.threads), "-q"]
    runs = {"infer.py": [], "batch.py": []}
    for round_index in range(args.rounds):
        order = ["infer.py", "batch.py"] if round_index % 2 == 0 else ["batch.py", "infer.py"]
        for tool in order:
            output = work / (f"{tool}-{round_index}" + ("" if tool == "batch.py" else ".npz"))
            measured = _timed([sys.executable, str(REPO / "runtime" / tool), *common, "-o", str(output),
                               *(("--max-batch", str(args.max_batch)) if args.max_batch else ())])
            runs[tool].append(measured)
            print(f"round {round_index + 1}, {tool}: {measured}", file=sys.stderr, flush=True)
    reference = np.load(work / "infer.py-0.npz")
    written = read_output(work / "batch.py-0")
    order = [written["name"].tolist().index(name) for name in reference["tracklets"].tolist()]
    relative = float(np.abs(written["embedding"][order] - reference["embeddings"]).max()
                     / np.abs(reference["embeddings"]).max())
    return runs, relative


def batch_command(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-batch-", dir=args.workdir))
    try:
        runs, relative = _batch_rounds(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"engine": str(args.engine), "tracklets": args.tracklets, "frames": args.frames,
               "threads": args.threads, "rounds": runs, "max_relative_difference": relative}
    for measure in ("end_to_end_clips_per_s", "loop_clips_per_s"):
        best = {tool: max(run[measure] for run in measured) for tool, measured in runs.items()}
        results[f"batch/infer, {measure} (best of rounds)"] = round(best["batch.py"] / best["infer.py"], 3)
    return results


# ----------------------------------------------------------------------------- pytest-benchmark

def test_archive_search_with_index_and_exact_reranking(benchmark, tmp_path):
    """A small archive (8000 x 256) searched through its index: the suite's smoke run of this file."""
    pytest.importorskip("lancedb")
    from keyreid.runtime.results.archive_gallery import ArchiveGallery
    space = FeatureSpace(256, 800, seed=1)
    archive = ArchiveGallery(tmp_path / "a.lance", create=True, dim=256)
    for index in range(4):
        features, identities, cameras, names = space.chunk(index, 10)
        archive.add_many(features, cameras, names, labels=[str(i) for i in identities])
    archive.build_index(num_partitions=16)
    queries, _, _ = space.queries(8)
    benchmark.extra_info.update(rows=len(archive), dim=256)
    benchmark(lambda: [archive.search(query, K) for query in queries])


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("bench_archive.py"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    batch = commands.add_parser("batch", help="clips/s of batch.py against infer.py")
    batch.add_argument("--engine", type=Path, required=True, help="the model both tools run (e.g. a ViT-B .onnx)")
    batch.add_argument("--tracklets", type=int, default=24, help="synthetic tracklets (default: %(default)s)")
    batch.add_argument("--frames", type=int, default=16, help="frames per tracklet (default: %(default)s)")
    batch.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads, both tools (default: 2)")
    batch.add_argument("--max-batch", type=int, help="clips per engine call, both tools (default: theirs)")
    batch.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: %(default)s)")
    batch.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    archive = commands.add_parser("archive", help="LanceDB archive: recall@10 and latency")
    archive.add_argument("--rows", type=int, default=100_000, help="features in the archive (default: %(default)s)")
    archive.add_argument("--dim", type=int, default=VIT_B_DIM, help="feature length (default: ViT-B's %(default)s)")
    archive.add_argument("--per-identity", type=int, default=10, help="tracklets per identity (default: %(default)s)")
    archive.add_argument("--seed", type=int, default=0)
    archive.add_argument("--queries", type=int, default=200, help="queries measured (default: %(default)s)")
    archive.add_argument("--partitions", type=int, default=128, help="IVF partitions (default: %(default)s)")
    archive.add_argument("--sub-vectors", type=int, default=600, help="PQ sub-vectors (default: %(default)s)")
    archive.add_argument("--sample-rate", type=int, default=64, help="k-means training sample rate (default: %(default)s)")
    archive.add_argument("--iterations", type=int, default=25, help="k-means iterations (default: %(default)s)")
    archive.add_argument("--nprobes", type=int, default=32, help="partitions searched (default: %(default)s)")
    archive.add_argument("--refine-factor", type=int, default=20, help="re-ranked candidates / k (default: %(default)s)")
    archive.add_argument("--exact-scans", type=int, default=3, help="queries timed without the index (default: 3)")
    archive.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "keyreid" / "bench-archive",
                         help="where the archive and the exact neighbours are kept and resumed (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    from keyreid.benchmarks.machine import banner, describe
    args = build_parser().parse_args(argv)
    machine = describe(getattr(args, "threads", os.cpu_count()))
    print(banner(machine), file=sys.stderr)
    results = archive_command(args) if args.command == "archive" else batch_command(args)
    results["machine"] = machine
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
