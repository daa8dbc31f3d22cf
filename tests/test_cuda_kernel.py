"""The fused CUDA KeypointPartPool kernel on machines without a GPU: its arithmetic (the header
built for the CPU) against the NumPy reference, its build for every GPU architecture, its
launch geometry and PTX; and, where a CUDA device exists, the torch op's dispatch to it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keyreid.contract import (CLIP_FRAMES, HEATMAP_MODES, NUM_KEYPOINTS, NUM_PARTS, NUM_PATCHES,
                              PATCH_COLS, PATCH_SIZE)
from keyreid.errors import KeyreidError
from keyreid.kernels import body_parts, cuda_build, cuda_compilers, cuda_fatbin
from keyreid.kernels.reference import part_weights_reference
from keyreid.synthetic import realistic_keypoints
from test_part_weights import edge_case_clips

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
# The architectures the issue asks for: Turing, Ampere, Jetson Orin, Ada, Hopper, Blackwell,
# Jetson Thor, Blackwell desktop.
REQUIRED_ARCHITECTURES = {"sm_75", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_110", "sm_120"}


@pytest.fixture(scope="module")
def host_build():
    from keyreid.kernels import host_build
    try:
        host_build.host_library()
    except KeyreidError as exc:
        pytest.skip(f"no host C++ compiler for the kernel's arithmetic: {exc}")
    return host_build


@pytest.fixture(scope="module", params=[(3, None), (11, [(128, 256)]), (29, [(64, 128), (200, 90)])],
                ids=["mixed-crops", "mars-crops", "small-and-wide-crops"])
def clips(request):
    """Realistic poses of one seed and crop mix, plus the hand-made edge cases (NaN and inf
    joints, the 0.1 boundary, joints outside the crop, zero crop size, empty groups)."""
    seed, crop_sizes = request.param
    keypoints, crop_size = realistic_keypoints(np.random.default_rng(seed), 8, crop_sizes)
    edge_keypoints, edge_crop_size = edge_case_clips()
    keypoints, crop_size = np.concatenate([keypoints, edge_keypoints]), np.concatenate([crop_size, edge_crop_size])
    return keypoints, crop_size, {mode: part_weights_reference(keypoints, crop_size, mode) for mode in HEATMAP_MODES}


# --- the arithmetic, on the CPU -------------------------------------------------------------------

@pytest.mark.parametrize("mode", HEATMAP_MODES)
def test_host_build_of_kernel_matches_reference_on_realistic_poses(mode, clips, host_build):
    keypoints, crop_size, reference = clips
    weights = host_build.part_weights_host(keypoints, crop_size, mode)
    assert weights.shape == (len(keypoints), NUM_PATCHES, NUM_PARTS) and weights.dtype == np.float32
    assert not np.isnan(weights).any(), "an element of part_weights was never written"
    error = np.abs(weights - reference[mode]).max()
    print(f"max abs error kernel host build vs reference, mode {mode}: {error:.3g}")
    assert error <= TOLERANCE


def test_host_build_draws_the_poses_it_is_checked_on(clips):
    """The comparison above means something only if the poses light up many patches."""
    reference = clips[2]
    for mode in ("max", "mean"):
        assert np.mean(reference[mode] > -0.99) > 0.05


def test_host_build_weights_one_clip_the_same_alone_or_in_a_batch(clips, host_build):
    keypoints, crop_size, _ = clips
    batch = host_build.part_weights_host(keypoints, crop_size, "max")
    alone = host_build.part_weights_host(keypoints[3:4], crop_size[3:4], "max")
    np.testing.assert_array_equal(alone[0], batch[3])


def test_host_build_rejects_a_wrong_shape(host_build):
    with pytest.raises(KeyreidError, match=r"\[N, 4, 17, 3\]"):
        host_build.part_weights_host(np.zeros((2, 4, 17, 2)), np.ones((2, 4, 2)), "max")


# --- the header says what the Python side says -----------------------------------------------------

def test_header_constants_match_body_parts_contract_and_cuda_build(host_build):
    expected = {
        "CLIP_FRAMES": CLIP_FRAMES, "NUM_KEYPOINTS": NUM_KEYPOINTS, "NUM_PARTS": NUM_PARTS,
        "RENDER_HEIGHT": body_parts.RENDER_HEIGHT, "RENDER_WIDTH": body_parts.RENDER_WIDTH,
        "PATCH_SIZE": PATCH_SIZE, "PATCH_COLS": PATCH_COLS, "NUM_PATCHES": NUM_PATCHES,
        "KERNEL_RADIUS": body_parts.KERNEL_RADIUS, "KERNEL_SIZE": body_parts.KERNEL_SIZE,
        "KERNEL_SIGMA": body_parts.KERNEL_SIGMA,
        "MIN_CONFIDENCE": float(body_parts.MIN_VISIBLE_CONFIDENCE_F32),
        "MINMAX_EPS": float(np.float32(body_parts.MINMAX_EPS)),
        "BLOCKS_PER_CLIP": cuda_build.BLOCKS_PER_CLIP, "THREADS_PER_BLOCK": cuda_build.THREADS_PER_BLOCK,
        "DYNAMIC_SHARED_BYTES": cuda_build.DYNAMIC_SHARED_BYTES,
        **{f"MODE_{mode.upper()}": index for mode, index in cuda_build.MODE_INDEX.items()},
    }
    assert {name: host_build.header_constant(name) for name in expected} == expected


def test_header_joint_groups_match_body_parts(host_build):
    groups = tuple(tuple(joint for slot in range(body_parts.MAX_JOINTS_PER_GROUP)
                         if (joint := host_build.header_group_joint(part, slot)) >= 0)
                   for part in range(NUM_PARTS))
    assert groups == body_parts.JOINT_GROUPS


# --- launch geometry and sources (the interface the TensorRT plugin codes against) ----------------

def test_launch_config_is_linear_in_clips():
    for clips in (1, 7, 256):
        grid, block, shared = cuda_build.launch_config(clips)
        assert grid == (clips * cuda_build.BLOCKS_PER_CLIP, 1, 1)
        assert block == (cuda_build.THREADS_PER_BLOCK, 1, 1) and shared == cuda_build.DYNAMIC_SHARED_BYTES
    assert cuda_build.THREADS_PER_BLOCK <= 1024 and cuda_build.THREADS_PER_BLOCK % 32 == 0
    with pytest.raises(KeyreidError, match="at least one clip"):
        cuda_build.launch_config(0)


def test_one_entry_point_per_mode_in_the_self_contained_source():
    source = cuda_build.kernel_source()
    assert '#include "' not in source
    for mode in HEATMAP_MODES:
        assert f"KRP_ENTRY({cuda_build.kernel_name(mode)}, KRP_MODE_{mode.upper()})" in source
    with pytest.raises(KeyreidError, match="unknown heatmap mode"):
        cuda_build.kernel_name("sum")
    assert len(cuda_build.source_hash()) == 16


def test_cuda_build_and_driver_modules_import_without_torch_or_cuda():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['cuda'] = None; "
            "import keyreid.kernels.cuda_build, keyreid.kernels.cuda_driver, keyreid.kernels.host_build; "
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- compilers ------------------------------------------------------------------------------------

needs_nvcc = pytest.mark.skipif(cuda_compilers.find_nvcc() is None, reason="nvcc is not installed")


@needs_nvcc
def test_kernel_compiles_for_every_architecture_without_spills(tmp_path):
    resources = cuda_fatbin.build_fatbin(tmp_path / "keypoint_part_pool.fatbin")
    print(cuda_fatbin.resource_table(resources))
    built = {(item.arch, item.function) for item in resources}
    expected = {(arch, cuda_build.kernel_name(mode)) for arch in REQUIRED_ARCHITECTURES for mode in HEATMAP_MODES}
    assert expected <= built, f"missing from ptxas's report: {sorted(expected - built)}"
    assert [item for item in resources if item.spill_stores or item.spill_loads] == []
    assert (tmp_path / "keypoint_part_pool.fatbin").stat().st_size > 0


def test_architecture_list_is_the_one_the_issue_asks_for():
    assert {f"sm_{major}{minor}" for major, minor in cuda_fatbin.ARCHITECTURES} == REQUIRED_ARCHITECTURES


def _nvrtc_or_skip():
    if cuda_compilers.load_nvrtc() is None:
        pytest.skip("NVRTC (cuda-python and libnvrtc) is not installed")


@pytest.mark.parametrize("compiler", ["nvcc", "nvrtc"])
def test_compile_ptx_targets_the_device_and_is_cached(compiler, tmp_path, monkeypatch):
    if compiler == "nvcc" and cuda_compilers.find_nvcc() is None:
        pytest.skip("nvcc is not installed")
    if compiler == "nvrtc":
        _nvrtc_or_skip()
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    ptx = cuda_build.compile_ptx((8, 7), compiler=compiler)          # Jetson Orin
    assert ".target sm_87" in ptx
    for mode in HEATMAP_MODES:
        assert f".entry {cuda_build.kernel_name(mode)}(" in ptx
    cached = list(tmp_path.glob("keypoint_part_pool-*-compute_87-*.ptx"))
    assert len(cached) == 1 and cached[0].read_text() == ptx
    assert cuda_build.compile_ptx((8, 7), compiler=compiler) == ptx


def test_compile_ptx_for_a_device_newer_than_the_compiler_targets_its_newest_architecture():
    assert cuda_build._best_arch([75, 80, 86, 87, 89, 90], 12, 0) == 90
    assert cuda_build._best_arch([75, 80, 86, 87, 89, 90], 8, 6) == 86
    with pytest.raises(KeyreidError, match="supports none"):
        cuda_build._best_arch([80, 90], 7, 5)


def test_compile_ptx_without_any_compiler_says_what_to_install(monkeypatch):
    # Fault injection: this machine's compilers made invisible to otherwise real code.
    monkeypatch.setattr(cuda_compilers, "load_nvrtc", lambda: None)
    monkeypatch.setattr(cuda_compilers, "find_nvcc", lambda: None)
    with pytest.raises(KeyreidError, match="install NVRTC .* install the CUDA toolkit"):
        cuda_build.compile_ptx((9, 0))


def _refuse_first_image(loaded):
    """A module load that fails the first time as a driver older than the PTX does, and
    afterwards returns the image it was given: the fault injected into load_kernel_image."""
    from keyreid.kernels.cuda_driver import UNSUPPORTED_PTX_VERSION, CudaDriverError

    def load(image):
        loaded.append(image)
        if len(loaded) == 1:
            raise CudaDriverError(UNSUPPORTED_PTX_VERSION, f"CUDA driver error {UNSUPPORTED_PTX_VERSION}")
        return image
    return load


@needs_nvcc
def test_driver_refusing_the_ptx_as_too_new_loads_an_nvcc_cubin_instead(tmp_path, monkeypatch):
    from keyreid.kernels.cuda_driver import load_kernel_image
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    loaded = []
    module, image = load_kernel_image((8, 7), _refuse_first_image(loaded))
    assert len(loaded) == 2 and b".target sm_87" in loaded[0], "the preferred PTX was not tried first"
    assert image.kind == "cubin" and image.compiler.startswith("nvcc") and module == image.data
    assert image.data.startswith(b"\x7fELF")
    for mode in HEATMAP_MODES:
        assert cuda_build.kernel_name(mode).encode() in image.data
    assert len(list(tmp_path.glob("keypoint_part_pool-*-sm_87-nvcc*.cubin"))) == 1


@needs_nvcc
def test_driver_refusing_the_ptx_for_a_device_nvcc_cannot_build_cubins_for_loads_nvcc_ptx(tmp_path, monkeypatch):
    from keyreid.kernels.cuda_driver import load_kernel_image
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cuda_compilers, "nvcc_codes", lambda: [75])     # fault: an nvcc without sm_87
    loaded = []
    _, image = load_kernel_image((8, 7), _refuse_first_image(loaded))
    assert (image.kind, image.compiler[:4]) == ("ptx", "nvcc") and b".target sm_87" in image.data


def test_other_driver_errors_on_loading_are_not_retried(tmp_path, monkeypatch):
    from keyreid.kernels.cuda_driver import CudaDriverError, load_kernel_image
    if cuda_compilers.load_nvrtc() is None and cuda_compilers.find_nvcc() is None:
        pytest.skip("no CUDA compiler")
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    loaded = []

    def load(image):
        loaded.append(image)
        raise CudaDriverError("CUDA_ERROR_OUT_OF_MEMORY", "CUDA driver error CUDA_ERROR_OUT_OF_MEMORY")
    with pytest.raises(CudaDriverError, match="OUT_OF_MEMORY"):
        load_kernel_image((8, 7), load)
    assert len(loaded) == 1


def test_driver_refusing_the_ptx_without_nvcc_names_the_driver_and_the_compiler(tmp_path, monkeypatch):
    from keyreid.kernels.cuda_driver import load_kernel_image
    _nvrtc_or_skip()                                             # NVRTC's PTX is refused, then
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cuda_compilers, "find_nvcc", lambda: None)   # fault: there is no nvcc
    with pytest.raises(KeyreidError, match=r"cannot load PTX ISA [\d.]+ from \w+.*no other compiler"):
        load_kernel_image((8, 7), _refuse_first_image([]))


def test_compile_ptx_rejects_a_malformed_compute_capability():
    with pytest.raises(KeyreidError, match=r"\(major, minor\)"):
        cuda_build.compile_ptx("sm_90")


# --- torch dispatch -------------------------------------------------------------------------------

def test_torch_op_has_a_cuda_implementation_registered():
    torch = pytest.importorskip("torch")
    import keyreid.kernels.graph_op  # noqa: F401  (registers the op)
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has_kernel("keyreid::keypoint_part_pool", "CUDA")


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_torch_op_returns_float32_for_other_keypoint_dtypes_in_eager_and_fake_mode(dtype):
    """The CUDA kernel always writes float32, so the CPU op and the fake that torch.compile and
    torch.export trace with must say float32 too (opcheck compares the fake with the real op)."""
    torch = pytest.importorskip("torch")
    import keyreid.kernels.graph_op  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode
    keypoints, crop_size = realistic_keypoints(np.random.default_rng(5), 2)
    keypoints = torch.from_numpy(keypoints).to(getattr(torch, dtype))
    crop_size = torch.from_numpy(crop_size).to(getattr(torch, dtype))
    op = torch.ops.keyreid.keypoint_part_pool.default
    assert op(keypoints, crop_size, "max").dtype == torch.float32
    with FakeTensorMode() as fake_mode:
        fake = op(fake_mode.from_tensor(keypoints), fake_mode.from_tensor(crop_size), "max")
    assert fake.dtype == torch.float32 and tuple(fake.shape) == (2, NUM_PATCHES, NUM_PARTS)
    torch.library.opcheck(op, (keypoints, crop_size, "mean"),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_op_on_cuda_runs_the_fused_kernel(clips):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import keyreid.kernels.graph_op  # noqa: F401
    from keyreid.kernels.cuda_driver import fused_kernel
    from keyreid.kernels.cuda_op import fused_kernel_unavailable
    try:
        fused_kernel(torch.cuda.current_device())
    except KeyreidError as exc:
        if "install" not in str(exc):
            raise
        pytest.skip(f"the fused kernel cannot be built here: {exc}")
    keypoints, crop_size, reference = clips
    keypoints, crop_size = torch.from_numpy(keypoints).cuda(), torch.from_numpy(crop_size).cuda()
    for mode in HEATMAP_MODES:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            weights = torch.ops.keyreid.keypoint_part_pool(keypoints, crop_size, mode)
            torch.cuda.synchronize()
        assert fused_kernel_unavailable(keypoints.device.index or 0) == ""
        assert cuda_build.kernel_name(mode) in {event.name for event in profile.events()}
        assert np.abs(weights.cpu().numpy() - reference[mode]).max() <= TOLERANCE
        again = torch.ops.keyreid.keypoint_part_pool(keypoints, crop_size, mode)
        assert torch.equal(weights, again), "two launches on the same input differ"


def _run_gpu_check(*arguments, out=None):
    env = {name: value for name, value in os.environ.items() if name != "OUT"}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *arguments],
                          capture_output=True, text=True, timeout=300, env=env)


def _no_gpu_or_skip():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: run benchmarks/gpu_check.py itself")


def test_gpu_check_without_a_gpu_skips_each_gpu_part_with_a_line_and_fails():
    _no_gpu_or_skip()
    result = _run_gpu_check("--no-models")
    assert result.returncode == 1
    assert result.stdout.startswith("device: no CUDA GPU;") and "NVRTC " in result.stdout
    for part in ("kernel check", "kernel speed", "memcheck", "CUDA graph", "torch.compile"):
        assert f"skipped {part}: needs a CUDA GPU" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "GPU" in lines[0], result.stderr


def test_gpu_check_without_a_gpu_writes_its_results_and_figures_to_out(tmp_path):
    """The reduced models run on the CPU, their agreement checked as on a GPU; RESULTS.md (the
    repository's, with this run's section) and the JSON land in $OUT, and the repository's
    RESULTS.md is left alone when no GPU measured anything."""
    _no_gpu_or_skip()
    results_before = (REPO / "benchmarks" / "RESULTS.md").read_bytes()
    result = _run_gpu_check("--reduced", "--model-repeats", "1", "--model-batches", "1", "--mode-batch", "1",
                            out=tmp_path)
    assert result.returncode == 1 and "GPU parts were skipped" in result.stderr, result.stderr
    assert (REPO / "benchmarks" / "RESULTS.md").read_bytes() == results_before
    written = (tmp_path / "RESULTS.md").read_text()
    assert written.startswith(results_before.decode().rstrip("\n"))
    assert "### Models on CPU, every heatmap mode" in written and "- skipped memcheck: needs a CUDA GPU" in written
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures["failures"] == [] and set(figures["figures"]["models"]["modes"]) == set(HEATMAP_MODES)
    assert figures["figures"]["versions"]["nvrtc"] and "models" in figures["part_seconds"]
    agreement = figures["figures"]["models"]["modes"]["mean"]["agreement"]
    assert agreement["deploy fp32 vs reference fp32"]["max_relative"] <= 1e-4
    assert sorted(path.name for path in tmp_path.iterdir()) == ["RESULTS.md", "gpu_check.json"]


def test_gpu_check_reads_compute_sanitizer_outcomes():
    from keyreid.benchmarks.gpu_check import read_memcheck
    assert read_memcheck(0, "launched each mode once\n========= ERROR SUMMARY: 0 errors\n")["status"] == "clean"
    errors = read_memcheck(1, "========= Invalid __global__ read of size 4\n========= ERROR SUMMARY: 3 errors\n")
    assert (errors["status"], errors["errors"]) == ("errors", 3)
    assert read_memcheck(1, "========= Error: Device not supported\n")["status"] == "refused"
    assert read_memcheck(1, "Traceback ...\nKeyreidError: boom\n")["status"] == "not run"


def test_gpu_check_figures_stay_json_even_with_a_failed_checks_infinite_error():
    from keyreid.benchmarks.gpu_check import json_safe
    safe = json_safe({"rows": [{"error": float("inf"), "clips": np.int64(8)}], 1: (np.float32(0.5),)})
    assert json.loads(json.dumps(safe, allow_nan=False)) == {"rows": [{"error": "inf", "clips": 8}], "1": [0.5]}


def test_fused_kernel_without_cuda_python_names_the_extra_to_install():
    code = ("import sys; sys.modules['cuda'] = None\n"
            "from keyreid.errors import KeyreidError\n"
            "from keyreid.kernels.cuda_driver import FusedKernel\n"
            "try:\n    FusedKernel(0)\nexcept KeyreidError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'pip install "keyreid[gpu]"' in result.stdout


def test_fused_kernel_without_a_gpu_driver_says_so():
    pytest.importorskip("cuda.bindings.driver")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    from keyreid.kernels.cuda_driver import FusedKernel
    with pytest.raises(KeyreidError, match="CUDA driver"):
        FusedKernel(0)


@needs_nvcc
def test_c_launcher_rejects_bad_arguments_without_touching_the_gpu(tmp_path):
    import ctypes
    library = ctypes.CDLL(str(cuda_fatbin.build_shared_library(tmp_path / "libkeypoint_part_pool.so",
                                                              architectures=[(7, 5)])))
    launch = library.keypoint_part_pool_launch
    launch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_void_p]
    launch.restype = ctypes.c_int
    success, invalid_value = 0, 1          # cudaSuccess, cudaErrorInvalidValue
    assert launch(cuda_build.MODE_INDEX["max"], None, None, None, 0, None) == success   # nothing to do
    assert launch(cuda_build.MODE_INDEX["max"], None, None, None, -1, None) == invalid_value
    assert launch(3, None, None, None, 1, None) == invalid_value
    assert launch(cuda_build.MODE_INDEX["mean"], None, None, None, 2 ** 31 - 1, None) == invalid_value
