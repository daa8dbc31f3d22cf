"""KeypointPartPool: the torch op, the ONNX function, the CUDA kernel's host build and the public
entry against the NumPy reference (docs/contract.md §3), on realistic poses and on hand-made edge cases."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keyreid.contract import CLIP_FRAMES, HEATMAP_MODES, NUM_KEYPOINTS, NUM_PARTS, NUM_PATCHES
from keyreid.errors import KeyreidError
from keyreid.kernels import part_weights
from keyreid.kernels.body_parts import JOINT_GROUPS, KERNEL_SIGMA, MINMAX_EPS
from keyreid.kernels.reference import part_weights_reference, render_heatmaps_reference
from keyreid.synthetic import MARS_CROP_SIZE, realistic_keypoints

TOLERANCE = 1e-5
HEAD, TORSO, LEFT_ARM = 0, 1, 2
NOSE, LEFT_EYE, LEFT_ELBOW, LEFT_WRIST = 0, 1, 7, 9
THRESHOLD_F32 = np.float32(0.1)
JUST_BELOW_THRESHOLD_F32 = np.nextafter(THRESHOLD_F32, np.float32(0))


def clip_of(joints, crop=MARS_CROP_SIZE):
    """One clip of 4 identical frames: {joint index: (x, y, confidence)}, all others [0, 0, 0]."""
    keypoints = np.zeros((1, CLIP_FRAMES, NUM_KEYPOINTS, 3), dtype=np.float32)
    for joint, xyc in joints.items():
        keypoints[0, :, joint] = xyc
    crop_size = np.tile(np.asarray(crop, dtype=np.float32), (1, CLIP_FRAMES, 1))
    return keypoints, crop_size


def edge_case_clips():
    """Clips that each hit one rule of the op; the left arm of every clip has no valid joint."""
    clips = [
        clip_of({0: (60, 30, .9), 1: (62, 28, .8), 2: (58, 28, .8), 3: (65, 30, .6), 4: (55, 31, .7)}),
        clip_of({NOSE: (-0.5, 40, .9), 5: (-2.0, 80, .9), 6: (130.5, 80, .9), 11: (40, 257, .9)}),
        clip_of({NOSE: (30, 30, THRESHOLD_F32), LEFT_EYE: (90, 30, JUST_BELOW_THRESHOLD_F32)}),
        clip_of({NOSE: (np.nan, 30, .9), LEFT_EYE: (30, np.inf, .9), 5: (40, 80, np.nan), 6: (50, 90, .9)}),
        clip_of({NOSE: (-30, -30, .9), 5: (-12, 100, .9), 6: (140, 100, .9), 11: (64, 128, .9)}),
        clip_of({NOSE: (45, 40, .9), 5: (30, 100, .5), 12: (60, 200, .4)}, crop=(90, 300)),
        clip_of({NOSE: (45, 40, .9), 5: (30, 100, .5)}, crop=(0, 300)),
    ]
    return tuple(np.concatenate(parts) for parts in zip(*clips))


def torch_part_weights(keypoints, crop_size, mode):
    torch = pytest.importorskip("torch")
    from keyreid.kernels.torch_op import part_weights_torch
    with torch.no_grad():
        return part_weights_torch(torch.from_numpy(keypoints), torch.from_numpy(crop_size), mode).numpy()


def host_kernel_part_weights(keypoints, crop_size, mode):
    """The CUDA kernel's arithmetic, built for the CPU (tests/test_cuda_kernel.py has more)."""
    from keyreid.kernels.host_build import find_cxx, part_weights_host
    try:
        find_cxx()
    except KeyreidError as exc:
        pytest.skip(str(exc))
    return part_weights_host(keypoints, crop_size, mode)


IMPLEMENTATIONS = [part_weights_reference, torch_part_weights, host_kernel_part_weights]


@pytest.fixture(scope="module")
def realistic_clips():
    keypoints, crop_size = realistic_keypoints(np.random.default_rng(7), 6)
    edge_keypoints, edge_crop_size = edge_case_clips()
    return np.concatenate([keypoints, edge_keypoints]), np.concatenate([crop_size, edge_crop_size])


