"""runtime/stream.py on real network streams served on loopback, and on H.264 video: an HTTP
MJPEG camera whose connection is cut mid-stream (a server in this process), RTSP from
GStreamer's RTSP server, MPEG-TS over TCP from ffmpeg. Each gives the embeddings of the same
video read from a file (rel <= 1e-5), so nothing is lost or shifted on the way.

ffmpeg (H.264, MPEG-TS) and GStreamer's RTSP server (``gir1.2-gst-rtsp-server-1.0`` with
``gstreamer1.0-plugins-good``, run by Debian's own ``/usr/bin/python3``, which has ``python3-gi``)
are Debian packages that .ci/run installs; elsewhere their tests skip naming the package, and
with CI=true they fail instead."""
import http.server
import os
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from keyreid.cli import run_main
from keyreid.runtime import infer, stream

from stream_helpers import (cut_by_hand, decoded_frames, relative_error, stream_outputs, write_scene_video)
from keyreid.synthetic_video import write_jsonl

cv2 = pytest.importorskip("cv2")
NUM_FRAMES = 30
DEBIAN_PYTHON = "/usr/bin/python3"
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")
# Every frame of these short videos fits in the reader's queue, so a busy machine cannot make
# a live stream drop one and the comparison with the file stays exact.
NO_DROPS = ("--queue-frames", "64")


def debian_tool(command: str, package: str) -> str:
    """The path of ``command``; outside CI a missing one skips the test naming the package to
    install, in CI (``CI=true``, where .ci/run installs it) it fails the test."""
    import shutil
    path = shutil.which(command)
    if path is None:
        missing(f"{command} is not installed: apt-get install {package} (Debian)")
    return path


def missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; .ci/run installs it before the tests")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_stream(*argv) -> int:
    return run_main(stream.main, [str(arg) for arg in argv])


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("net_scene")
    video = folder / "cam.avi"
    records = write_scene_video(video, 7, NUM_FRAMES, 3)
    return {"folder": folder, "video": video, "records": records, "tracks": write_jsonl(folder / "cam.jsonl", records)}


@pytest.fixture(scope="module")
def from_file(scene, reduced_onnx, tmp_path_factory):
    """The embeddings of the MJPEG file read directly."""
    out = tmp_path_factory.mktemp("net_file")
    assert run_stream("--engine", reduced_onnx, "--stream", scene["video"], scene["tracks"], "-o", out, "-q") == 0
    return stream_outputs(out)["embeddings"]


@pytest.fixture(scope="module")
def h264(scene):
    """The scene as H.264 in MP4 (Debian's ffmpeg with libx264; OpenCV's wheels cannot encode it)."""
    ffmpeg = debian_tool("ffmpeg", "ffmpeg")
    video = scene["folder"] / "cam.mp4"
    subprocess.run([ffmpeg, "-loglevel", "error", "-y", "-i", str(scene["video"]), "-c:v", "libx264", "-preset",
                    "ultrafast", "-g", "8", "-bf", "0", "-pix_fmt", "yuv420p", str(video)], check=True, timeout=120)
    return video


def assert_same_embeddings(found, expected):
    assert set(found) == set(expected) and found
    for name, embedding in found.items():
        assert relative_error(embedding, expected[name]) <= 1e-5, name


# --- HTTP MJPEG, cut mid-stream -------------------------------------------------------------

def jpeg_packets(video: Path):
    """The AVI's JPEG frames as stored (OpenCV hands over packets undecoded with FORMAT -1)."""
    capture = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    capture.set(cv2.CAP_PROP_FORMAT, -1)
    packets = []
    while True:
        ok, packet = capture.read()
        if not ok:
            break
        packets.append(packet.tobytes())
    capture.release()
    return packets


