"""Turn an fp32 KeyRe-ID ONNX file into an int8 OpenVINO IR (NNCF post-training quantisation).

    python export/to_openvino.py model.onnx [-o model_int8.xml] [--calibration-clips N]
                                 [--tracklets DIR] [--no-verify]

The IR (.xml and its .bin) is written into a temporary folder beside the output, checked by
running it in OpenVINO against the fp32 file (unless --no-verify), and only then renamed into
place. From Python: ``export_openvino_int8(onnx_path, output)``.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from keyreid.cli import Steps, positive_int, program_name, run_main
from keyreid.errors import KeyreidError
from keyreid.int8_targets import recipe_metadata
from keyreid.model_metadata import ModelMetadata, read_metadata
from keyreid.tolerances import describe_row
from keyreid.export.quiet_logs import quiet_third_party_logs
from keyreid.files import atomic_output_with_companions, check_distinct_outputs, check_writable
from keyreid.runtime.backends.formats import OPENVINO_SUFFIXES, OPENVINO_WEIGHTS_SUFFIX, model_kind

DESCRIPTION = """\
Quantise an fp32 KeyRe-ID ONNX file (made by to_onnx.py) to int8 for OpenVINO's CPU plugin,
written as an OpenVINO IR: the .xml and, beside it, the .bin of the same name. Run it with
open_engine("model_int8.xml") or --engine model_int8.xml. NNCF calibrates on synthetic clips
(realistic poses, varied crop sizes, every camera) or on your own tracklets (--tracklets).
The keypoint op, the patch embedding and the head stay f32 (export/openvino_int8.py)."""

EPILOG = f"""\
verification against the fp32 file, both in OpenVINO at f32, on sample clips
(keyreid/tolerances.py, row int8): {describe_row("int8")}

