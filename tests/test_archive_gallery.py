"""The archive gallery (LanceDB) against the exact NumPy gallery: the same nearest entries with the
same exact distances through the IVF-PQ index, the same filters, idempotent adds from batch.py
output, and gallery.py building and searching archives beside .npz galleries.

Features are clustered like re-id features (identities, each seen several times with spread),
so that recall against exact search means something; 256 floats keep the index quick to train.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keyreid.cli import run_main
from keyreid.errors import KeyreidError
from keyreid.runtime import gallery as gallery_cli
from keyreid.runtime.results.batch_output import BatchOutput
from keyreid.runtime.gallery import INDEX_MIN_ROWS, Gallery

pytest.importorskip("lancedb")
from keyreid.runtime.results.archive_gallery import ArchiveGallery  # noqa: E402

DIM = 256                   # eight PQ sub-vectors of 32 floats
IDENTITIES, PER_IDENTITY = 500, 10
NUM_CAMERAS = 6
K = 10


def clustered(rng, identities, per_identity, dim=DIM, spread=0.35):
    """Features [identities * per_identity, dim] around one centre per identity, and the identities."""
    centres = rng.normal(size=(identities, dim)).astype(np.float32)
    labels = np.repeat(np.arange(identities), per_identity)
    return (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32), labels, centres


@pytest.fixture(scope="module")
def entries():
    rng = np.random.default_rng(11)
    features, labels, centres = clustered(rng, IDENTITIES, PER_IDENTITY)
    query_labels = rng.integers(0, IDENTITIES, 30)
    queries = (centres[query_labels] + 0.35 * rng.normal(size=(30, DIM))).astype(np.float32)
    return {"features": features, "labels": labels, "cameras": rng.integers(0, NUM_CAMERAS, len(labels)),
            "timestamps": np.arange(len(labels), dtype=np.float64), "names": [f"e{i}" for i in range(len(labels))],
            "queries": queries, "query_cameras": rng.integers(0, NUM_CAMERAS, 30), "query_labels": query_labels}


@pytest.fixture(scope="module")
def exact(entries):
    gallery = Gallery(DIM)
    gallery.add_many(entries["features"], entries["cameras"], entries["timestamps"],
                     [str(label) for label in entries["labels"]], entries["names"])
    return gallery


@pytest.fixture(scope="module")
def archive(entries, tmp_path_factory):
    archive = ArchiveGallery(tmp_path_factory.mktemp("archive") / "a.lance", create=True, dim=DIM)
    added = archive.add_many(entries["features"], entries["cameras"], entries["names"], entries["timestamps"],
                             [str(label) for label in entries["labels"]])
    assert added == len(archive) == IDENTITIES * PER_IDENTITY >= INDEX_MIN_ROWS
    archive.build_index(num_partitions=32)
    return archive


def test_indexed_search_finds_the_exact_neighbours_with_exact_distances(archive, exact, entries):
    assert archive.has_index and archive.backend == "lancedb ivf-pq"
    found = total = 0
    for query in entries["queries"]:
        truth = {match.name: match.distance for match in exact.search(query, K)}
        matches = archive.search(query, K)
        assert len(matches) == K and [match.distance for match in matches] == sorted(m.distance for m in matches)
        found += sum(match.name in truth for match in matches)
        total += K
        for match in matches:       # re-ranked on the stored features: the exact distance
            if match.name in truth:
                assert match.distance == pytest.approx(truth[match.name], rel=1e-4)
    assert found / total >= 0.99


@pytest.mark.parametrize("conditions", [
    {"exclude": "camera"},
    {"exclude": "label_and_camera"},
    {"cameras": [1, 4]},
    {"since": 1000.0, "until": 2500.0, "exclude": "camera"},
])
def test_filters_keep_exactly_the_entries_the_exact_search_keeps(archive, entries, conditions):
    """Scanning every entry gives exactly the filtered exact answer; the index finds every entry of
    the query's own identity in it (past those, the next entries are other identities at nearly
    one distance, where which of them comes 9th or 10th is chance)."""
    for query, camera, identity in zip(entries["queries"][:8], entries["query_cameras"][:8], entries["query_labels"]):
        options = dict(conditions, camera=int(camera), label=str(identity))
        allowed = np.ones(len(entries["names"]), bool)
        if options.get("exclude") == "camera":
            allowed &= entries["cameras"] != camera
        if options.get("exclude") == "label_and_camera":
            allowed &= ~((entries["labels"].astype(str) == options["label"]) & (entries["cameras"] == camera))
        if "cameras" in options:
            allowed &= np.isin(entries["cameras"], options["cameras"])
        if "since" in options:
            allowed &= (entries["timestamps"] >= options["since"]) & (entries["timestamps"] <= options["until"])
        distances = ((entries["features"] - query) ** 2).sum(axis=1)
        distances[~allowed] = np.inf
        truth = [entries["names"][row] for row in np.argsort(distances, kind="stable")[:K]]
        scanned = [match.name for match in archive.search(query, K, exact=True, **options)]
        assert scanned == truth
        indexed = archive.search(query, K, **options)
        assert all(allowed[int(match.name[1:])] for match in indexed) and len(indexed) == K
        same_identity = {name for name in truth if entries["labels"][int(name[1:])] == identity}
        assert same_identity <= {match.name for match in indexed}


def write_batch_output(folder: Path, rng, rows: int, prefix="t") -> dict:
    """A batch.py output folder of two parts, written by BatchOutput as batch.py writes them."""
    features, labels, _ = clustered(rng, rows // 4, 4)
    pids = np.where(labels % 5 == 0, -1, labels)
    columns = {"name": np.array([f"{prefix}{i:04d}" for i in range(rows)]), "source": np.array(["cams"] * rows),
               "pid": pids, "camera": rng.integers(0, NUM_CAMERAS, rows), "frames": np.full(rows, 8),
               "clips": np.full(rows, 2), "embedding": features}
    with BatchOutput(folder, {"engine": "model.onnx", "engine_sha256": "ab" * 32}) as output:
        half = rows // 2
        output.write_part({name: values[:half] for name, values in columns.items()})
        output.write_part({name: values[half:] for name, values in columns.items()})
    return columns


def test_adding_a_batch_output_twice_adds_nothing_the_second_time(tmp_path):
    columns = write_batch_output(tmp_path / "out", np.random.default_rng(2), 200)
    archive = ArchiveGallery(tmp_path / "archive", create=True, dim=DIM)
    assert archive.add_batch_output(tmp_path / "out", timestamp=1700000000.0) == 200
    assert archive.add_batch_output(tmp_path / "out") == 0 and len(archive) == 200
    (match,) = archive.search(columns["embedding"][7], 1)
    assert (match.name, match.distance, match.timestamp) == ("t0007", 0.0, 1700000000.0)
    assert match.label == ("" if columns["pid"][7] < 0 else str(columns["pid"][7]))
    assert archive.backend == "lancedb exact"               # below INDEX_MIN_ROWS: no index


def run_gallery(*argv) -> int:
    return run_main(gallery_cli.main, [str(arg) for arg in argv])


def test_gallery_py_builds_and_searches_an_archive_like_the_npz_gallery(tmp_path, capsys):
    rng = np.random.default_rng(3)
    write_batch_output(tmp_path / "gallery_out", rng, 240)
    write_batch_output(tmp_path / "query_out", rng, 8, prefix="q")
    assert run_gallery("build", tmp_path / "gallery_out", "-o", tmp_path / "archive") == 0
    assert "added 240 entries" in capsys.readouterr().out
    assert run_gallery("build", tmp_path / "gallery_out", "-o", tmp_path / "archive") == 0
    assert "added 0 entries" in capsys.readouterr().out
    assert run_gallery("build", tmp_path / "gallery_out", "-o", tmp_path / "g.npz") == 0
    for gallery, result in ((tmp_path / "archive", "a.json"), (tmp_path / "g.npz", "n.json")):
        assert run_gallery("search", gallery, tmp_path / "query_out", "--exclude", "camera",
                           "-o", tmp_path / result) == 0
    from_archive, from_npz = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "n.json"))
    assert [query["query"] for query in from_archive] == [query["query"] for query in from_npz]
    for archived, in_memory in zip(from_archive, from_npz):
        assert [m["name"] for m in archived["matches"]] == [m["name"] for m in in_memory["matches"]]
        np.testing.assert_allclose([m["distance"] for m in archived["matches"]],
                                   [m["distance"] for m in in_memory["matches"]], rtol=1e-5)
    capsys.readouterr()
    assert run_gallery("search", tmp_path / "g.npz", tmp_path / "query_out", "--cameras", "1,2") == 1
    assert "--cameras filter an archive gallery" in capsys.readouterr().err


def test_bad_archives_and_arguments_are_one_clear_error(archive, tmp_path):
    with pytest.raises(KeyreidError, match="does not exist"):
        ArchiveGallery(tmp_path / "nowhere")
    with pytest.raises(KeyreidError, match="holds features of length 256, but these features have length 19200"):
        ArchiveGallery(archive.location, dim=19200)
    small = ArchiveGallery(tmp_path / "small", create=True, dim=DIM)
    with pytest.raises(KeyreidError, match="NaN or infinity"):
        small.add_many(np.full((1, DIM), np.nan), [0], ["x"])
    small.add_many(np.zeros((3, DIM)), [0, 1, 2], ["a", "b", "c"])
    with pytest.raises(KeyreidError, match=f"an index needs at least {INDEX_MIN_ROWS}"):
        small.build_index()
    with pytest.raises(KeyreidError, match="since must be a finite number"):
        small.search(np.zeros(DIM), since=float("nan"))
    with pytest.raises(KeyreidError, match="needs the query's camera"):
        small.search(np.zeros(DIM), exclude="camera")


def test_the_archive_needs_its_extra_and_says_which(tmp_path):
    script = ("import sys; sys.modules['lancedb'] = None\n"
              "from keyreid.cli import run_main; from keyreid.runtime import gallery\n"
              "sys.exit(run_main(gallery.main, sys.argv[1:]))")
    np.savez(tmp_path / "q.npz", embeddings=np.zeros((1, 4), np.float32), tracklets=np.array(["q"]),
             pids=np.array([1]), cameras=np.array([0]))
    result = subprocess.run([sys.executable, "-c", script, "search", str(tmp_path / "archive"), str(tmp_path / "q.npz")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and 'pip install "keyreid[archive]"' in result.stderr
