"""Files are never destroyed: outputs that are inputs are refused before any work, writes are
whole with unique temporary names and normal permissions, and no temporary file survives an
error or a signal."""
import re
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from keyreid.errors import KeyreidError

from keyreid import files

from test_runtime_cli import gray_tracklet, run_infer, toy_model  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def pair(tmp_path):
    root = tmp_path / "tracklets"
    gray_tracklet(root, "a", 40, num_frames=2)
    gray_tracklet(root, "b", 90, num_frames=2)
    return root


def test_infer_output_that_is_the_engine_is_refused_and_the_engine_kept(toy_model, pair, tmp_path, capsys):
    engine = tmp_path / "model.onnx"
    shutil.copy(toy_model, engine)
    before = engine.read_bytes()
    assert run_infer("--engine", engine, "--tracklets", pair, "-o", engine, "-q") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --output") and "the engine" in err and err.count("\n") == 1
    assert engine.read_bytes() == before


def test_infer_output_that_is_a_frame_is_refused_and_the_frame_kept(toy_model, pair, capsys):
    frame = pair / "a" / "0000.png"
    before = frame.read_bytes()
    assert run_infer("--engine", toy_model, "--tracklets", pair, "-o", frame, "-q") == 1
    assert "input files" in capsys.readouterr().err
    assert frame.read_bytes() == before


def test_infer_output_that_is_the_manifest_is_refused(toy_model, pair, capsys):
    manifest = pair / "manifest.csv"
    manifest.write_text("tracklet,pid,camera\na,1,0\n")
    assert run_infer("--engine", toy_model, "--tracklets", pair, "-o", manifest, "-q") == 1
    assert "input files" in capsys.readouterr().err
    assert manifest.read_text() == "tracklet,pid,camera\na,1,0\n"


def test_infer_output_that_links_to_a_pose_file_is_refused(toy_model, pair, tmp_path, capsys):
    pose = pair / "b" / "0001.pose"
    pose.write_text("[]")
    os.symlink(pose, tmp_path / "out.npz")
    assert run_infer("--engine", toy_model, "--tracklets", pair, "-o", tmp_path / "out.npz", "-q") == 1
    assert "input files" in capsys.readouterr().err
    assert pose.read_text() == "[]"


def test_infer_report_and_output_on_one_path_are_refused(toy_model, pair, tmp_path, capsys):
    same = tmp_path / "x.npz"
    assert run_infer("--engine", toy_model, "--query", pair, "--gallery", pair, "--report", same,
                     "-o", same, "-q") == 1
    assert "same file" in capsys.readouterr().err
    assert not same.exists()


def test_export_output_that_is_the_checkpoint_is_refused(reduced_checkpoint, tmp_path, capsys):
    from keyreid.cli import run_main
    from keyreid.export.to_onnx import main
    checkpoint = tmp_path / "c.pth"
    os.symlink(reduced_checkpoint, checkpoint)
    assert run_main(main, [str(checkpoint), "-o", str(reduced_checkpoint), "-q"]) == 1
    assert "the checkpoint" in capsys.readouterr().err


def test_written_files_get_the_permissions_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_json(tmp_path / "a.json", {"x": 1})
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct((tmp_path / "plain").stat().st_mode & 0o777)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_replacing_a_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "a.npz"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    files.write_npz(target, {"x": np.zeros(2)})
    assert target.stat().st_mode & 0o777 == 0o640


def test_concurrent_writers_to_one_path_each_install_their_own_whole_file(tmp_path):
    target = tmp_path / "out.bin"
    payloads = [bytes([index]) * 2_000_000 for index in range(8)]
    errors = []

    def write(data):
        try:
            files.write_bytes(target, data)
        except Exception as exc:     # any failure is what this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_bytes() in payloads
    assert os.listdir(tmp_path) == ["out.bin"]


def test_failed_block_leaves_no_temporary_file_and_the_old_target(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_output(target) as partial:
            assert partial.suffix == ".onnx" and partial.name.startswith(".")
            partial.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_sigterm_while_writing_removes_the_temporary_file(tmp_path):
    """A CLI under run_main unwinds on SIGTERM: exit 143, no temporary file left."""
    target = tmp_path / "out.bin"
    script = f"""
import sys, time
from keyreid.cli import run_main
from keyreid import files
def main(argv):
    with files.atomic_output({str(target)!r}) as partial:
        partial.write_bytes(b"x")
        print("writing", flush=True)
        time.sleep(60)
    return 0
sys.exit(run_main(main))
"""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "writing"
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 143 and "terminated" in err
    assert time.monotonic() - started < 10
    assert os.listdir(tmp_path) == []


def test_random_checkpoint_cli_reports_an_unwritable_output_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "export" / "random_checkpoint.py"),
                             str(tmp_path / "missing" / "c.pth"), "--reduced"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("content, reason", [
    ("npy", "holds a single array (.npy)"),
    ("zip header", "is not a reference file: it cannot be read as an .npz archive"),
    ("truncated", "is not a reference file: it cannot be read as an .npz archive"),
    (None, "does not exist"),
])
def test_npz_that_cannot_be_read_is_one_error_naming_what_it_should_be(tmp_path, content, reason):
    from keyreid.files import read_npz
    path = tmp_path / "ref.npz"
    if content == "npy":
        with open(path, "wb") as handle:
            np.save(handle, np.zeros(3))
    elif content == "zip header":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif content == "truncated":
        np.savez(path, feed=np.arange(1000))
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(KeyreidError, match=re.escape(reason)):
        read_npz(path, "reference file")
