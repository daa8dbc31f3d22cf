"""batch.py on real Ray against infer.py: a local Ray instance, and a two-node cluster on this
machine (``ray start --head`` plus a second ``ray start --address``, then ``batch.py --address``).

Every Ray process here authenticates with a token made for this module (RAY_AUTH_MODE=token,
RAY_AUTH_TOKEN_PATH), so nothing else can join or drive these clusters and nothing is written to
~/.ray. Ray 2.60 will not keep a cluster on 127.0.0.1 (it replaces a loopback address with the
machine's own), so both nodes listen on this machine's address; they are still this one machine.
Each node is a ``ray start --block`` process, which stops its node's processes when terminated.
batch.py runs as a subprocess, as a user runs it, so each run is its own Ray driver.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from keyreid.cli import run_main
from keyreid.errors import KeyreidError
from keyreid.runtime import batch, infer
from keyreid.runtime.results.batch_output import BatchOutput, part_files, read_output
from keyreid.synthetic import write_synthetic_tracklet

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

REPO = Path(__file__).resolve().parent.parent
BATCH = REPO / "runtime" / "batch.py"
RAY_CLI = Path(sys.executable).parent / "ray"
ACTOR_TITLE = "ray::MapWorker(MapBatches(EmbedTracklets))"   # the embedding actor's process title
RUN_TIMEOUT_S = 300
NODE_TIMEOUT_S = 120
STOP_GRACE_S = 5             # a node's processes get this long to stop before they are killed
NUM_TRACKLETS = 24


def run_tool(module, *argv) -> int:
    return run_main(module.main, [str(arg) for arg in argv])


@pytest.fixture(scope="module")
def ray_env():
    """Environment of every Ray process here: a token of its own, a short temporary folder (Ray's
    socket paths must stay short), no usage reporting."""
    folder = Path(tempfile.mkdtemp(prefix="kr-ray-", dir="/tmp"))
    (folder / "token").write_text(os.urandom(32).hex())
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(folder / "token"),
               RAY_TMPDIR=str(folder), RAY_USAGE_STATS_ENABLED="0")
    yield {"env": env, "folder": folder}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tracklets(tmp_path_factory):
    """24 tracklets of 1..13 frames (1..4 clips), with identities and cameras in a manifest."""
    root = tmp_path_factory.mktemp("batch_tracklets")
    rng = np.random.default_rng(22)
    rows = ["tracklet,pid,camera"]
    for index in range(NUM_TRACKLETS):
        write_synthetic_tracklet(root / f"t{index:02d}", int(rng.integers(1, 14)), rng)
        rows.append(f"t{index:02d},{index % 5 if index % 7 else ''},{index % 3 - 1}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def reference(reduced_onnx, tracklets, tmp_path_factory):
    """infer.py's output for the same tracklets."""
    output = tmp_path_factory.mktemp("batch_reference") / "reference.npz"
    assert run_tool(infer, "--engine", reduced_onnx, "--tracklets", tracklets, "--output", output, "-q") == 0
    return dict(np.load(output))


def run_batch(ray_env, *argv, timeout=RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BATCH), *map(str, argv), "-q"], capture_output=True, text=True,
                          env=ray_env["env"], timeout=timeout)


def assert_same_as_infer(output: Path, reference: dict) -> dict:
    """Each tracklet once, with infer.py's embedding (relative error <= 1e-6), pid and camera."""
    written = read_output(output)
    names = written["name"].tolist()
    assert len(names) == len(set(names)) and sorted(names) == sorted(reference["tracklets"].tolist())
    rows = [names.index(name) for name in reference["tracklets"].tolist()]
    expected = reference["embeddings"]
    relative = np.abs(written["embedding"][rows] - expected).max() / np.abs(expected).max()
    assert relative <= 1e-6
    np.testing.assert_array_equal(written["pid"][rows], reference["pids"])
    np.testing.assert_array_equal(written["camera"][rows], reference["cameras"])
    return written


def snapshot(folder: Path) -> dict:
    return {path.name: path.stat().st_mtime_ns for path in part_files(folder)}


