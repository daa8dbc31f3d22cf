"""Gallery search: latency (p50/p95) and memory at 10 000 and 100 000 entries, NumPy exact vs FAISS.

    python benchmarks/bench_gallery.py [--sizes 10000 100000] [--dim 3200] [--json out.json]
    python -m pytest benchmarks/bench_gallery.py --benchmark-only

Features are synthetic tracklet features clustered by identity (8 tracklets per person, from 6
cameras), 3200-d by default: the reduced model's length (ViT-B's 19200-d take 6x the memory
and about 6x the time per query). Queries are other tracklets of gallery identities, searched
one at a time as an appliance does, leaving out the query's own camera (``exclude="camera"``).
Every backend searches the same gallery and queries in one run; building (adding, training the
IVF cells, linking the HNSW graph) is timed apart from searching, after one warm-up search.
Memory is what the search needs: the features themselves for NumPy, the index (its own copy
of the features plus cells or graph links) for FAISS; the process's peak is printed at the end. Recall@10 is the share of the exact top 10 an index returns.
"""
import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent

from keyreid.cpu_features import cpu_isa
from keyreid.files import write_json
from keyreid.runtime.results.gallery_store import Gallery
from keyreid.runtime.results.gallery_index import BACKENDS

TRACKLETS_PER_IDENTITY = 8
NUM_CAMERAS = 6
CHUNK = 10_000
TOP_K = 10


def fill_gallery(size: int, dim: int, seed: int = 0) -> Gallery:
    """A gallery of ``size`` clustered features, made chunk by chunk (no second full copy)."""
    rng = np.random.default_rng(seed)
    gallery = Gallery(dim, capacity=size)
    for start in range(0, size, CHUNK):
        count = min(CHUNK, size - start)
        identities = (start + np.arange(count)) // TRACKLETS_PER_IDENTITY
        centres = identity_centres(identities, dim, seed)
        features = centres + rng.normal(0, 0.6, (count, dim)).astype(np.float32)
        gallery.add_many(features, rng.integers(0, NUM_CAMERAS, count), labels=identities)
    return gallery


def identity_centres(identities: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """The same centre for the same identity, whichever chunk it falls in."""
    centres = np.empty((len(identities), dim), np.float32)
    for identity in np.unique(identities):
        centres[identities == identity] = np.random.default_rng((seed, int(identity))).normal(size=dim)
    return centres


def make_queries(gallery_size: int, dim: int, count: int, seed: int = 1):
    """Fresh tracklets of gallery identities: (features [count, dim], cameras [count])."""
    rng = np.random.default_rng(seed)
    identities = rng.integers(0, gallery_size // TRACKLETS_PER_IDENTITY, count)
    features = identity_centres(identities, dim, 0) + rng.normal(0, 0.6, (count, dim)).astype(np.float32)
    return features, rng.integers(0, NUM_CAMERAS, count)


def measure_backend(gallery: Gallery, backend: str, queries, exact_top: List[np.ndarray]) -> Dict[str, float]:
    features, cameras = queries
    started = time.perf_counter()
    gallery.use_backend(backend)
    gallery.search_rows(features[0], TOP_K, camera=int(cameras[0]), exclude="camera")   # builds the index
    build_seconds = time.perf_counter() - started
    memory = gallery.index_bytes + (gallery.features.nbytes if backend == "numpy" else 0)
    latencies, found = [], []
    for index, (feature, camera) in enumerate(zip(features, cameras)):
        started = time.perf_counter()
        rows, _ = gallery.search_rows(feature, TOP_K, camera=int(camera), exclude="camera")
        latencies.append(time.perf_counter() - started)
        found.append(rows)
    if not exact_top:
        exact_top.extend(found)
    recall = np.mean([len(np.intersect1d(rows, exact)) / len(exact) for rows, exact in zip(found, exact_top)])
    same = np.mean([np.array_equal(rows, exact) for rows, exact in zip(found, exact_top)])
    return {"build_s": build_seconds, "memory_mib": memory / 2 ** 20,
            "p50_ms": 1e3 * float(np.percentile(latencies, 50)), "p95_ms": 1e3 * float(np.percentile(latencies, 95)),
            "recall_at_10": float(recall), "same_top10": float(same)}


def run(sizes, dim: int, num_queries: int, backends) -> Dict[str, Dict[str, Dict[str, float]]]:
    results = {}
    for size in sizes:
        started = time.perf_counter()
        gallery = fill_gallery(size, dim)
        print(f"{size} entries of {dim} floats made in {time.perf_counter() - started:.1f} s", flush=True)
        queries = make_queries(size, dim, num_queries)
        exact_top: List[np.ndarray] = []
        results[str(size)] = {}
        for backend in backends:       # numpy first: its answers are the exact ones
            results[str(size)][backend] = row = measure_backend(gallery, backend, queries, exact_top)
            print(f"  {backend:<11} {row}", flush=True)
        gallery.use_backend("numpy")
        del gallery
    return results


def table(results) -> str:
    lines = ["| entries | backend | p50 ms | p95 ms | vs numpy (p50) | recall@10 | build s | memory MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for size, rows in results.items():
        base = rows["numpy"]["p50_ms"]
        for backend, row in rows.items():
            lines.append(f"| {int(size):,} | {backend} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | "
                         f"{base / row['p50_ms']:.1f}x | {row['recall_at_10']:.3f} | {row['build_s']:.1f} | "
                         f"{row['memory_mib']:.0f} |")
    return "\n".join(lines)


# --- pytest-benchmark: a small gallery, one search per round ---------------------------------

@pytest.fixture(scope="module")
def small_gallery():
    return fill_gallery(10_000, 256), make_queries(10_000, 256, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gallery_search(benchmark, small_gallery, backend):
    if backend != "numpy":
        pytest.importorskip("faiss")
    gallery, (features, cameras) = small_gallery
    gallery.use_backend(backend)
    gallery.search_rows(features[0], TOP_K)
    benchmark(gallery.search_rows, features[0], TOP_K, camera=int(cameras[0]), exclude="camera")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=3200, help="feature length (default: the reduced model's 3200)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.backends[0] != "numpy":
        parser.error("--backends must start with numpy (the exact answers recall is measured against)")
    import faiss
    threads = faiss.omp_get_max_threads()
    print(f"machine: {cpu_isa().describe()}, {threads} FAISS threads; numpy {np.__version__}, faiss {faiss.__version__}; "
          f"{args.queries} queries one at a time, top {TOP_K}, own camera excluded")
    results = run(args.sizes, args.dim, args.queries, args.backends)
    print(table(results))
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
