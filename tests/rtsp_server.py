"""A loopback RTSP server for the stream tests, run by Debian's /usr/bin/python3 (python3-gi,
gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-good), not the project's Python:

    /usr/bin/python3 tests/rtsp_server.py VIDEO.mp4 PORT

serves the H.264 track of VIDEO.mp4 (as it is, no re-encoding) at rtsp://127.0.0.1:PORT/camera,
from its start for each client, at its own frame rate; prints "ready" once it listens.
"""
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402  (after require_version)


def main() -> None:
    video, port = sys.argv[1], sys.argv[2]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(f'( filesrc location="{video}" ! qtdemux ! rtph264pay name=pay0 pt=96 config-interval=1 )')
    server.get_mount_points().add_factory("/camera", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
