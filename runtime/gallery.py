"""The gallery command: build a gallery of tracklet features from infer.py outputs, and search it.

    python runtime/gallery.py build embeddings.npz [more.npz ...] --output gallery.npz
    python runtime/gallery.py search gallery.npz queries.npz [--top-k 10] [--exclude camera]

The gallery itself (``Gallery``: entries, search, the file format) is
``keyreid.runtime.results.gallery_store``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from keyreid.cli import program_name, run_main
from keyreid.errors import KeyreidError
from keyreid.files import check_writable, read_npz, write_json
from keyreid.runtime.results.gallery_index import BACKENDS, DEFAULT_BACKEND
from keyreid.runtime.results.gallery_store import Gallery, Match

DESCRIPTION = """\
Build a gallery of tracklet features from infer.py outputs, and search it.

  build EMBEDDINGS.npz [...] --output GALLERY.npz
        every tracklet of infer.py's --output files becomes an entry: its feature, camera,
        identity (pid, when known) as label and tracklet name
  search GALLERY.npz QUERIES.npz [--top-k K] [--exclude camera]
        the K nearest gallery entries of every tracklet in QUERIES.npz (an infer.py output)"""

EPILOG = """\
rows of an infer.py output (--rows):
  infer.py's evaluation modes mark queries (is_query); by default build takes the gallery rows
  of such a file and search the query rows. Files without is_query are used whole.

exclusions (--exclude):
  none              every entry may match
  camera            leave out entries of the query's own camera (find the person elsewhere)
  label-and-camera  leave out entries with the query's identity and camera (the MARS protocol)

exit status: 0 done; 1 bad input (nothing written); 2 wrong usage"""


def _read_embeddings(path: Path, rows: str, default_rows: str) -> Dict[str, np.ndarray]:
    """infer.py's --output arrays, restricted to ``rows`` (auto: ``default_rows`` if marked)."""
    arrays = read_npz(path, "infer.py output")
    needed = ("embeddings", "tracklets", "pids", "cameras")
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise KeyreidError(f"{path} is not an infer.py output: missing {', '.join(missing)}")
    if rows == "auto":
        rows = default_rows if "is_query" in arrays else "all"
    if rows != "all":
        if "is_query" not in arrays:
            raise KeyreidError(f"--rows {rows}: {path} does not mark queries (is_query); use --rows all")
        keep = arrays["is_query"].astype(bool) == (rows == "query")
        arrays = {name: arrays[name][keep] for name in (*needed, "is_query")}
    return arrays


def _labels(pids: np.ndarray) -> List[Optional[str]]:
    return [None if int(pid) < 0 else str(int(pid)) for pid in pids]


def match_json(match: Match) -> Dict[str, object]:
    """A match as JSON values (an unknown timestamp becomes null)."""
    values = asdict(match)
    values["timestamp"] = None if np.isnan(match.timestamp) else match.timestamp
    return values


def build_command(args: argparse.Namespace) -> int:
    inputs = [path.resolve() for path in args.embeddings]
    if args.output.resolve() in inputs:
        raise KeyreidError(f"--output {args.output} is one of the inputs; give another file name")
    check_writable(args.output, "--output")
    gallery = None
    for path in args.embeddings:
        arrays = _read_embeddings(path, args.rows, "gallery")
        if gallery is None:
            gallery = Gallery(arrays["embeddings"].shape[-1], capacity=len(arrays["embeddings"]))
        elif arrays["embeddings"].shape[-1] != gallery.dim:
            raise KeyreidError(f"{path} holds features of length {arrays['embeddings'].shape[-1]}, "
                               f"the earlier files {gallery.dim}; build one gallery per model")
        timestamps = np.full(len(arrays["embeddings"]), args.timestamp, np.float64)
        gallery.add_many(arrays["embeddings"], arrays["cameras"], timestamps, _labels(arrays["pids"]),
                         arrays["tracklets"].tolist())
    gallery.save(args.output)
    print(f"wrote {args.output}: {len(gallery)} entries of length {gallery.dim}")
    return 0