# ----------------------------------------------------------------------------- a local instance

def test_local_ray_writes_what_infer_writes_and_a_rerun_writes_nothing(ray_env, reduced_onnx, tracklets,
                                                                        reference, tmp_path):
    output = tmp_path / "out"
    first = run_batch(ray_env, "--engine", reduced_onnx, "--tracklets", tracklets, "-o", output,
                      "--rows-per-part", 10)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"tracklets: {NUM_TRACKLETS} written, 0 failed, 0 already in the output" in first.stdout
    assert_same_as_infer(output, reference)
    assert len(part_files(output)) == 3                    # 10 + 10 + 4 rows
    before = snapshot(output)
    second = run_batch(ray_env, "--engine", reduced_onnx, "--tracklets", tracklets, "-o", output)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"0 written, 0 failed, {NUM_TRACKLETS} already in the output" in second.stdout
    assert "nothing new to write" in second.stdout and snapshot(output) == before


# ----------------------------------------------------------------------------- a two-node cluster

def _start_node(ray_env, *argv) -> subprocess.Popen:
    """``ray start --block`` in a process group of its own, so its node's processes can be
    stopped together."""
    return subprocess.Popen([str(RAY_CLI), "start", "--block", "--num-cpus", "1", "--disable-usage-stats", *argv],
                            env=ray_env["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_for_nodes(ray_env, address: str, count: int) -> bool:
    """True once ``count`` nodes are alive (one driver polls; each connection costs seconds)."""
    script = ("import ray, sys, time\nray.init(address=%r, log_to_driver=False)\n"
              "deadline = time.monotonic() + %d\n"
              "while sum(node['Alive'] for node in ray.nodes()) < %d and time.monotonic() < deadline:\n"
              "    time.sleep(0.2)\n"
              "sys.exit(sum(node['Alive'] for node in ray.nodes()) < %d)")
    result = subprocess.run([sys.executable, "-c", script % (address, NODE_TIMEOUT_S, count, count)],
                            capture_output=True, text=True, env=ray_env["env"], timeout=NODE_TIMEOUT_S + 60)
    return result.returncode == 0


def _stop_nodes(nodes) -> None:
    for node in nodes:
        node.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for node in nodes:
        try:
            node.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)      # what is left of the node: our group only
        node.wait()


@pytest.fixture(scope="module")
def cluster(ray_env):
    """A head node and a worker node, one CPU each; yields the head's address and temp folder."""
    if not RAY_CLI.is_file():
        pytest.skip(f"the ray command is not beside {sys.executable}")
    with socket.socket() as probe:            # a free port for the head node
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp_dir = ray_env["folder"] / "cluster"
    nodes = [_start_node(ray_env, "--head", "--port", str(port), "--include-dashboard=false",
                         "--temp-dir", str(temp_dir))]
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + NODE_TIMEOUT_S
        while subprocess.run([str(RAY_CLI), "health-check", "--address", address], env=ray_env["env"],
                             capture_output=True).returncode != 0:
            assert nodes[0].poll() is None and time.monotonic() < deadline, "the head node did not start"
            time.sleep(0.5)
        nodes.append(_start_node(ray_env, "--address", address))
        assert _wait_for_nodes(ray_env, address, 2), "the worker node did not join"
        yield {"address": address, "temp_dir": temp_dir}
    finally:
        _stop_nodes(list(reversed(nodes)))


def test_two_node_cluster_writes_what_infer_writes(ray_env, cluster, reduced_onnx, tracklets, reference, tmp_path):
    output = tmp_path / "out"
    # One CPU per node: the actor takes one node, decoding runs on the other.
    result = run_batch(ray_env, "--engine", reduced_onnx, "--tracklets", tracklets, "-o", output,
                       "--address", cluster["address"], "--cpus-per-actor", 1, "--decode-cpus", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_as_infer(output, reference)


def _process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def embedding_actors(temp_dir: Path) -> list:
    """Pids of the embedding actors of the cluster whose raylets run under ``temp_dir``."""
    raylets = {int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
               and "raylet" in _process_title(int(entry.name)) and str(temp_dir) in _process_title(int(entry.name))}
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
            and _process_title(int(entry.name)).startswith(ACTOR_TITLE) and _parent(int(entry.name)) in raylets]


def test_an_actor_killed_mid_run_loses_and_duplicates_nothing(ray_env, cluster, reduced_onnx, tracklets,
                                                              reference, tmp_path):
    output = tmp_path / "out"
    log = tmp_path / "batch.log"
    with open(log, "w") as stream:
        run = subprocess.Popen(
            [sys.executable, str(BATCH), "--engine", str(reduced_onnx), "--tracklets", str(tracklets), "-o",
             str(output), "--address", cluster["address"], "--tracklets-per-batch", "1", "--rows-per-part", "1",
             "--threads", "1", "--actors", "1", "-q"], env=ray_env["env"], stdout=stream, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not part_files(output) or not embedding_actors(cluster["temp_dir"]):
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        killed = embedding_actors(cluster["temp_dir"])
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        written_at_kill = len(part_files(output))
        assert run.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    assert killed and written_at_kill < NUM_TRACKLETS          # the kill came mid-run
    assert_same_as_infer(output, reference)
    assert len(part_files(output)) == NUM_TRACKLETS            # one row per part, none twice


# ----------------------------------------------------------------------------- MARS on the cluster

def build_mars(root: Path) -> Path:
    """A small MARS test split: frames and same-stem poses in bbox_test/<pid>/, the info tables."""
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(5)
    names, table = [], []
    for pid, camera, tracklet, frames in [(1, 1, 1, 5), (1, 2, 1, 3), (2, 1, 1, 6), (2, 3, 1, 2), (-1, 2, 1, 2),
                                          (3, 2, 1, 9)]:
        pid_text = "00-1" if pid == -1 else f"{pid:04d}"
        stems = [f"{pid_text}C{camera}T{tracklet:04d}F{frame:03d}" for frame in range(1, frames + 1)]
        write_synthetic_tracklet(root / "bbox_test" / pid_text, frames, rng, stems=stems)
        table.append([len(names) + 1, len(names) + frames, pid, camera])
        names += [stem + ".jpg" for stem in stems]
    (root / "info").mkdir()
    (root / "info" / "test_name.txt").write_text("\n".join(names) + "\n")
    scipy_io.savemat(str(root / "info" / "tracks_test_info.mat"), {"track_test_info": np.array(table, np.int32)})
    scipy_io.savemat(str(root / "info" / "query_IDX.mat"), {"query_IDX": np.array([[1, 3]], np.int32)})
    return root


def test_mars_layout_on_the_cluster_matches_infer_and_marks_queries(ray_env, cluster, reduced_onnx, tmp_path):
    root = build_mars(tmp_path / "MARS")
    poses = root / "bbox_test"                       # the poses lie beside the frames: <pid>/<stem>.pose
    expected = tmp_path / "reference.npz"
    assert run_tool(infer, "--engine", reduced_onnx, "--dataset", "mars", "--root", root, "--keypoints", poses,
                    "--output", expected, "-q") == 0
    result = run_batch(ray_env, "--engine", reduced_onnx, "--mars", root, "--keypoints", poses,
                       "-o", tmp_path / "out", "--address", cluster["address"])
    assert result.returncode == 0, result.stderr[-3000:]
    reference = dict(np.load(expected))
    written = assert_same_as_infer(tmp_path / "out", reference)
    sources = dict(zip(written["name"].tolist(), written["source"].tolist()))
    assert {name: sources[name] == "query" for name in reference["tracklets"].tolist()} == \
        dict(zip(reference["tracklets"].tolist(), reference["is_query"].tolist()))
    assert "pose files: 25 read, 0 missing" in result.stdout            # junk row skipped


# ----------------------------------------------------------------------------- failures

def test_a_bad_tracklet_fails_alone_is_listed_and_is_tried_again(ray_env, cluster, reduced_onnx, tracklets,
                                                                   reference, tmp_path):
    second = tmp_path / "second"
    write_synthetic_tracklet(second / "good", 6, np.random.default_rng(3))
    write_synthetic_tracklet(second / "broken", 5, np.random.default_rng(4))
    (second / "broken" / "0002.jpg").write_bytes(b"not an image")
    (second / "empty").mkdir()
    output = tmp_path / "out"
    result = run_batch(ray_env, "--engine", reduced_onnx, "--tracklets", tracklets, second, "-o", output,
                       "--address", cluster["address"])
    assert result.returncode == 1
    assert "failed second/broken: cannot decode frame" in result.stdout
    assert "failed second/empty: no frames" in result.stdout
    assert "2 tracklet(s) failed" in result.stderr
    names = read_output(output)["name"].tolist()
    assert sorted(names) == sorted([f"{tracklets.name}/{name}" for name in reference["tracklets"].tolist()]
                                   + ["second/good"])
    rerun = run_batch(ray_env, "--engine", reduced_onnx, "--tracklets", tracklets, second, "-o", output,
                      "--address", cluster["address"], "--keep-going")
    assert rerun.returncode == 0 and f"0 written, 2 failed, {NUM_TRACKLETS + 1} already" in rerun.stdout


def test_bad_input_is_one_error_before_ray_starts(reduced_onnx, tracklets, tmp_path, capsys):
    assert run_tool(batch, "--engine", reduced_onnx, "--tracklets", tracklets, "-o", tracklets / "out") == 1
    assert "is inside the input folder" in capsys.readouterr().err
    assert run_tool(batch, "--engine", tmp_path / "missing.onnx", "--tracklets", tracklets, "-o", tmp_path / "o") == 1
    assert "missing.onnx" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        run_tool(batch, "--engine", reduced_onnx, "--tracklets", tracklets, "-o", tmp_path / "o", "--keypoints", tmp_path)
    assert exited.value.code == 2 and "--keypoints is for --mars" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_output_folder_of_another_engine_or_in_use_is_refused(reduced_onnx, tracklets, tmp_path, capsys):
    output = tmp_path / "out"
    other = {"engine": "/models/other.onnx", "engine_sha256": "0" * 64}
    with BatchOutput(output, other) as writer:
        writer.write_part({"name": np.array(["t00"]), "source": np.array(["x"]), "pid": np.array([1]),
                           "camera": np.array([0]), "frames": np.array([4]), "clips": np.array([1]),
                           "embedding": np.ones((1, 8), np.float32)})
        with pytest.raises(KeyreidError, match="another batch.py run is writing"):
            BatchOutput(output, other).__enter__()
    assert run_tool(batch, "--engine", reduced_onnx, "--tracklets", tracklets, "-o", output) == 1
    assert "holds embeddings of another engine (/models/other.onnx" in capsys.readouterr().err
    assert len(part_files(output)) == 1


def test_the_runtime_core_imports_neither_ray_nor_lancedb():
    script = ("import sys, keyreid.runtime, keyreid.runtime.infer, keyreid.runtime.gallery\n"
              "print(sorted(name for name in ('ray', 'lancedb', 'pyarrow') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_batch_modules_import_without_ray_and_say_which_extra_to_install(reduced_onnx, tracklets, tmp_path):
    script = ("import sys; sys.modules['ray'] = None; sys.modules['torch'] = None\n"
              "from keyreid.cli import run_main; from keyreid.runtime import batch\n"
              "sys.exit(run_main(batch.main, sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, "--engine", str(reduced_onnx), "--tracklets",
                             str(tracklets), "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert 'ray is not installed (needed for batch embedding on Ray' in result.stderr
    assert 'pip install "keyreid[ray]"' in result.stderr and not (tmp_path / "out").exists()


def test_help_names_the_output_columns_resuming_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        run_tool(batch, "--help")
    text = capsys.readouterr().out
    for phrase in ("--address", "name (string), source", "rerun skips", "exit status", "--max-restarts"):
        assert phrase in text
