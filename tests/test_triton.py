"""Serving through Triton Inference Server: the model repository that export/to_triton.py
writes, and the Triton engine (grpc:// and http://) against a real server on loopback.

The server is the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles (Triton
2.51, Python backend only, CPU), started by the tests on 127.0.0.1 with free ports and stopped
after them. It serves the session's reduced ONNX model through keyreid's ONNX Runtime engine
(runtime/serve_triton.py) with server-side dynamic batching. PyTriton pins numpy < 2, so the
server runs as a subprocess from an environment of its own, made once from the
``[triton-server]`` extra (benchmarks/triton_server_env.py); the clients run here, on numpy 2. That
build has no ONNX Runtime or TensorRT backend, so the repository itself is checked by parsing
config.pbtxt with Triton's own ModelConfig protobuf (tritonclient) instead of by loading it.
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from keyreid.cli import run_main
from keyreid.errors import KeyreidError
from keyreid.export import to_triton
from keyreid.export.triton_repository import parse_config, validate_config
from keyreid.runtime import compare, infer
from keyreid.runtime.backends.triton import TritonLocation
from keyreid.runtime.backends import open_engine
from keyreid.synthetic import realistic_keypoints, synthetic_feed, synthetic_frames
from keyreid.triton import parameters_from_config
from keyreid.benchmarks.triton_server_env import (ServerEnvironmentError, free_port, keyreid_copy, server_python,
                                                  triton_server_process)
from toy_engine_model import toy_metadata

grpc_client = pytest.importorskip("tritonclient.grpc")
json_format = pytest.importorskip("google.protobuf.json_format")
cv2 = pytest.importorskip("cv2")

SERVER_MAX_BATCH = 4
SERVER_QUEUE_DELAY_US = 200_000   # long, so that concurrent requests reliably share a batch
ACCESS_TOKEN = "keyreid-test-token"   # unlocks the server's statistics endpoint
REPO = Path(__file__).resolve().parents[1]


def run_tool(module, *argv) -> int:
    return run_main(module.main, [str(arg) for arg in argv])


# ----------------------------------------------------------------------------- the repository

@pytest.fixture(scope="module")
def onnx_repository(reduced_onnx, tmp_path_factory):
    repository = tmp_path_factory.mktemp("triton") / "models"
    assert run_tool(to_triton, reduced_onnx, "--repository", repository, "--max-batch", 6, "--instances", 2,
                    "--kind", "cpu", "--max-queue-delay-us", 500, "-q") == 0
    return repository / "keyreid"


@pytest.fixture(scope="module")
def onnx_config(onnx_repository):
    return parse_config((onnx_repository / "config.pbtxt").read_text(), "config.pbtxt")


def test_repository_holds_the_config_the_model_unchanged_and_warmup_data(onnx_repository, reduced_onnx):
    assert (onnx_repository / "1" / "model.onnx").read_bytes() == reduced_onnx.read_bytes()
    crop_size = np.frombuffer((onnx_repository / "warmup" / "crop_size").read_bytes(), np.float32)
    np.testing.assert_array_equal(crop_size.reshape(4, 2), [[128, 256]] * 4)
    assert sorted(path.name for path in onnx_repository.rglob("*")) == [
        "1", "config.pbtxt", "crop_size", "model.onnx", "warmup"]
    assert (onnx_repository / "config.pbtxt").stat().st_mode & 0o044 == 0o044   # readable by the server


def test_config_parses_as_triton_model_config_with_the_contract_io(onnx_config):
    assert (onnx_config.name, onnx_config.platform, onnx_config.max_batch_size) == ("keyreid", "onnxruntime_onnx", 6)
    inputs = {tensor.name: (list(tensor.dims), grpc_client.model_config_pb2.DataType.Name(tensor.data_type))
              for tensor in onnx_config.input}
    assert inputs == {"frames": ([4, 256, 128, 3], "TYPE_UINT8"), "keypoints": ([4, 17, 3], "TYPE_FP32"),
                      "crop_size": ([4, 2], "TYPE_FP32"), "camera": ([1], "TYPE_INT64")}
    camera = next(tensor for tensor in onnx_config.input if tensor.name == "camera")
    assert camera.HasField("reshape") and list(camera.reshape.shape) == []   # [N, 1] on the wire, [N] in the model
    assert {tensor.name: list(tensor.dims) for tensor in onnx_config.output} == {
        "embedding": [3200], "part_weights": [128, 6]}


def test_config_batches_dynamically_with_the_chosen_instances_and_warms_up(onnx_config):
    assert list(onnx_config.dynamic_batching.preferred_batch_size) == [6]
    assert onnx_config.dynamic_batching.max_queue_delay_microseconds == 500
    (group,) = onnx_config.instance_group
    assert (group.count, grpc_client.model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)) == (2, "KIND_CPU")
    (warmup,) = onnx_config.model_warmup
    assert warmup.batch_size == 1 and set(warmup.inputs) == {"frames", "keypoints", "crop_size", "camera"}
    assert warmup.inputs["crop_size"].input_data_file == "crop_size"


def test_config_parameters_are_what_the_triton_engine_reads_as_metadata(onnx_config, reduced_onnx):
    # Triton's get_model_config(as_json=True) is this JSON form of the parsed configuration.
    as_json = json_format.MessageToDict(onnx_config, preserving_proto_field_name=True)
    with open_engine(reduced_onnx) as local:
        assert parameters_from_config(as_json) == local.metadata.to_strings()
    assert parameters_from_config(as_json)["num_cameras"] == "6"


def test_validation_lists_every_way_a_config_breaks_the_contract(onnx_repository, onnx_config):
    text = (onnx_repository / "config.pbtxt").read_text()
    broken = (text.replace('"onnxruntime_onnx"', '"pytorch_libtorch"').replace("dims: [ 4, 17, 3 ]", "dims: [ 4, 17, 2 ]")
              .replace("{ shape: [ ] }", "{ shape: [ 1 ] }"))
    output_specs = open_engine(onnx_repository / "1" / "model.onnx").activate().output_specs
    validate_config(text, output_specs)
    with pytest.raises(KeyreidError) as error:
        validate_config(broken, output_specs)
    message = str(error.value)
    assert "platform 'pytorch_libtorch'" in message
    assert "input 'keypoints' has dims [4, 17, 2]" in message
    assert "input 'camera' reaches the model as [1]" in message
    with pytest.raises(KeyreidError, match="not a valid Triton model configuration"):
        parse_config(text.replace("max_batch_size", "max_batch"))


def write_plan_with_sidecar(folder: Path, **changes) -> Path:
    """A stand-in plan (opaque bytes: nothing here reads a plan) and the sidecar export/to_tensorrt.py writes."""
    plan = folder / "model.plan"
    plan.write_bytes(b"opaque TensorRT plan bytes")
    sidecar = {"format": "keyreid-plan-sidecar", "format_version": 1, "tensorrt_version": "10.13.0.35",
               "cuda_version": "12.9", "device_name": "NVIDIA Jetson AGX Orin", "compute_capability": [8, 7],
               "onnx_sha256": "0" * 64, "plugin": "aot", "created_utc": "2026-11-24T00:00:00Z",
               "onnx_metadata": dict(toy_metadata(768, 2), heatmap_mode="mean", precision="fp16"),
               "build": {"min_batch": 1, "opt_batch": 4, "max_batch": 16, "workspace_mib": 1024,
                         "strongly_typed": True}}
    sidecar.update(changes)
    (folder / "model.plan.json").write_text(json.dumps(sidecar))
    return plan


def test_plan_repository_takes_batch_range_and_notes_from_the_sidecar(tmp_path, capsys):
    plan = write_plan_with_sidecar(tmp_path)
    assert run_tool(to_triton, plan, "--repository", tmp_path / "repo", "-q") == 0
    notes = capsys.readouterr().out
    assert "no plugin library" in notes and "TensorRT 10.13.0.35" in notes
    model_dir = tmp_path / "repo" / "keyreid"
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert (config.platform, config.max_batch_size) == ("tensorrt_plan", 16)
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert grpc_client.model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    assert {tensor.name: list(tensor.dims) for tensor in config.output}["embedding"] == [19200]
    parameters = parameters_from_config(json_format.MessageToDict(config, preserving_proto_field_name=True))
    assert parameters["tensorrt_version"] == "10.13.0.35" and parameters["num_cameras"] == "2"
    assert (model_dir / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert json.loads((model_dir / "1" / "model.plan.json").read_text())["plugin"] == "aot"


@pytest.mark.parametrize("options, sidecar, reason", [
    (("--kind", "cpu"), {}, "runs on a GPU only"),
    (("--max-batch", "32"), {}, "above the 16 clips"),
    ((), {"format_version": 2}, "format_version is 2"),
    ((), {"build": {"min_batch": 2, "opt_batch": 4, "max_batch": 16}}, "rebuild the plan with --min-batch 1"),
    ((), None, "sidecar model.plan.json is missing"),
])
def test_plan_problems_are_one_line_errors_and_write_nothing(tmp_path, capsys, options, sidecar, reason):
    plan = write_plan_with_sidecar(tmp_path, **(sidecar or {}))
    if sidecar is None:
        (tmp_path / "model.plan.json").unlink()
    assert run_tool(to_triton, plan, "--repository", tmp_path / "repo", *options) == 1
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def int8_toy_model(path: Path) -> Path:
    """The toy contract model with an int8 file's precision metadata (what to_triton.py reads)."""
    import onnx
    from toy_engine_model import build_toy_model

    model = onnx.load(str(build_toy_model(path)))
    model.metadata_props.add(key="precision", value="int8")
    onnx.save(model, str(path))
    return path


