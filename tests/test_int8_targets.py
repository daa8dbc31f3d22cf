"""int8 files made for a CPU class: exact where they run, explained where they do not fit.

The AVX2 recipe must be free of 16-bit saturation by construction (keyreid/int8_targets.py);
that is checked three ways: by arithmetic on the recipe, by an emulation of the kernel's pair
sums on the file's real codes (any CPU), and by running the real ONNX Runtime kernels as an
AVX2-only CPU sees them, under qemu (tests/test_emulated_cpu.py).
"""
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from keyreid.model_metadata import read_metadata
from keyreid.errors import KeyreidWarning
from keyreid.export.checkpoint import load_checkpoint, load_reference_model
from keyreid.export.int8_saturation import pair_sum_saturation, saturation_report
from keyreid.export.onnx_export import DEFAULT_OPSET, stamp_metadata, write_model_atomically
from keyreid.export.pipeline import ExportPipeline
from keyreid.export.precision import to_int8
from keyreid.export.to_onnx import main as to_onnx
from keyreid.export.verify import reference_results
from keyreid.int8_targets import (ACTIVATION_BITS_KEY, INT16_MAX, NARROW_ACTIVATION_MAX, RECIPES, TARGET_KEY,
                                  int8_cpu_mismatch, needs_exact_u8u8_path)
from keyreid.cpu_features import isa_of_class
from keyreid.runtime.backends.onnxruntime import EXACT_INT8_OPTION, OrtEngine
from keyreid.synthetic import MARS_CROP_SIZE, synthetic_feed
from keyreid.tolerances import TOLERANCES
from toy_engine_model import toy_metadata


def test_only_the_avx2_recipe_is_saturation_free_and_it_says_why():
    assert [target for target, recipe in RECIPES.items() if recipe.saturation_free] == ["avx2"]
    avx2 = RECIPES["avx2"]
    assert 2 * avx2.activation_max * avx2.weight_max <= INT16_MAX < 2 * 255 * avx2.weight_max
    assert (avx2.activation_bits, RECIPES["vnni"].activation_bits) == (7, 8)


def test_pair_sums_saturate_exactly_past_the_16_bit_range():
    weights = np.array([[127, 127, -128], [127, 1, -128]], np.int8)        # K=2, N=3
    full = np.array([[255, 255]], np.uint8)
    computed, saturated, largest = pair_sum_saturation(full, weights)
    assert (computed, saturated, largest) == (3, 2, 65280)                  # 64770 and -65280 clip
    narrow = np.array([[127, 127]], np.uint8)
    assert pair_sum_saturation(narrow, weights[:, :2])[1:] == (0, 32258)
    odd = np.array([[255, 255, 255]], np.uint8)                             # K=3: the last pairs with 0
    assert pair_sum_saturation(odd, np.full((3, 1), 127, np.int8)) == (2, 1, 64770)


@pytest.fixture(scope="module")
def int8_files(reduced_checkpoint, reduced_onnx, tmp_path_factory):
    """The reduced model's int8 file for each target, stamped as the export stamps it."""
    folder = tmp_path_factory.mktemp("int8_targets")
    checkpoint, fp32 = load_checkpoint(reduced_checkpoint), onnx.load(str(reduced_onnx))
    files = {}
    for target in ("avx2", "vnni"):
        model = to_int8(fp32, target)
        stamp_metadata(model, checkpoint, "max", "int8", DEFAULT_OPSET, target)
        files[target] = write_model_atomically(model, folder / f"reduced_int8_{target}.onnx")
    return files


@pytest.fixture(scope="module")
def clips():
    return synthetic_feed(3, 6, 7, crop_sizes=[MARS_CROP_SIZE])


def test_the_avx2_file_cannot_saturate_and_the_vnni_file_would(int8_files, clips):
    two_clips = {name: value[:2] for name, value in clips.items()}
    narrow = saturation_report(int8_files["avx2"], two_clips)
    full = saturation_report(int8_files["vnni"], two_clips)
    assert len(narrow) == len(full) > 20
    assert sum(row.saturated for row in narrow) == 0
    assert max(row.largest for row in narrow) <= 2 * NARROW_ACTIVATION_MAX * 127
    # the same products with full 8-bit codes clip on an AVX2-only CPU: the emulation can fail
    assert sum(row.saturated for row in full) > 0


def test_every_target_meets_the_int8_gate_on_this_cpu(int8_files, clips, reduced_checkpoint, small_residual_checkpoint,
                                                      tmp_path):
    """Two checkpoints (the small-residual one lets part weights move the embedding); part
    weights checked directly, since the embedding hides them (docs/contract.md §5)."""
    small_residual = load_checkpoint(small_residual_checkpoint)
    small_residual_export = ExportPipeline(small_residual, "max")      # traced once for both targets
    for checkpoint in (load_checkpoint(reduced_checkpoint), small_residual):
        reference = reference_results(load_reference_model(checkpoint), clips, "max")
        for target in ("avx2", "vnni"):
            if checkpoint is small_residual:
                path = write_model_atomically(small_residual_export.model("int8", target), tmp_path / f"{target}.onnx")
            else:
                path = int8_files[target]
            with OrtEngine(path) as engine:
                outputs = engine.infer(clips)
            a, b = outputs["embedding"].astype(np.float64), reference["embedding"].astype(np.float64)
            cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            gate = TOLERANCES["int8"]
            assert cosine.min() >= gate["embedding"].min_cosine, (checkpoint.path.name, target, cosine)
            assert np.abs(outputs["part_weights"] - reference["part_weights"]).max() <= gate["part_weights"].max_abs