class MjpegCamera(socketserver.ThreadingTCPServer):
    """An IP camera's multipart MJPEG over HTTP, 25 frames a second. The first connection is
    reset (RST) after ``cut_after`` frames; the next one goes on from the frame after them, as a
    live camera would."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, packets, cut_after: int):
        self.packets, self.cut_after, self.next_frame, self.connections = packets, cut_after, 0, 0
        super().__init__(("127.0.0.1", 0), self._Handler)

    class _Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            server = self.server
            server.connections += 1
            first = server.connections == 1
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            while server.next_frame < len(server.packets):
                if first and server.next_frame == server.cut_after:
                    # Reset, not a clean close: the client sees the connection torn down.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                packet = server.packets[server.next_frame]
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(packet)
                                 + packet + b"\r\n")
                self.wfile.flush()
                server.next_frame += 1
                time.sleep(0.04)

        def log_message(self, *args):
            pass


def test_an_http_camera_cut_mid_stream_reconnects_and_its_tracks_continue(scene, from_file, reduced_onnx, tmp_path,
                                                                          capsys):
    camera = MjpegCamera(jpeg_packets(scene["video"]), cut_after=NUM_FRAMES // 2)
    threading.Thread(target=camera.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{camera.server_address[1]}/video.mjpg"
        assert run_stream("--engine", reduced_onnx, "--stream", url, scene["tracks"], *NO_DROPS,
                          "--reconnect-timeout", "2", "-o", tmp_path / "out", "-q") == 1
    finally:
        camera.shutdown()
        camera.server_close()
    captured = capsys.readouterr()
    # The camera served every frame, then went away for good: the stream gives up, as it should.
    assert f"{NUM_FRAMES} frames processed of {NUM_FRAMES} decoded, 0 dropped" in captured.out
    assert camera.connections >= 2 and "gave up after 2 s of failed reconnects" in captured.err
    found = stream_outputs(tmp_path / "out")
    # One result per track, not two halves: the tracks went on across the cut.
    assert sorted(line["name"] for line in found["lines"]) == sorted(from_file)
    assert_same_embeddings(found["embeddings"], from_file)


# --- H.264: a file, RTSP, MPEG-TS over TCP --------------------------------------------------

@pytest.fixture(scope="module")
def h264_from_file(h264, scene, reduced_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("h264_file")
    assert run_stream("--engine", reduced_onnx, "--stream", h264, scene["tracks"], "-o", out, "-q") == 0
    return stream_outputs(out)["embeddings"]


def test_an_h264_file_gives_infer_embeddings_on_its_decoded_crops(h264, h264_from_file, scene, reduced_onnx,
                                                                   tmp_path):
    frames = decoded_frames(h264)
    assert len(frames) == NUM_FRAMES
    cut_by_hand(frames, scene["records"], tmp_path / "cut", 0)
    assert run_main(infer.main, ["--engine", str(reduced_onnx), "--tracklets", str(tmp_path / "cut"),
                                 "-o", str(tmp_path / "i.npz"), "-q"]) == 0
    saved = np.load(tmp_path / "i.npz")
    expected = {"cam0/" + str(name).split("_", 1)[1]: row for name, row in zip(saved["tracklets"], saved["embeddings"])}
    assert_same_embeddings(h264_from_file, expected)


def rtsp_server_available() -> None:
    if not Path(DEBIAN_PYTHON).exists():
        missing(f"{DEBIAN_PYTHON} is not installed: apt-get install python3-gi (Debian)")
    probe = subprocess.run([DEBIAN_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                                               "from gi.repository import GstRtspServer, Gst; Gst.init(None); "
                                               "assert Gst.ElementFactory.find('qtdemux') and Gst.ElementFactory.find('rtph264pay')"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode:
        missing("GStreamer's RTSP server is not installed: apt-get install gir1.2-gst-rtsp-server-1.0 "
                "gstreamer1.0-plugins-good python3-gi (Debian)")


def test_an_rtsp_stream_gives_the_files_embeddings(h264, h264_from_file, scene, reduced_onnx, tmp_path):
    rtsp_server_available()
    port = free_port()
    server = subprocess.Popen([DEBIAN_PYTHON, str(RTSP_SERVER), str(h264), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        assert run_stream("--engine", reduced_onnx, "--stream", f"rtsp://127.0.0.1:{port}/camera", scene["tracks"],
                          *NO_DROPS, "--reconnect-timeout", "0", "-o", tmp_path / "out", "-q") == 1
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert_same_embeddings(stream_outputs(tmp_path / "out")["embeddings"], h264_from_file)


def test_an_mpeg_ts_stream_over_tcp_gives_the_files_embeddings(h264, h264_from_file, scene, reduced_onnx, tmp_path,
                                                               capsys):
    ffmpeg = debian_tool("ffmpeg", "ffmpeg")
    port = free_port()
    server = subprocess.Popen([ffmpeg, "-loglevel", "error", "-re", "-i", str(h264), "-c", "copy", "-f", "mpegts",
                               f"tcp://127.0.0.1:{port}?listen=1"], stdin=subprocess.DEVNULL)
    try:
        assert run_stream("--engine", reduced_onnx, "--stream", f"tcp://127.0.0.1:{port}", scene["tracks"],
                          *NO_DROPS, "--reconnect-timeout", "2", "-o", tmp_path / "out", "-q") == 1
    finally:
        server.kill()
        server.wait(timeout=30)
    assert f"{NUM_FRAMES} frames processed of {NUM_FRAMES} decoded" in capsys.readouterr().out
    assert_same_embeddings(stream_outputs(tmp_path / "out")["embeddings"], h264_from_file)