def test_an_int8_file_is_served_on_cpus_and_refused_for_gpus(tmp_path, capsys):
    model = int8_toy_model(tmp_path / "int8.onnx")
    assert run_tool(to_triton, model, "--repository", tmp_path / "repo", "-q") == 0
    assert "KIND_CPU" in capsys.readouterr().out
    config = parse_config((tmp_path / "repo" / "keyreid" / "config.pbtxt").read_text())
    assert grpc_client.model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
    assert run_tool(to_triton, model, "--repository", tmp_path / "gpu_repo", "--kind", "gpu", "-q") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model} is an int8 file") and "--kind cpu" in err and err.count("\n") == 1
    assert not (tmp_path / "gpu_repo").exists()


def test_repository_refuses_to_overwrite_its_own_input(onnx_repository, capsys):
    model = onnx_repository / "1" / "model.onnx"
    before = model.read_bytes()
    assert run_tool(to_triton, model, "--repository", onnx_repository.parent, "-q") == 1
    assert "already the repository's model file" in capsys.readouterr().err
    assert model.read_bytes() == before


# ----------------------------------------------------------------------------- a real server

@pytest.fixture(scope="session")
def server_environment(tmp_path_factory):
    """(the server environment's Python, a copy of this checkout's keyreid for its PYTHONPATH).
    Outside CI an environment that cannot be made (offline, no cached one) skips the server
    tests with the reason; in CI (CI=true) it fails them."""
    try:
        return server_python(), keyreid_copy(tmp_path_factory.mktemp("server_keyreid"))
    except (ServerEnvironmentError, subprocess.TimeoutExpired) as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no environment for the Triton server: {exc}")