def _exact_path_option(engine):
    """The session's EXACT_INT8_OPTION, or None where it was never set."""
    try:
        return engine._session.get_session_options().get_session_config_entry(EXACT_INT8_OPTION)
    except RuntimeError:    # onnxruntime: "SessionOptions does not have configuration with key"
        return None


def _open_recording_warnings(path, monkeypatch, cpu_class, times=2):
    """Open a fresh copy of ``path`` ``times`` times as a ``cpu_class`` CPU: (KeyreidWarnings,
    option per session). A fresh name, because a process warns once per file and message."""
    monkeypatch.setenv("KEYREID_CPU_CLASS", cpu_class)
    path = shutil.copy(path, Path(tempfile.mkdtemp()) / f"{cpu_class}_{path.name}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options = []
        for _ in range(times):
            with OrtEngine(path) as engine:
                options.append(_exact_path_option(engine))
    return [str(warning.message) for warning in caught if issubclass(warning.category, KeyreidWarning)], options


def test_a_vnni_file_on_an_avx2_cpu_warns_once_and_takes_the_exact_path(int8_files, monkeypatch):
    messages, options = _open_recording_warnings(int8_files["vnni"], monkeypatch, "avx2")
    assert len(messages) == 1 and "--target-cpu avx2" in messages[0] and "no VNNI" in messages[0]
    assert options == ["1", "1"]


def test_an_avx2_file_on_a_vnni_cpu_warns_once_and_stays_on_the_fast_path(int8_files, monkeypatch):
    messages, options = _open_recording_warnings(int8_files["avx2"], monkeypatch, "vnni")
    assert len(messages) == 1 and "--target-cpu vnni" in messages[0]
    assert options == [None, None]


@pytest.mark.parametrize("target, cpu_class", [("avx2", "avx2"), ("vnni", "vnni"), ("vnni", "amx")])
def test_a_file_on_the_cpu_it_suits_says_nothing(int8_files, monkeypatch, target, cpu_class):
    messages, options = _open_recording_warnings(int8_files[target], monkeypatch, cpu_class, times=1)
    assert messages == [] and options == [None]


def test_mismatch_rule_covers_int8_files_without_a_target_and_float_files():
    avx2 = isa_of_class("avx2")
    fp32 = read_metadata(toy_metadata(4, 6), "m.onnx")
    assert int8_cpu_mismatch(fp32, avx2, "m.onnx") is None
    no_target = fp32.replace(precision="int8")          # full 8-bit codes, target not recorded
    assert "made with 8-bit codes" in int8_cpu_mismatch(no_target, avx2, "m.onnx")
    assert needs_exact_u8u8_path(RECIPES["vnni"], avx2) and not needs_exact_u8u8_path(RECIPES["avx2"], avx2)
    assert not needs_exact_u8u8_path(RECIPES["vnni"], isa_of_class("vnni"))


def test_cli_records_the_target_and_refuses_it_for_float_files(reduced_checkpoint, tmp_path, capsys, caplog):
    output = tmp_path / "avx2.onnx"
    assert to_onnx([str(reduced_checkpoint), "-o", str(output), "--precision", "int8", "--target-cpu", "avx2",
                    "--quiet"]) == 0
    metadata = {entry.key: entry.value for entry in onnx.load(str(output)).metadata_props}
    assert (metadata[TARGET_KEY], metadata[ACTIVATION_BITS_KEY]) == ("avx2", "7")
    assert "for avx2 CPUs" in capsys.readouterr().out
    # ONNX Runtime's quantiser asks for a pre-processing our exported graphs do not need
    assert not [record for record in caplog.records if "pre-processing" in record.getMessage()]
    with pytest.raises(SystemExit) as exit_info:
        to_onnx([str(reduced_checkpoint), "-o", str(tmp_path / "f.onnx"), "--target-cpu", "avx2"])
    assert exit_info.value.code == 2
    assert "--target-cpu applies to --precision int8 only" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["avx2.onnx"]


def test_cli_on_a_cpu_without_vnni_makes_an_avx2_file_and_says_int8_gains_little(reduced_checkpoint, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.setenv("KEYREID_CPU_CLASS", "avx2")
    output = tmp_path / "auto.onnx"
    assert to_onnx([str(reduced_checkpoint), "-o", str(output), "--precision", "int8", "--quiet"]) == 0
    assert {entry.key: entry.value for entry in onnx.load(str(output)).metadata_props}[TARGET_KEY] == "avx2"
    assert "int8 gains little over fp32" in capsys.readouterr().out


def test_compare_checks_an_int8_file_at_the_int8_tolerances_by_default(int8_files, reduced_checkpoint, tmp_path,
                                                                         capsys):
    from keyreid.export.reference_outputs import main as write_reference
    from keyreid.runtime.compare import main as compare

    reference = tmp_path / "reference.npz"
    assert write_reference([str(reduced_checkpoint), "-o", str(reference), "--clips", "3", "-q"]) == 0
    assert compare(["--engine", str(int8_files["vnni"]), "--reference", str(reference)]) == 0
    printed = capsys.readouterr().out
    assert "tolerances: int8" in printed and "cosine >= 0.999 [ok]" in printed
    # an explicit flag still wins over the table
    assert compare(["--engine", str(int8_files["vnni"]), "--reference", str(reference), "--tolerance-rel", "1e-6"]) == 1
