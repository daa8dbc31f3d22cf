"""Gallery: exact search against the evaluation's ranking, FAISS against NumPy, removal, files
(whole, checked on load), and the build/search command line."""
import json
import sys

import numpy as np
import pytest

from keyreid.cli import run_main
from keyreid.errors import KeyreidError
from keyreid.files import write_npz
from keyreid.runtime import gallery as gallery_cli
from keyreid.runtime.results.evaluation import evaluate_rankings, squared_euclidean_distances
from keyreid.runtime.results.gallery_store import Gallery
from keyreid.runtime.results.gallery_index import nearest

DIM = 64


def mars_like_features(seed, identities=40, scale=1.0, dim=DIM):
    """Tracklet features of ``identities`` people, each seen by 2-4 of 6 cameras in 1-3
    tracklets per camera: (features, pids, cameras), features clustered by identity."""
    rng = np.random.default_rng(seed)
    features, pids, cameras = [], [], []
    for pid in range(identities):
        centre = rng.normal(0, scale, dim)
        for camera in rng.choice(6, int(rng.integers(2, 5)), replace=False):
            for _ in range(int(rng.integers(1, 4))):
                features.append(centre + rng.normal(0, 0.6 * scale, dim))
                pids.append(pid)
                cameras.append(int(camera))
    return np.array(features, np.float32), np.array(pids), np.array(cameras)


def protocol_order(distances_row, query_pid, query_camera, pids, cameras):
    """The evaluation's ranking of one query: stable sort, same identity and camera dropped."""
    order = np.argsort(distances_row, kind="stable")
    return order[~((pids[order] == query_pid) & (cameras[order] == query_camera))]


@pytest.mark.parametrize("seed, scale", [(0, 1.0), (1, 30.0)])
def test_gallery_ranks_a_mars_style_split_as_the_evaluation_does(seed, scale):
    features, pids, cameras = mars_like_features(seed, scale=scale)
    is_query = np.zeros(len(features), bool)
    is_query[np.unique(pids, return_index=True)[1]] = True          # first tracklet of each person
    gallery = Gallery(DIM)
    gallery.add_many(features[~is_query], cameras[~is_query], labels=pids[~is_query])
    gallery_pids, gallery_cameras = pids[~is_query], cameras[~is_query]
    distances = squared_euclidean_distances(features[is_query], features[~is_query])

    first_matches, average_precisions = [], []
    for row, (feature, pid, camera) in enumerate(zip(features[is_query], pids[is_query], cameras[is_query])):
        rows, found = gallery.search_rows(feature, k=len(gallery), camera=camera, label=pid,
                                          exclude="label_and_camera")
        expected = protocol_order(distances[row], pid, camera, gallery_pids, gallery_cameras)
        np.testing.assert_array_equal(rows, expected)
        np.testing.assert_allclose(found, distances[row][expected], rtol=1e-5, atol=1e-3 * scale ** 2)
        matches = np.flatnonzero(gallery_pids[rows] == pid)
        first_matches.append(matches[0])
        average_precisions.append(np.mean(np.arange(1, len(matches) + 1) / (matches + 1)))
    reference = evaluate_rankings(distances, pids[is_query], gallery_pids, cameras[is_query], gallery_cameras)
    assert np.mean(np.array(first_matches) < 1) == reference.cmc[1]
    assert np.mean(average_precisions) == pytest.approx(reference.mean_ap, abs=1e-12)


def test_top_k_is_the_head_of_the_full_ranking_with_ties_in_gallery_order():
    distances = np.array([3, 1, 2, 1, 0, 2, 1], np.float32)
    np.testing.assert_array_equal(nearest(distances, 3), [4, 1, 3])
    np.testing.assert_array_equal(nearest(distances, 5), [4, 1, 3, 6, 2])
    np.testing.assert_array_equal(nearest(distances, 10), np.argsort(distances, kind="stable"))


def test_excluding_the_query_camera_returns_only_other_cameras():
    features, pids, cameras = mars_like_features(2)
    gallery = Gallery(DIM)
    gallery.add_many(features, cameras, labels=pids)
    matches = gallery.search(features[0], k=15, camera=cameras[0], exclude="camera")
    assert len(matches) == 15 and all(match.camera != cameras[0] for match in matches)
    assert [match.distance for match in matches] == sorted(match.distance for match in matches)
    assert gallery.search(features[0], k=1)[0].entry_id == 0          # itself, when nothing is excluded


