"""What serving through Triton costs: the reduced ONNX model called directly vs the same engine
behind a loopback tritonserver (PyTriton's bundled build) over gRPC and HTTP, grouped by batch
size so pytest-benchmark prints them side by side.

    python -m pytest benchmarks/bench_triton.py --benchmark-only

The reduced model takes milliseconds per clip, so the gap is the protocol's own cost per call
(serialising about 400 KB of frames per clip, two hops on loopback, the server's queue); on
ViT-B, which takes about a second per clip on a CPU, it is a small fraction.

The server runs as a subprocess from the environment the Triton tests use (PyTriton pins
numpy < 2; triton_server_env.py makes it once); its engine uses the same threads as the
local one.
"""
import os
import subprocess

import pytest

from keyreid.benchmarks.model_speed import sample_feed

from keyreid.benchmarks.triton_server_env import (ServerEnvironmentError, keyreid_copy, server_python,
                                                  triton_server_process)

THREADS = 2
MAX_BATCH = 8


@pytest.fixture(scope="module")
def engines(bench_onnx, bench_checkpoint, tmp_path_factory):
    from keyreid.runtime.backends import open_engine

    try:
        python, keyreid_path = server_python(), keyreid_copy(tmp_path_factory.mktemp("bench_keyreid"))
    except (ServerEnvironmentError, subprocess.TimeoutExpired) as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no environment for the Triton server: {exc}")
    log = tmp_path_factory.mktemp("bench_triton") / "server.log"
    # Next to no queue delay (1 us, the least the command line takes): a lone caller should not
    # wait for company that never comes.
    with triton_server_process(python, keyreid_path, bench_onnx["fp32"], log, max_batch=MAX_BATCH,
                               max_queue_delay_us=1, extra_args=("--providers", "cpu", "--threads", str(THREADS))
                               ) as server, \
            open_engine(bench_onnx["fp32"], providers=["CPUExecutionProvider"], threads=THREADS) as local:
        # The server publishes no camera count, so clients name it (docs/serving.md).
        cameras = bench_checkpoint.config.num_cameras
        with open_engine(server["grpc"], num_cameras=cameras) as grpc_engine, \
                open_engine(server["http"], num_cameras=cameras) as http_engine:
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
