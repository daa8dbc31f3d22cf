"""The gallery command: build a gallery of tracklet features from infer.py or batch.py outputs,
and search it.

    python runtime/gallery.py build embeddings.npz [more.npz ...] --output gallery.npz
    python runtime/gallery.py search gallery.npz queries.npz [--top-k 10] [--exclude camera]
    python runtime/gallery.py build batch-out/ --output archive.lance      (an archive in LanceDB)

The gallery itself (``Gallery``: entries, search, the file format) is
``keyreid.runtime.results.gallery_store``; an output or gallery that is not a ``.npz`` file is an
archive gallery in LanceDB (``keyreid.runtime.results.archive_gallery``, extra ``archive``), for
galleries beyond one process's memory.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from keyreid.cli import positive_int, program_name, run_main
from keyreid.errors import KeyreidError
from keyreid.files import check_writable, read_npz, write_json
from keyreid.runtime.results.archive_settings import (DEFAULT_NPROBES, DEFAULT_REFINE_FACTOR, INDEX_MIN_ROWS,
                                                      OUTPUT_CHUNK_ROWS, is_archive_location)
from keyreid.runtime.results.gallery_index import BACKENDS, DEFAULT_BACKEND
from keyreid.runtime.results.gallery_store import Gallery, Match

DESCRIPTION = """\
Build a gallery of tracklet features from infer.py or batch.py outputs, and search it.

  build EMBEDDINGS [...] --output GALLERY
        every tracklet of the inputs (infer.py --output .npz files, batch.py output folders)
        becomes an entry: its feature, camera, identity (pid, when known) as label and name
  search GALLERY QUERIES [--top-k K] [--exclude camera]
        the K nearest gallery entries of every tracklet in QUERIES (an infer.py or batch.py output)