def test_removed_entries_are_gone_and_ids_stay_valid():
    features, pids, cameras = mars_like_features(3)
    gallery = Gallery(DIM, capacity=4)                                  # grows while adding
    ids = gallery.add_many(features, cameras, labels=pids)
    removed = ids[::3]
    gallery.remove(removed)
    kept = np.setdiff1d(ids, removed)
    fresh = Gallery(DIM)
    fresh.add_many(features[kept], cameras[kept], labels=pids[kept])
    for query in features[:5]:
        rows, distances = gallery.search_rows(query, k=10)
        fresh_rows, fresh_distances = fresh.search_rows(query, k=10)
        np.testing.assert_array_equal(gallery.ids[rows], kept[fresh_rows])
        np.testing.assert_array_equal(distances, fresh_distances)
    with pytest.raises(KeyreidError, match=f"no gallery entry with id {removed[0]}"):
        gallery.remove([kept[0], removed[0]])
    assert len(gallery) == len(kept)                                    # all or nothing


def test_bad_features_are_refused_and_the_gallery_is_unchanged():
    gallery = Gallery(DIM)
    gallery.add(np.ones(DIM), camera=0, label="a")
    with pytest.raises(KeyreidError, match="NaN"):
        gallery.add_many(np.stack([np.ones(DIM), np.full(DIM, np.nan)]), [0, 1])
    with pytest.raises(KeyreidError, match=f"shape \\[n, {DIM}\\]"):
        gallery.add(np.ones(DIM + 1), camera=0)
    with pytest.raises(KeyreidError, match=f"shape \\[n, {DIM}\\]"):
        gallery.search(np.ones(DIM - 1))
    with pytest.raises(KeyreidError, match="needs the query's camera"):
        gallery.search(np.ones(DIM), exclude="camera")
    assert len(gallery) == 1 and gallery.search(np.ones(DIM))[0].label == "a"


# --- files ----------------------------------------------------------------------------------

@pytest.fixture
def saved_gallery(tmp_path):
    features, pids, cameras = mars_like_features(4)
    gallery = Gallery(DIM)
    ids = gallery.add_many(features, cameras, timestamps=np.arange(len(features)) * 0.5, labels=pids,
                           names=[f"t{index}" for index in range(len(features))])
    gallery.remove(ids[:2])
    return gallery, gallery.save(tmp_path / "gallery.npz")


def test_saved_gallery_loads_with_every_field_and_searches_the_same(saved_gallery):
    gallery, path = saved_gallery
    loaded = Gallery.load(path, dim=DIM)
    np.testing.assert_array_equal(loaded.features, gallery.features)
    np.testing.assert_array_equal(loaded.ids, gallery.ids)
    query = gallery.features[7] + 0.1
    assert loaded.search(query, k=5, camera=1, exclude="camera") == gallery.search(query, k=5, camera=1, exclude="camera")
    assert loaded.add(np.zeros(DIM), camera=0) == gallery.add(np.zeros(DIM), camera=0)   # ids are not reused
    assert list(path.parent.iterdir()) == [path]                        # no temporary file left


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:len(data) // 2], "is not a gallery file: it cannot be read"),
    (lambda data: b"", "is not a gallery file: it cannot be read"),
    (lambda data: b"not a zip file at all", "is not a gallery file: it cannot be read"),
], ids=["half", "empty", "garbage"])
def test_damaged_gallery_file_is_one_clear_error_and_the_saved_file_stays(saved_gallery, tmp_path, damage, message):
    gallery, path = saved_gallery
    original = path.read_bytes()
    broken = tmp_path / "broken.npz"
    broken.write_bytes(damage(original))
    with pytest.raises(KeyreidError, match=message):
        Gallery.load(broken)
    assert path.read_bytes() == original and len(Gallery.load(path)) == len(gallery)


def test_gallery_of_another_feature_length_is_refused(saved_gallery):
    _, path = saved_gallery
    with pytest.raises(KeyreidError, match=f"features of length {DIM}, but these features have length 19200"):
        Gallery.load(path, dim=19200)