@pytest.fixture(scope="module")
def reference_weights(realistic_clips):
    return {mode: part_weights_reference(*realistic_clips, mode) for mode in HEATMAP_MODES}


# --- the synthetic poses really contain the hard cases --------------------------------------

def test_realistic_keypoints_contain_occluded_outside_and_clustered_joints():
    keypoints, crop_size = realistic_keypoints(np.random.default_rng(0), 64)
    x, y, confidence = np.moveaxis(keypoints, -1, 0)
    width, height = crop_size[..., 0:1], crop_size[..., 1:2]
    assert keypoints.shape == (64, CLIP_FRAMES, NUM_KEYPOINTS, 3) and keypoints.dtype == np.float32
    assert crop_size.shape == (64, CLIP_FRAMES, 2) and crop_size.dtype == np.float32
    assert np.any((confidence > 0) & (confidence <= 0.1))
    assert np.any(np.all(keypoints == 0, axis=-1))
    assert np.any((x < 0) & (confidence > 0.1)) and np.any((x >= width) & (confidence > 0.1))
    assert np.any((x > -1) & (x < 0) & (confidence > 0.1))
    head_spread = np.abs(x[..., 1:5] - x[..., :1]).max(axis=-1)
    head_detected = np.all(confidence[..., :5] > 0.1, axis=-1)
    assert np.median(head_spread[head_detected]) < 8
    assert len(np.unique(crop_size[:, 0], axis=0)) > 1
    assert any(np.any(np.all(keypoints[:, :, list(group)] == 0, axis=(1, 2, 3)))
               for group in JOINT_GROUPS)


# --- torch op == reference --------------------------------------------------------------------

@pytest.mark.parametrize("mode", HEATMAP_MODES)
def test_torch_op_matches_reference_on_realistic_poses(mode, realistic_clips, reference_weights):
    weights = torch_part_weights(*realistic_clips, mode)
    assert weights.shape == (len(realistic_clips[0]), NUM_PATCHES, NUM_PARTS)
    assert weights.dtype == np.float32
    error = np.abs(weights - reference_weights[mode]).max()
    print(f"max abs error torch vs reference, mode {mode}: {error:.3g}")
    assert error <= TOLERANCE


def test_modes_give_different_weights_on_the_same_poses(reference_weights):
    by_mode = reference_weights
    assert np.abs(by_mode["max"] - by_mode["mean"]).max() > 1e-2
    assert np.abs(by_mode["max"] - by_mode["blank"]).max() > 0.5
    assert np.abs(by_mode["mean"] - by_mode["blank"]).max() > 0.5


@pytest.mark.parametrize("mode", HEATMAP_MODES)
def test_group_without_valid_joint_weighs_minus_one(mode):
    keypoints, crop_size = edge_case_clips()
    for implementation in IMPLEMENTATIONS:
        weights = implementation(keypoints, crop_size, mode)
        assert np.all(weights[:, :, LEFT_ARM] == -1.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_blank_mode_weighs_minus_one_everywhere(implementation, realistic_clips):
    assert np.all(implementation(*realistic_clips, "blank") == -1.0)


# --- the rules of docs/contract.md §3, one at a time --------------------------------------------

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["max", "mean"])
def test_confidence_of_float32_point_one_counts_and_just_below_does_not(implementation, mode):
    counted = implementation(*clip_of({NOSE: (64, 128, THRESHOLD_F32)}), mode)
    ignored = implementation(*clip_of({NOSE: (64, 128, JUST_BELOW_THRESHOLD_F32)}), mode)
    assert counted[0, :, HEAD].max() > -1.0
    assert np.all(ignored == -1.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["max", "mean"])
def test_non_finite_keypoints_and_zero_crop_size_count_as_invisible(implementation, mode):
    visible = {LEFT_ELBOW: (30, 100, .9)}
    expected = implementation(*clip_of(visible), mode)
    for broken in [{NOSE: (np.nan, 40, .9)}, {NOSE: (40, np.inf, .9)}, {NOSE: (40, 40, np.nan)}]:
        weights = implementation(*clip_of({**visible, **broken}), mode)
        np.testing.assert_array_equal(weights, expected)
    zero_width = implementation(*clip_of(visible, crop=(0, 256)), mode)
    assert np.all(zero_width == -1.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["max", "mean"])