exit status: 0 written and verified; 1 bad input or failed verification (nothing written);
2 wrong command-line usage; 130 interrupted, 143 terminated (nothing written, no temporary file left)."""

# NNCF's codes are full 8-bit: exact where int8 sums are 32-bit (VNNI, AMX), like the ONNX
# Runtime vnni recipe (keyreid/int8_targets.py); the engine says so on a CPU without VNNI.
INT8_METADATA = {"precision": "int8", "int8_tool": "nncf", **recipe_metadata("vnni")}   # ModelMetadata fields


@dataclass(frozen=True)
class OpenVinoInt8Export:
    """What ``export_openvino_int8`` wrote and how it checked it."""
    xml_path: Path
    weights_path: Path
    metadata: ModelMetadata
    report: Optional[object]      # keyreid.comparator.ComparisonReport; None with verify=False


def default_output(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + "_int8" + OPENVINO_SUFFIXES[0])


def _check_paths(onnx_path: Path, output: Path) -> Path:
    if model_kind(onnx_path) != "onnx":
        raise KeyreidError(f"{onnx_path}: expected an fp32 .onnx file (made by to_onnx.py)")
    if not onnx_path.is_file():
        raise KeyreidError(f"{onnx_path}: does not exist")
    if model_kind(output) != "openvino":
        raise KeyreidError(f"--output {output}: an OpenVINO IR is named .xml (its .bin is written beside it)")
    weights = output.with_suffix(OPENVINO_WEIGHTS_SUFFIX)
    check_distinct_outputs({"--output": output, "its weights file": weights}, {"the input model": onnx_path})
    check_writable(output, "--output")
    check_writable(weights, "the weights file")
    return weights


def _int8_metadata(onnx_path: Path, entries: Mapping[str, str]) -> ModelMetadata:
    """The IR's metadata: the fp32 file's, marked int8 by NNCF."""
    metadata = read_metadata(entries, onnx_path)
    if metadata.precision != "fp32":
        raise KeyreidError(f"{onnx_path}: its metadata says precision {metadata.precision}; int8 for "
                           "OpenVINO is made from the fp32 file to_onnx.py writes")
    return metadata.replace(**INT8_METADATA)


def export_openvino_int8(onnx_path, output=None, *, calibration_clips: int = 16, tracklets=None,
                         verify: bool = True, verify_clips: int = 3,
                         step: Optional[Callable[[str], None]] = None) -> OpenVinoInt8Export:
    """Quantise ``onnx_path`` (fp32) into an int8 IR at ``output`` (default: ``<stem>_int8.xml``).

    Args:
        calibration_clips: clips NNCF collects activation ranges on.
        tracklets: a folder of the user's tracklets to calibrate on (runtime/inputs/tracklets.py layout);
            None: synthetic clips.
        verify: run the IR against the fp32 file before installing it; a failure raises
            KeyreidError and writes nothing.
        step: called with a sentence before each slow step (progress lines).
    """
    from keyreid.export.openvino_int8 import (DEFAULT_RECIPE, RECIPES, quantise, synthetic_calibration_clips,
                                              tracklet_calibration_clips)
    from keyreid.export.verify import verify_openvino_int8
    from keyreid.lazy import require
    from keyreid.runtime.backends import openvino_ir
    from keyreid.runtime.backends.openvino import read_openvino_model

    for name, value in (("calibration_clips", calibration_clips), ("verify_clips", verify_clips)):
        if value < 1:
            raise KeyreidError(f"{name} must be at least 1, got {value}")
    onnx_path = Path(onnx_path)
    output = Path(output) if output is not None else default_output(onnx_path)
    weights = _check_paths(onnx_path, output)
    step = step or (lambda message: None)
    ov = require("openvino", needed_for=("openvino", "writing an OpenVINO IR"))

    step(f"reading {onnx_path} into OpenVINO (ONNX functions inlined)")
    model, onnx_metadata = read_openvino_model(ov.Core(), onnx_path)
    metadata = _int8_metadata(onnx_path, onnx_metadata)
    num_cameras = metadata.num_cameras
    source = f"tracklets in {tracklets}" if tracklets is not None else "synthetic clips"
    step(f"preparing {calibration_clips} calibration clips ({source})")
    clips = (tracklet_calibration_clips(Path(tracklets), calibration_clips, num_cameras) if tracklets is not None
             else synthetic_calibration_clips(calibration_clips, num_cameras))
    step(f"quantising with NNCF (recipe {DEFAULT_RECIPE}, {len(clips)} clips)")
    int8 = quantise(model, clips, RECIPES[DEFAULT_RECIPE])
    del model
    metadata = metadata.replace(int8_recipe=DEFAULT_RECIPE, int8_calibration=f"{len(clips)} {source}")
    openvino_ir.write_metadata(int8, metadata.to_strings())
    report = None
    with atomic_output_with_companions(output, [OPENVINO_WEIGHTS_SUFFIX]) as staged:
        step(f"writing the IR {output.name} + {weights.name}")
        ov.save_model(int8, str(staged), compress_to_fp16=False)
        del int8
        if verify:
            step(f"verifying against {onnx_path.name} in OpenVINO f32 ({verify_clips} clips)")
            report = verify_openvino_int8(staged, onnx_path, num_cameras, verify_clips)
            if not report.passed:
                raise KeyreidError(f"the int8 IR failed verification ({'; '.join(report.failures())}); "
                                   "nothing was written. Re-run with --no-verify to keep it anyway")
    return OpenVinoInt8Export(output, weights, metadata, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("to_openvino.py"), description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="fp32 KeyRe-ID ONNX file (to_onnx.py)")
    parser.add_argument("-o", "--output", type=Path,
                        help="IR .xml to write, its .bin beside it (default: <model>_int8.xml)")
    parser.add_argument("--calibration-clips", type=positive_int, default=16, metavar="N",
                        help="clips to calibrate activation ranges on (default: 16)")
    parser.add_argument("--tracklets", type=Path, default=None, metavar="DIR",
                        help="calibrate on your own tracklets (the layout infer.py reads) instead of "
                             "synthetic clips")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against the fp32 file")
    parser.add_argument("--verify-clips", type=positive_int, default=3, metavar="N",
                        help="sample clips for the check (default: 3)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party_logs()
    if args.tracklets is not None and not args.tracklets.is_dir():
        raise KeyreidError(f"--tracklets {args.tracklets}: not a folder")
    steps = Steps(total=4 if args.no_verify else 5, quiet=args.quiet)
    result = export_openvino_int8(args.model, args.output, calibration_clips=args.calibration_clips,
                                  tracklets=args.tracklets, verify=not args.no_verify,
                                  verify_clips=args.verify_clips, step=steps)
    steps.done()
    if result.report is not None:
        print(result.report.table())
    size = (result.xml_path.stat().st_size + result.weights_path.stat().st_size) / 2 ** 20
    print(f"wrote {result.xml_path} and {result.weights_path.name} ({size:.1f} MiB, int8 by NNCF, "
          f"recipe {result.metadata.int8_recipe})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