def test_npz_that_is_not_a_gallery_is_refused(tmp_path):
    path = write_npz(tmp_path / "embeddings.npz", {"embeddings": np.zeros((2, DIM), np.float32)})
    with pytest.raises(KeyreidError, match="not a keyreid gallery file"):
        Gallery.load(path)


# --- FAISS ----------------------------------------------------------------------------------

@pytest.fixture
def faiss():
    return pytest.importorskip("faiss", reason="FAISS backends need faiss-cpu (pip install 'keyreid[gallery]')")


@pytest.mark.parametrize("seed, scale", [(5, 1.0), (6, 50.0)])
def test_exact_faiss_returns_the_numpy_top_k(faiss, seed, scale):
    features, pids, cameras = mars_like_features(seed, identities=60, scale=scale)
    galleries = {}
    for backend in ("numpy", "faiss-flat"):
        galleries[backend] = Gallery(DIM, backend)
        ids = galleries[backend].add_many(features, cameras, labels=pids)
        galleries[backend].remove(ids[5:9])          # the FAISS index is rebuilt after a removal
        galleries[backend].add_many(features[5:9] * 1.01, cameras[5:9])   # and grows after that
    for index in range(0, len(features), 7):
        for options in ({}, {"camera": cameras[index], "exclude": "camera"},
                        {"camera": cameras[index], "label": pids[index], "exclude": "label_and_camera"}):
            numpy_rows, numpy_distances = galleries["numpy"].search_rows(features[index], k=10, **options)
            faiss_rows, faiss_distances = galleries["faiss-flat"].search_rows(features[index], k=10, **options)
            np.testing.assert_array_equal(faiss_rows, numpy_rows)
            np.testing.assert_allclose(faiss_distances, numpy_distances, rtol=1e-4, atol=1e-4 * scale ** 2)


@pytest.mark.parametrize("backend", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_faiss_indexes_find_most_exact_neighbours(faiss, backend):
    features, pids, cameras = mars_like_features(7, identities=150)
    exact, approximate = Gallery(DIM), Gallery(DIM, backend, nprobe=8)
    for gallery in (exact, approximate):
        gallery.add_many(features, cameras, labels=pids)
    found = [len(np.intersect1d(approximate.search_rows(query, k=10)[0], exact.search_rows(query, k=10)[0]))
             for query in features[::5]]
    assert np.mean(found) / 10 >= 0.9


def test_missing_faiss_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)          # import faiss now fails
    with pytest.raises(KeyreidError, match=r'keyreid\[gallery\]'):
        Gallery(DIM, "faiss-flat")


# --- command line ---------------------------------------------------------------------------

def infer_output(path, features, pids, cameras, is_query=None):
    """An .npz laid out as infer.py --output writes it."""
    arrays = {"embeddings": features, "tracklets": np.array([f"t{index:03d}" for index in range(len(features))]),
              "pids": pids.astype(np.int64), "cameras": cameras.astype(np.int64)}
    if is_query is not None:
        arrays["is_query"] = is_query
    return write_npz(path, arrays)


def test_cli_builds_from_the_gallery_rows_and_searches_with_the_query_rows(tmp_path, capsys):
    features, pids, cameras = mars_like_features(8)
    is_query = np.zeros(len(features), bool)
    is_query[::4] = True
    embeddings = infer_output(tmp_path / "eval.npz", features, pids, cameras, is_query)
    gallery_path, results_path = tmp_path / "gallery.npz", tmp_path / "results.json"
    assert run_main(gallery_cli.main, ["build", str(embeddings), "-o", str(gallery_path)]) == 0
    assert run_main(gallery_cli.main, ["search", str(gallery_path), str(embeddings), "-k", "3",
                                       "--exclude", "label-and-camera", "-o", str(results_path)]) == 0
    results = json.loads(results_path.read_text())
    assert len(results) == is_query.sum()
    gallery = Gallery.load(gallery_path)
    assert len(gallery) == (~is_query).sum()
    first = results[0]
    expected = gallery.search(features[0], k=3, camera=cameras[0], label=pids[0], exclude="label_and_camera")
    assert [match["entry_id"] for match in first["matches"]] == [match.entry_id for match in expected]
    assert first["matches"][0]["name"] == f"t{np.flatnonzero(~is_query)[expected[0].entry_id]:03d}"
    assert first["matches"][0]["timestamp"] is None
    assert "queries against" in capsys.readouterr().out