A GALLERY ending in .npz is one file, searched in memory (NumPy or FAISS). Anything else is an
archive gallery in LanceDB: a folder (or an s3://, gs://, az:// URI), searched through an IVF-PQ
index with exact re-ranking, filtered by camera and time (--cameras, --since, --until); build
adds to it (a tracklet already there is left alone) and indexes it from %d entries on.""" % INDEX_MIN_ROWS

EPILOG = """\
rows of an input (--rows):
  infer.py's evaluation modes mark queries (is_query), as batch.py --mars does (source query);
  by default build takes the gallery rows of such an output and search the query rows. Outputs
  that mark no queries are used whole.

exclusions (--exclude):
  none              every entry may match
  camera            leave out entries of the query's own camera (find the person elsewhere)
  label-and-camera  leave out entries with the query's identity and camera (the MARS protocol)

exit status: 0 done; 1 bad input (nothing written); 2 wrong usage"""


def _select_rows(arrays: Dict[str, np.ndarray], rows: str, default_rows: str, path: Path) -> Dict[str, np.ndarray]:
    """``arrays`` restricted to ``rows`` (auto: ``default_rows`` where queries are marked)."""
    if rows == "auto":
        rows = default_rows if "is_query" in arrays else "all"
    if rows == "all":
        return arrays
    if "is_query" not in arrays:
        raise KeyreidError(f"--rows {rows}: {path} does not mark queries (is_query); use --rows all")
    keep = arrays["is_query"].astype(bool) == (rows == "query")
    return {name: values[keep] for name, values in arrays.items()}


def _batch_output_arrays(columns: Dict[str, np.ndarray], marks_queries: bool) -> Dict[str, np.ndarray]:
    """batch.py's columns under infer.py's output names (and ``sources``)."""
    arrays = {"embeddings": columns["embedding"], "tracklets": np.asarray(columns["name"], dtype=str),
              "pids": columns["pid"], "cameras": columns["camera"], "sources": np.asarray(columns["source"], dtype=str)}
    if marks_queries:
        arrays["is_query"] = arrays["sources"] == "query"
    return arrays


def _input_chunks(path: Path, rows: str, default_rows: str) -> Iterator[Dict[str, np.ndarray]]:
    """The rows of one input: an infer.py .npz whole, a batch.py output folder a piece at a time."""
    if not path.is_dir():
        yield _read_embeddings(path, rows, default_rows)
        return
    from keyreid.runtime.results.batch_output import output_chunks, output_sources
    marks_queries = "query" in output_sources(path)
    for columns in output_chunks(path, OUTPUT_CHUNK_ROWS):
        yield _select_rows(_batch_output_arrays(columns, marks_queries), rows, default_rows, path)


def _read_embeddings(path: Path, rows: str, default_rows: str) -> Dict[str, np.ndarray]:
    """infer.py's --output arrays (or a batch.py output folder's, whole), restricted to ``rows``
    (auto: ``default_rows`` if marked)."""
    if path.is_dir():
        from keyreid.runtime.results.batch_output import read_output
        columns = read_output(path)
        return _select_rows(_batch_output_arrays(columns, bool((columns["source"] == "query").any())),
                            rows, default_rows, path)
    arrays = read_npz(path, "infer.py output")
    needed = ("embeddings", "tracklets", "pids", "cameras")
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise KeyreidError(f"{path} is not an infer.py output: missing {', '.join(missing)}")
    return _select_rows({name: arrays[name] for name in (*needed, "is_query") if name in arrays},
                        rows, default_rows, path)


def _labels(pids: np.ndarray) -> List[Optional[str]]:
    return [None if int(pid) < 0 else str(int(pid)) for pid in pids]


def match_json(match: Match) -> Dict[str, object]:
    """A match as JSON values (an unknown timestamp becomes null)."""
    values = asdict(match)
    values["timestamp"] = None if np.isnan(match.timestamp) else match.timestamp
    return values


def build_command(args: argparse.Namespace) -> int:
    inputs = [path.resolve() for path in args.embeddings]
    if "://" not in str(args.output) and args.output.resolve() in inputs:
        raise KeyreidError(f"--output {args.output} is one of the inputs; give another file name")
    if is_archive_location(args.output):
        return build_archive(args)
    check_writable(args.output, "--output")
    gallery = None
    for path in args.embeddings:
        for arrays in _input_chunks(path, args.rows, "gallery"):
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


def build_archive(args: argparse.Namespace) -> int:
    """``build`` into an archive: add every input a piece at a time, then index it."""
    from keyreid.runtime.results.archive_gallery import ArchiveGallery
    archive, offered, added = None, 0, 0
    for path in args.embeddings:
        for arrays in _input_chunks(path, args.rows, "gallery"):
            count = len(arrays["embeddings"])
            archive = archive or ArchiveGallery(args.output, create=True, dim=arrays["embeddings"].shape[-1])
            sources = arrays.get("sources", np.full(count, path.stem))
            added += archive.add_many(arrays["embeddings"], arrays["cameras"], arrays["tracklets"].tolist(),
                                      np.full(count, args.timestamp), _labels(arrays["pids"]), sources.tolist())
            offered += count
    print(f"added {added} entries to {args.output} ({offered - added} were there already); it holds "
          f"{len(archive)} of length {archive.dim}")
    if args.no_index:
        return 0
    if archive.has_index and added:
        archive.update_index()
        print("added the new entries to its index")
    elif not archive.has_index and len(archive) >= INDEX_MIN_ROWS:
        started = time.perf_counter()
        archive.build_index()
        print(f"built its IVF-PQ index in {time.perf_counter() - started:.1f} s")
    elif not archive.has_index:
        print(f"no index below {INDEX_MIN_ROWS} entries: search scans them all, exactly")
    return 0


def search_command(args: argparse.Namespace) -> int:
    if args.output is not None:
        if args.output.resolve() in (args.gallery.resolve(), args.queries.resolve()):
            raise KeyreidError(f"--output {args.output} is one of the inputs; give another file name")
        check_writable(args.output, "--output")
    queries = _read_embeddings(args.queries, args.rows, "query")
    dim = queries["embeddings"].shape[-1]
    if is_archive_location(args.gallery):
        from keyreid.runtime.results.archive_gallery import ArchiveGallery
        gallery = ArchiveGallery(args.gallery, dim=dim)
        filters = {"cameras": args.cameras, "since": args.since, "until": args.until,
                   "nprobes": args.nprobes or DEFAULT_NPROBES, "refine_factor": args.refine_factor or DEFAULT_REFINE_FACTOR}
    else:
        archive_only = [flag for flag in ("--cameras", "--since", "--until", "--nprobes", "--refine-factor")
                        if getattr(args, flag[2:].replace("-", "_")) is not None]
        if archive_only:
            raise KeyreidError(f"{', '.join(archive_only)} filter an archive gallery; {args.gallery} is a .npz file")
        gallery = Gallery.load(args.gallery, args.backend, dim=dim)
        filters = {}
    exclude = args.exclude.replace("-", "_")
    results, unlabelled, started = [], [], time.perf_counter()
    for feature, name, camera, label in zip(queries["embeddings"], queries["tracklets"], queries["cameras"],
                                            _labels(queries["pids"])):
        if exclude == "label_and_camera" and label is None:
            unlabelled.append(str(name))      # the protocol cannot place it; the others go on
            continue
        matches = gallery.search(feature, args.top_k, camera=int(camera), label=label, exclude=exclude, **filters)
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


def _camera_list(text: str) -> List[int]:
    try:
        return [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected camera numbers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("gallery.py"), description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="build|search")
    build = commands.add_parser("build", help="make a gallery file from infer.py outputs")
    build.add_argument("embeddings", type=Path, nargs="+", metavar="EMBEDDINGS",
                       help="infer.py --output .npz files or batch.py output folders")
    build.add_argument("-o", "--output", type=Path, required=True, metavar="GALLERY",
                       help="gallery file to write (.npz), or archive to add to (a folder or URI)")
    build.add_argument("--rows", choices=("auto", "all", "gallery", "query"), default="auto",
                       help="which tracklets of each file to add (default: %(default)s, see below)")
    build.add_argument("--timestamp", type=float, default=float("nan"), metavar="T",
                       help="time stamp of every entry, e.g. seconds since the epoch (default: unknown)")
    build.add_argument("--no-index", action="store_true",
                       help="archive: leave the index as it is (search scans new entries exactly)")
    build.set_defaults(run=build_command)

    search = commands.add_parser("search", help="rank a gallery for each query tracklet")
    search.add_argument("gallery", type=Path, metavar="GALLERY", help="a gallery .npz file or an archive")
    search.add_argument("queries", type=Path, metavar="QUERIES", help="an infer.py --output file or batch.py output")
    search.add_argument("-k", "--top-k", type=int, default=10, metavar="K", help="matches per query (default: %(default)s)")
    search.add_argument("--exclude", choices=("none", "camera", "label-and-camera"), default="none",
                        help="entries a query may not match (default: %(default)s, see below)")
    search.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                        help="search index; faiss-* need the extra 'gallery' (default: %(default)s)")
    search.add_argument("--rows", choices=("auto", "all", "gallery", "query"), default="auto",
                        help="which tracklets of QUERIES.npz to search with (default: %(default)s)")
    search.add_argument("-o", "--output", type=Path, metavar="RESULTS.json", help="write every query's matches")
    archive = search.add_argument_group("archive galleries only")
    archive.add_argument("--cameras", type=_camera_list, metavar="LIST",
                         help="only entries of these cameras, comma-separated (e.g. 0,2)")
    archive.add_argument("--since", type=float, metavar="T", help="only entries with a timestamp >= T")
    archive.add_argument("--until", type=float, metavar="T", help="only entries with a timestamp <= T")
    archive.add_argument("--nprobes", type=positive_int, metavar="N",
                         help=f"index partitions searched per query (default: {DEFAULT_NPROBES})")
    archive.add_argument("--refine-factor", type=positive_int, metavar="R",
                         help=f"candidates re-ranked exactly, R x K (default: {DEFAULT_REFINE_FACTOR})")
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