def search_command(args: argparse.Namespace) -> int:
    if args.output is not None:
        if args.output.resolve() in (args.gallery.resolve(), args.queries.resolve()):
            raise KeyreidError(f"--output {args.output} is one of the inputs; give another file name")
        check_writable(args.output, "--output")
    queries = _read_embeddings(args.queries, args.rows, "query")
    gallery = Gallery.load(args.gallery, args.backend, dim=queries["embeddings"].shape[-1])
    exclude = args.exclude.replace("-", "_")
    results, unlabelled, started = [], [], time.perf_counter()
    for feature, name, camera, label in zip(queries["embeddings"], queries["tracklets"], queries["cameras"],
                                            _labels(queries["pids"])):
        if exclude == "label_and_camera" and label is None:
            unlabelled.append(str(name))      # the protocol cannot place it; the others go on
            continue
        matches = gallery.search(feature, args.top_k, camera=int(camera), label=label, exclude=exclude)
        results.append({"query": str(name), "camera": int(camera), "label": label or "",
                        "matches": [match_json(match) for match in matches]})
    seconds = time.perf_counter() - started
    for result in results[:args.show]:
        shown = ", ".join(f"{match['name'] or match['entry_id']} ({match['distance']:.4g})"
                          for match in result["matches"][:5])
        print(f"{result['query']} (camera {result['camera']}): {shown}")
    if len(results) > args.show:
        print(f"... and {len(results) - args.show} more queries")
    print(f"{len(results)} queries against {len(gallery)} entries ({gallery.backend}) in {seconds:.2f} s")
    if unlabelled:
        print(f"{len(unlabelled)} queries without an identity (pid -1) were not searched: --exclude "
              f"label-and-camera needs one (e.g. {unlabelled[0]})")
    if args.output is not None:
        write_json(args.output, results)
        print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("gallery.py"), description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="build|search")
    build = commands.add_parser("build", help="make a gallery file from infer.py outputs")
    build.add_argument("embeddings", type=Path, nargs="+", metavar="EMBEDDINGS.npz", help="infer.py --output files")
    build.add_argument("-o", "--output", type=Path, required=True, metavar="GALLERY.npz", help="gallery file to write")
    build.add_argument("--rows", choices=("auto", "all", "gallery", "query"), default="auto",
                       help="which tracklets of each file to add (default: %(default)s, see below)")
    build.add_argument("--timestamp", type=float, default=float("nan"), metavar="T",
                       help="time stamp of every entry, e.g. seconds since the epoch (default: unknown)")
    build.set_defaults(run=build_command)

    search = commands.add_parser("search", help="rank a gallery for each query tracklet")
    search.add_argument("gallery", type=Path, metavar="GALLERY.npz")
    search.add_argument("queries", type=Path, metavar="QUERIES.npz", help="an infer.py --output file")
    search.add_argument("-k", "--top-k", type=int, default=10, metavar="K", help="matches per query (default: %(default)s)")
    search.add_argument("--exclude", choices=("none", "camera", "label-and-camera"), default="none",
                        help="entries a query may not match (default: %(default)s, see below)")
    search.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                        help="search index; faiss-* need the extra 'gallery' (default: %(default)s)")
    search.add_argument("--rows", choices=("auto", "all", "gallery", "query"), default="auto",
                        help="which tracklets of QUERIES.npz to search with (default: %(default)s)")
    search.add_argument("-o", "--output", type=Path, metavar="RESULTS.json", help="write every query's matches")
    search.add_argument("--show", type=int, default=5, metavar="N", help="queries printed (default: %(default)s)")
    search.set_defaults(run=search_command)
    for sub in (build, search):
        sub.epilog, sub.formatter_class = EPILOG, argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "search" and args.top_k < 1:
        parser.error("--top-k must be at least 1")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
