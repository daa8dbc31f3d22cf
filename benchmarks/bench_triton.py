"""What serving through Triton costs: the reduced ONNX model called directly vs the same engine
behind a loopback tritonserver (PyTriton's bundled build) over gRPC and HTTP, grouped by batch
size so pytest-benchmark prints them side by side.

    python -m pytest benchmarks/bench_triton.py --benchmark-only

The reduced model takes milliseconds per clip, so the gap is the protocol's own cost per call
(serialising about 400 KB of frames per clip, two hops on loopback, the server's queue); on
ViT-B, which takes about a second per clip on a CPU, it is a small fraction.
"""
import socket

import pytest

from keyreid.benchmarks.model_speed import sample_feed

pytest.importorskip("pytriton")
THREADS = 2
MAX_BATCH = 8


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def engines(bench_onnx, bench_checkpoint, tmp_path_factory):
    from keyreid.runtime.backends import open_engine
    from keyreid.runtime.serve_triton import triton_server

    grpc_port, http_port = _free_port(), _free_port()
    with open_engine(bench_onnx["fp32"], providers=["CPUExecutionProvider"], threads=THREADS) as local:
        # No queue delay: a lone caller should not wait for company that never comes.
        with triton_server(local, grpc_port=grpc_port, http_port=http_port, max_batch=MAX_BATCH,
                           max_queue_delay_us=0, workspace=tmp_path_factory.mktemp("bench_triton") / "w"):
            # The server publishes no camera count, so clients name it (docs/serving.md).
            cameras = bench_checkpoint.config.num_cameras
            with open_engine(f"grpc://127.0.0.1:{grpc_port}/keyreid", num_cameras=cameras) as grpc_engine, \
                    open_engine(f"http://127.0.0.1:{http_port}/keyreid", num_cameras=cameras) as http_engine:
                yield {"local onnx fp32": local, "triton grpc": grpc_engine, "triton http": http_engine}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine", ["local onnx fp32", "triton grpc", "triton http"])
def test_clips_per_call_through_triton(benchmark, engines, bench_checkpoint, engine, batch):
    benchmark.group = f"triton, batch {batch}"
    feed = sample_feed(batch, bench_checkpoint.config.num_cameras)
    run = engines[engine].infer
    run(feed)
    benchmark.extra_info.update(batch=batch, engine=engine)
    benchmark(run, feed)