def test_x_just_left_of_zero_truncates_to_pixel_zero(implementation, mode):
    at_zero = implementation(*clip_of({NOSE: (0.0, 40, .9)}), mode)
    left_of_zero = implementation(*clip_of({NOSE: (-0.5, 40, .9)}), mode)
    assert at_zero[0, :, HEAD].max() > -1.0
    np.testing.assert_array_equal(left_of_zero, at_zero)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_max_mode_skips_a_joint_outside_the_frame_that_mean_mode_draws(implementation):
    just_right = clip_of({NOSE: (130.5, 40, .9)})      # pixel 130: outside, window reaches 119
    assert np.all(implementation(*just_right, "max") == -1.0)
    mean_weights = implementation(*just_right, "mean")
    assert mean_weights[0, 2 * 8 + 7, HEAD] > -1.0     # patch row 2, last column
    assert mean_weights[0, 2 * 8 + 6, HEAD] == -1.0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mean_mode_skips_windows_that_miss_the_frame(implementation):
    # Upstream's slices would wrap around for (-30, -30) and paint most of the frame.
    for joint in [(-30, -30, .9), (-12, 100, .9), (140, 100, .9), (64, 268, .9)]:
        assert np.all(implementation(*clip_of({NOSE: joint}), "mean") == -1.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_crop_keypoints_are_scaled_into_the_model_frame(implementation):
    in_model_frame = implementation(*clip_of({NOSE: (64, 128, .9)}), "max")
    in_other_crop = implementation(*clip_of({NOSE: (45, 150, .9)}, crop=(90, 300)), "max")
    np.testing.assert_array_equal(in_other_crop, in_model_frame)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_single_head_joint_at_a_patch_centre_weighs_its_patch_highest(implementation):
    row, col = 3, 4
    weights = implementation(*clip_of({NOSE: (col * 16 + 8, row * 16 + 8, .9)}), "max")[0]
    assert np.argmax(weights[:, HEAD]) == row * 8 + col
    # By hand: the patch covers offsets -8..7 around the joint in both axes.
    profile_mean = np.exp(-0.5 * (np.arange(-8, 8) / KERNEL_SIGMA) ** 2).mean()
    expected = 2 * profile_mean ** 2 / (1 + MINMAX_EPS) - 1
    assert weights[row * 8 + col, HEAD] == pytest.approx(expected, abs=TOLERANCE)
    assert np.all(np.delete(weights, HEAD, axis=1) == -1.0)


def test_mean_mode_averages_covering_windows_where_max_mode_takes_the_peak():
    # Elbow window covers x 49..71, wrist window 53..75, both on row 100.
    keypoints = clip_of({LEFT_ELBOW: (60, 100, .9), LEFT_WRIST: (64, 100, .9)})[0][0, 0]
    max_row = render_heatmaps_reference(keypoints, MARS_CROP_SIZE, "max")[LEFT_ARM, 100]
    mean_row = render_heatmaps_reference(keypoints, MARS_CROP_SIZE, "mean")[LEFT_ARM, 100]
    g = np.exp(-0.5 * (np.arange(-11, 12) / KERNEL_SIGMA) ** 2)     # g[11 + n] = g(n)
    kernel_sum = g.sum() ** 2
    assert max_row[60] == 1.0 and max_row[62] == pytest.approx(g[11 + 2], abs=1e-12)
    assert mean_row[60] == pytest.approx((1 + g[11 + 4]) / 2 / kernel_sum, abs=1e-12)
    assert mean_row[50] == pytest.approx(g[11 - 10] / kernel_sum, abs=1e-12)   # elbow alone
    assert mean_row[48] == 0.0 and mean_row[76] == 0.0


# --- the public entry ---------------------------------------------------------------------------

def test_part_weights_entry_matches_reference(realistic_clips, reference_weights):
    weights = part_weights(*realistic_clips, mode="mean")
    assert weights.dtype == np.float32
    assert np.abs(weights - reference_weights["mean"]).max() <= TOLERANCE


@pytest.mark.parametrize("keypoints_shape, crop_shape", [
    ((2, 4, 17, 2), (2, 4, 2)),
    ((2, 3, 17, 3), (2, 3, 2)),
    ((4, 17, 3), (4, 2)),
    ((2, 4, 17, 3), (3, 4, 2)),
    ((2, 4, 17, 3), (2, 4)),
])
def test_part_weights_entry_rejects_wrong_shapes(keypoints_shape, crop_shape):
    with pytest.raises(KeyreidError, match="must have shape"):
        part_weights(np.zeros(keypoints_shape), np.ones(crop_shape))


def test_part_weights_entry_rejects_unknown_mode():
    with pytest.raises(KeyreidError, match="unknown heatmap mode 'sum'"):
        part_weights(*clip_of({}), mode="sum")


def test_part_weights_entry_falls_back_to_reference_without_torch(tmp_path, realistic_clips):
    np.save(tmp_path / "keypoints.npy", realistic_clips[0])
    np.save(tmp_path / "crop_size.npy", realistic_clips[1])
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None          # import torch now raises ImportError
        import numpy as np
        import keyreid.kernels as kernels
        folder = {str(tmp_path)!r}
        weights = kernels.part_weights(np.load(folder + "/keypoints.npy"),
                                       np.load(folder + "/crop_size.npy"), mode="max")
        np.save(folder + "/weights.npy", weights)
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    expected = part_weights_reference(*realistic_clips, "max")
    np.testing.assert_array_equal(np.load(tmp_path / "weights.npy"), expected)


def test_importing_kernels_does_not_import_torch():
    script = "import sys, keyreid.kernels; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", script], check=True)