@pytest.fixture(scope="module")
def server(server_environment, reduced_onnx, tmp_path_factory):
    """keyreid's ONNX Runtime engine behind the bundled tritonserver, on loopback, for this module."""
    python, keyreid_path = server_environment
    log = tmp_path_factory.mktemp("triton_server") / "server.log"
    with triton_server_process(python, keyreid_path, reduced_onnx, log, max_batch=SERVER_MAX_BATCH,
                               max_queue_delay_us=SERVER_QUEUE_DELAY_US, access_token=ACCESS_TOKEN,
                               extra_args=("--providers", "cpu")) as addresses:
        yield addresses


@pytest.fixture(scope="module")
def tracklets(tmp_path_factory):
    """Five tracklets of 1..9 JPEG frames with realistic poses (9 clips in all)."""
    root = tmp_path_factory.mktemp("triton_tracklets")
    rng = np.random.default_rng(7)
    for index, num_frames in enumerate((1, 4, 6, 9, 3)):
        clips = -(-num_frames // 4)
        frames = synthetic_frames(rng, clips).reshape(-1, 256, 128, 3)[:num_frames]
        keypoints, _ = realistic_keypoints(rng, clips, crop_sizes=[(128, 256)])
        folder = root / f"t{index}"
        folder.mkdir()
        for frame_index in range(num_frames):
            assert cv2.imwrite(str(folder / f"{frame_index:03d}.jpg"), frames[frame_index][..., ::-1].copy())
            (folder / f"{frame_index:03d}.pose").write_text(json.dumps(keypoints.reshape(-1, 17, 3)[frame_index].tolist()))
    return root


def test_infer_through_triton_grpc_equals_the_local_onnx_engine(server, reduced_onnx, tracklets, tmp_path):
    local, remote = tmp_path / "local.npz", tmp_path / "remote.npz"
    assert run_tool(infer, "--engine", reduced_onnx, "--tracklets", tracklets, "--output", local, "-q") == 0
    # A model served through PyTriton publishes no parameters, so its camera count is given.
    with open_engine(reduced_onnx) as engine:
        cameras = str(engine.num_cameras)
    assert run_tool(infer, "--engine", server["grpc"], "--num-cameras", cameras, "--tracklets", tracklets,
                    "--output", remote, "-q") == 0
    local, remote = np.load(local), np.load(remote)
    np.testing.assert_array_equal(remote["tracklets"], local["tracklets"])
    relative = np.abs(remote["embeddings"] - local["embeddings"]).max() / np.abs(local["embeddings"]).max()
    assert relative <= 1e-6


def test_infer_against_a_server_without_a_camera_count_names_the_flag_to_add(server, tracklets, tmp_path, capsys):
    assert run_tool(infer, "--engine", server["grpc"], "--tracklets", tracklets, "--output", tmp_path / "o.npz",
                    "-q") == 1
    err = capsys.readouterr().err
    assert "add --num-cameras C" in err and "--camera:" not in err and err.count("\n") == 1
    assert not (tmp_path / "o.npz").exists()


SERVER_LOG_LINE = re.compile(r"^[IWE]\d{4} ", re.M)     # glog: severity, month and day, ...


def test_serve_tool_prints_a_status_not_the_server_log(server_environment, reduced_onnx):
    python, keyreid_path = server_environment        # the tool as a user runs it where PyTriton is
    environment = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    environment["PYTHONPATH"] = str(keyreid_path)
    serving = subprocess.Popen([str(python), "-m", "keyreid.runtime.serve_triton", "--engine", str(reduced_onnx),
                                "--grpc-port", str(free_port()), "--http-port", str(free_port())],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                               cwd=keyreid_path)
    try:
        status = [serving.stderr.readline() for _ in range(2)]
    finally:
        serving.send_signal(signal.SIGTERM)
        stdout, stderr = serving.communicate(timeout=60)
    assert status[0].startswith("starting the Triton server (-v shows its log)")
    assert status[1].startswith("serving ") and "Ctrl-C stops" in status[1]
    assert serving.returncode == 0 and SERVER_LOG_LINE.findall(stdout + stderr) == []


def test_serve_tool_names_the_port_flag_when_the_port_is_taken(server, reduced_onnx, capsys):
    from keyreid.runtime import serve_triton

    busy_grpc_port = server["grpc_server"].rsplit(":", 1)[1]
    assert run_tool(serve_triton, "--engine", reduced_onnx, "--grpc-port", busy_grpc_port,
                    "--http-port", free_port()) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --grpc-port {busy_grpc_port}: cannot listen on 127.0.0.1:{busy_grpc_port}")
    assert err.count("\n") == 1


def test_a_failed_start_quotes_the_error_lines_of_the_server_log(tmp_path):
    from keyreid.runtime.serve_triton import MAX_LOG_LINES_SHOWN, _relevant_log_lines

    log = tmp_path / "tritonserver.log"
    info = [f'I1207 00:49:01.{index:06d} 7697 server.cc:604] "line {index}"' for index in range(30)]
    error = 'E1207 00:49:01.423875 7697 main.cc:245] "failed to start GRPC service: Socket in use"'
    log.write_text("\n".join(info[:20] + [error] + info[20:]) + "\n")
    assert _relevant_log_lines(log) == [error]
    log.write_text("\n".join(info) + "\n")          # no error line: the last lines say most
    assert _relevant_log_lines(log) == info[-MAX_LOG_LINES_SHOWN:]
    assert _relevant_log_lines(tmp_path / "missing.log") == []


def test_compare_tool_finds_the_http_engine_equal_to_the_local_one(server, reduced_onnx, capsys):
    assert run_tool(compare, "--engine", server["http"], "--engine", reduced_onnx, "--clips", 5) == 0
    assert server["http"] in capsys.readouterr().out


def test_engine_checks_the_served_model_against_the_contract_on_connect(server):
    with open_engine(server["grpc"]) as engine:
        assert engine.max_batch == SERVER_MAX_BATCH
        assert [spec.name for spec in engine.input_specs] == ["frames", "keypoints", "crop_size", "camera"]
        assert engine.embedding_dim == 3200
        with pytest.raises(KeyreidError, match="above this engine's maximum of 4"):
            engine.infer({name: np.zeros((5,) + spec.shape[1:], spec.dtype) for name, spec in
                          ((spec.name, spec) for spec in engine.input_specs)})


def test_concurrent_single_clip_requests_share_server_side_batches(server, reduced_onnx):
    with open_engine(reduced_onnx) as local:
        num_cameras = local.num_cameras
        feed = synthetic_feed(SERVER_MAX_BATCH, num_cameras, seed=3)
        expected = local.infer(feed)
    client = grpc_client.InferenceServerClient(server["grpc_server"])
    token = {"triton-grpc-protocol-triton-access-token": ACCESS_TOKEN}
    before = client.get_inference_statistics("keyreid", headers=token, as_json=True)["model_stats"][0]
    results = [None] * SERVER_MAX_BATCH
    with open_engine(server["grpc"], num_cameras=num_cameras) as engine:
        def request(index):
            results[index] = engine.infer({name: value[index:index + 1] for name, value in feed.items()})
        threads = [threading.Thread(target=request, args=(index,)) for index in range(SERVER_MAX_BATCH)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    after = client.get_inference_statistics("keyreid", headers=token, as_json=True)["model_stats"][0]
    inferences = int(after.get("inference_count", 0)) - int(before.get("inference_count", 0))
    executions = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
    assert inferences == SERVER_MAX_BATCH and executions < inferences      # the server batched them
    for index, result in enumerate(results):
        np.testing.assert_array_equal(result["embedding"][0], expected["embedding"][index])


def test_model_that_is_not_served_is_named_in_the_error(server):
    url = server["grpc"].replace("/keyreid", "/keyreid_v2")
    with pytest.raises(KeyreidError, match="model 'keyreid_v2' is not ready on the server"):
        open_engine(url, retries=0).activate()


def test_server_that_is_down_is_a_one_line_error_after_retries(tracklets, tmp_path, capsys):
    url = f"grpc://127.0.0.1:{free_port()}/keyreid"
    assert run_tool(infer, "--engine", url, "--tracklets", tracklets, "--output", tmp_path / "o.npz",
                    "--timeout", 5, "-q") == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "cannot be reached" in error and "after 4 attempt(s)" in error
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("url, reason", [
    ("grpc://127.0.0.1:8001", "not a Triton engine address"),
    ("grpc://127.0.0.1:8001/keyreid/v2", "model version 'v2' is not a whole number"),
    ("http://127.0.0.1:port/keyreid", "the port is not a number"),
])
def test_bad_server_addresses_are_rejected_before_connecting(url, reason):
    with pytest.raises(KeyreidError, match=reason):
        TritonLocation(url)


def test_local_engine_options_are_refused_for_a_triton_engine(tracklets, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:      # a usage error, before anything connects
        run_tool(infer, "--engine", "grpc://127.0.0.1:1/keyreid", "--tracklets", tracklets,
                 "--output", tmp_path / "o.npz", "--threads", 2)
    assert exited.value.code == 2
    assert "--threads is for the onnxruntime and openvino backends; grpc://127.0.0.1:1/keyreid runs on triton" \
        in capsys.readouterr().err


def test_triton_engine_and_server_modules_import_without_torch(server_environment):
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None          # any import of torch now fails
        import keyreid.runtime.backends.triton, keyreid.runtime.serve_triton
        {server_only}
        print("ok")
    """)
    python, keyreid_path = server_environment
    client = subprocess.run([sys.executable, "-c", script.format(server_only="")],
                            capture_output=True, text=True, timeout=120)
    assert client.returncode == 0 and client.stdout.strip() == "ok", client.stderr
    server_env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    server_env["PYTHONPATH"] = str(keyreid_path)
    # Run from the copy's folder: from the checkout, its keyreid/ folder (no runtime/ inside) would
    # shadow the installed package.
    server = subprocess.run([str(python), "-c", script.format(server_only="import pytriton.triton")],
                            capture_output=True, text=True, timeout=120, env=server_env, cwd=keyreid_path)
    assert server.returncode == 0 and server.stdout.strip() == "ok", server.stderr


def test_the_client_side_runs_numpy_2_and_the_server_its_own_environment(server_environment):
    """PyTriton's numpy < 2 pin stays in the server's environment; the tests run on numpy 2."""
    assert int(np.__version__.split(".")[0]) >= 2
    python, _ = server_environment
    probe = subprocess.run([str(python), "-c", "import numpy, pytriton, sys; print(sys.prefix)"],
                           capture_output=True, text=True, timeout=120, cwd=python.parent)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == python.parent.parent != Path(sys.prefix)