def test_cli_refuses_to_overwrite_its_input(tmp_path, capsys):
    features, pids, cameras = mars_like_features(9, identities=3)
    embeddings = infer_output(tmp_path / "e.npz", features, pids, cameras)
    before = embeddings.read_bytes()
    assert run_main(gallery_cli.main, ["build", str(embeddings), "-o", str(embeddings)]) == 1
    assert "is one of the inputs" in capsys.readouterr().err and embeddings.read_bytes() == before


def test_cli_search_with_a_truncated_gallery_or_another_width_is_one_error_line(tmp_path, capsys):
    features, pids, cameras = mars_like_features(10, identities=3)
    embeddings = infer_output(tmp_path / "e.npz", features, pids, cameras)
    wider = infer_output(tmp_path / "wide.npz", np.zeros((2, DIM * 2), np.float32), pids[:2], cameras[:2])
    gallery_path = tmp_path / "g.npz"
    assert run_main(gallery_cli.main, ["build", str(embeddings), "-o", str(gallery_path)]) == 0
    capsys.readouterr()
    assert run_main(gallery_cli.main, ["search", str(gallery_path), str(wider)]) == 1
    assert f"features of length {DIM}, but these features have length {DIM * 2}" in capsys.readouterr().err
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(gallery_path.read_bytes()[:100])
    assert run_main(gallery_cli.main, ["search", str(truncated), str(embeddings)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a gallery file" in err and len(err.strip().splitlines()) == 1


def test_gallery_cli_ranks_infer_output_on_a_mars_tree_as_the_evaluation_does(tmp_path):
    pytest.importorskip("scipy.io")
    from test_runtime_cli import build_mars_tree
    from toy_engine_model import build_toy_model
    from keyreid.runtime import infer
    root = build_mars_tree(tmp_path / "MARS")
    embeddings, gallery_path, results_path = tmp_path / "mars.npz", tmp_path / "g.npz", tmp_path / "r.json"
    assert infer.main(["--engine", str(build_toy_model(tmp_path / "toy.onnx")), "--dataset", "mars",
                       "--root", str(root), "--output", str(embeddings), "-q"]) == 0
    assert gallery_cli.main(["build", str(embeddings), "-o", str(gallery_path)]) == 0
    assert gallery_cli.main(["search", str(gallery_path), str(embeddings), "--exclude", "label-and-camera",
                             "-k", "100", "-o", str(results_path)]) == 0

    arrays = dict(np.load(embeddings))
    query, gallery = arrays["is_query"], ~arrays["is_query"]
    distances = squared_euclidean_distances(arrays["embeddings"][query], arrays["embeddings"][gallery])
    results = json.loads(results_path.read_text())
    assert [result["query"] for result in results] == arrays["tracklets"][query].tolist()
    for row, result in enumerate(results):
        expected = protocol_order(distances[row], arrays["pids"][query][row], arrays["cameras"][query][row],
                                  arrays["pids"][gallery], arrays["cameras"][gallery])
        assert [match["name"] for match in result["matches"]] == arrays["tracklets"][gallery][expected].tolist()


def test_cli_protocol_search_skips_queries_without_identity_and_does_the_rest(tmp_path, capsys):
    features, pids, cameras = mars_like_features(11, identities=5)
    pids = pids.copy()
    pids[0] = -1
    embeddings = infer_output(tmp_path / "e.npz", features, pids, cameras)
    gallery_path, results_path = tmp_path / "g.npz", tmp_path / "r.json"
    assert gallery_cli.main(["build", str(embeddings), "-o", str(gallery_path)]) == 0
    assert gallery_cli.main(["search", str(gallery_path), str(embeddings), "--exclude", "label-and-camera",
                             "-o", str(results_path)]) == 0
    assert [result["query"] for result in json.loads(results_path.read_text())] == \
        [f"t{index:03d}" for index in range(1, len(features))]
    assert "1 queries without an identity (pid -1) were not searched" in capsys.readouterr().out