# --- devices --------------------------------------------------------------------------------

def test_torch_op_on_cuda_matches_reference(realistic_clips, reference_weights):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from keyreid.kernels.torch_op import part_weights_torch
    keypoints, crop_size = (torch.from_numpy(array).cuda() for array in realistic_clips)
    for mode in HEATMAP_MODES:
        weights = part_weights_torch(keypoints, crop_size, mode).cpu().numpy()
        assert np.abs(weights - reference_weights[mode]).max() <= TOLERANCE


# --- the ONNX function ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def part_pool_models():
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from keyreid.kernels.onnx_function import make_part_pool_model
    return {mode: make_part_pool_model(mode) for mode in HEATMAP_MODES}


@pytest.mark.parametrize("mode", HEATMAP_MODES)
def test_part_pool_model_passes_full_onnx_check(mode, part_pool_models):
    onnx = pytest.importorskip("onnx")
    model = part_pool_models[mode]
    onnx.checker.check_model(model, full_check=True)
    (node,) = model.graph.node
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.domain, node.op_type) == ("keyreid", "KeypointPartPool")
    assert attributes == {"mode": mode.encode(), "plugin_namespace": b"keyreid", "plugin_version": b"1"}


@pytest.mark.parametrize("mode", HEATMAP_MODES)
def test_part_weight_function_uses_only_standard_ops(mode, part_pool_models):
    (function,) = part_pool_models[mode].functions
    assert (function.domain, function.name) == ("keyreid", "KeypointPartPool")
    assert list(function.input) == ["keypoints", "crop_size"]
    assert list(function.output) == ["part_weights"]
    assert "mode" in function.attribute
    assert {(o.domain, o.version) for o in function.opset_import} == {("", 18)}
    assert {node.domain for node in function.node} <= {"", "ai.onnx"}


@pytest.mark.parametrize("mode", HEATMAP_MODES)
def test_part_pool_model_runs_in_onnxruntime_like_the_reference(mode, part_pool_models,
                                                                realistic_clips, reference_weights):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(part_pool_models[mode].SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    keypoints, crop_size = realistic_clips
    for clips in (slice(0, 1), slice(3, 8)):
        (weights,) = session.run(None, {"keypoints": keypoints[clips], "crop_size": crop_size[clips]})
        assert weights.shape == (clips.stop - clips.start, NUM_PATCHES, NUM_PARTS)
        assert np.abs(weights - reference_weights[mode][clips]).max() <= TOLERANCE


def test_part_weight_function_rejects_opset_below_18():
    pytest.importorskip("onnx")
    from keyreid.kernels.onnx_function import part_weight_function
    with pytest.raises(KeyreidError, match="opset 18"):
        part_weight_function("max", 17)
