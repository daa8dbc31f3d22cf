"""Accuracy of the NNCF int8 recipes for OpenVINO (export/openvino_int8.py) on random checkpoints.

    python benchmarks/openvino_int8_accuracy.py                        # ViT-B, seeds 0-2, every recipe
    python benchmarks/openvino_int8_accuracy.py --reduced --recipes f32-op-patch-head-no-sq
    python benchmarks/openvino_int8_accuracy.py --keep-ir DIR          # also write each default IR

For each checkpoint (the (seed, residual scale) cases of benchmarks/int8_accuracy.py) it exports
the fp32 ONNX file, quantises it with every recipe on the same calibration clips, and runs the
int8 model and the fp32 file in OpenVINO f32 on the same sample clips as the reference model.
Reported per recipe: the lowest per-clip embedding cosine against the reference and against
OpenVINO f32, the largest |part_weights| difference against OpenVINO f32 (bars: the int8 row of
keyreid/tolerances.py) and the seconds NNCF took. Temporary files go to a temporary folder.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from keyreid.cli import positive_int, run_main
from keyreid.cpu_features import cpu_isa
from keyreid.export.quiet_logs import quiet_third_party_logs

HERE = Path(__file__).resolve().parent

from keyreid.benchmarks.int8_accuracy import VIT_B_CASES, cosine_per_clip

MEASURED_CASES = VIT_B_CASES[:3]


def measure_case(config_name: str, seed: int, residual_scale: float, recipes, workdir: Path, clips: int,
                 calibration_clips: int, keep_ir: Path = None) -> list:
    import openvino as ov
    from keyreid.export.checkpoint import load_checkpoint, load_reference_model
    from keyreid.export.config import REDUCED, VIT_B
    from keyreid.export.onnx_export import write_model_atomically
    from keyreid.export.pipeline import export_model
    from keyreid.export.to_openvino import INT8_METADATA
    from keyreid.model_metadata import read_metadata
    from keyreid.export.openvino_int8 import DEFAULT_RECIPE, RECIPES, quantise, synthetic_calibration_clips
    from keyreid.export.random_checkpoint import write_random_checkpoint
    from keyreid.export.verify import reference_results
    from keyreid.runtime.backends import openvino_ir
    from keyreid.runtime.backends.openvino import read_openvino_model
    from keyreid.synthetic import MARS_CROP_SIZE, synthetic_feed

    config = VIT_B if config_name == "vit_b" else REDUCED
    path = write_random_checkpoint(workdir / f"{config_name}_{seed}_{residual_scale:g}.pth", config, seed=seed,
                                   residual_scale=residual_scale)
    checkpoint = load_checkpoint(path)
    feed = synthetic_feed(clips, config.num_cameras, seed, crop_sizes=[MARS_CROP_SIZE])
    reference = reference_results(load_reference_model(checkpoint), feed, "max")
    fp32 = export_model(checkpoint, "max", "fp32")
    onnx_path = write_model_atomically(fp32, workdir / f"{path.stem}.onnx")
    del fp32
    core = ov.Core()
    model, metadata = read_openvino_model(core, onnx_path)

    def run(candidate):
        compiled = core.compile_model(candidate, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        results = compiled.create_infer_request().infer(feed, share_outputs=False)
        return {port.get_any_name(): value for port, value in results.items()}

    f32 = run(model)
    calibration = synthetic_calibration_clips(calibration_clips, config.num_cameras)
    rows = []
    for name in recipes:
        start = time.perf_counter()
        int8 = quantise(model, calibration, RECIPES[name])
        seconds = time.perf_counter() - start
        outputs = run(int8)
        if keep_ir is not None and name == DEFAULT_RECIPE:
            int8_metadata = read_metadata(metadata, onnx_path).replace(**INT8_METADATA, int8_recipe=name)
            openvino_ir.write_metadata(int8, int8_metadata.to_strings())
            ov.save_model(int8, str(keep_ir / f"{path.stem}_int8.xml"), compress_to_fp16=False)
        del int8
        rows.append({"model": config_name, "seed": seed, "residual_scale": residual_scale, "recipe": name,
                     "cosine_vs_reference": float(cosine_per_clip(outputs["embedding"], reference["embedding"]).min()),
                     "cosine_vs_openvino_f32": float(cosine_per_clip(outputs["embedding"], f32["embedding"]).min()),
                     "part_weights_max_diff": float(np.abs(outputs["part_weights"] - f32["part_weights"]).max()),
                     "quantise_s": seconds})
        print(table(rows[-1:], header=False), flush=True)
    path.unlink()
    onnx_path.unlink()
    return rows


def table(rows, header: bool = True) -> str:
    lines = [f"{'model':<8}{'seed':>5}{'scale':>7}  {'recipe':<26}{'cos vs ref':>12}{'cos vs f32':>12}"
             f"{'|dW| max':>10}{'NNCF s':>8}"] if header else []
    for row in rows:
        lines.append(f"{row['model']:<8}{row['seed']:>5}{row['residual_scale']:>7g}  {row['recipe']:<26}"
                     f"{row['cosine_vs_reference']:>12.6f}{row['cosine_vs_openvino_f32']:>12.6f}"
                     f"{row['part_weights_max_diff']:>10.1e}{row['quantise_s']:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from keyreid.export.openvino_int8 import RECIPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="the reduced-width model instead of ViT-B")
    parser.add_argument("--recipes", nargs="+", choices=tuple(RECIPES), default=list(RECIPES))
    parser.add_argument("--cases", type=int, nargs="+", default=None, metavar="SEED",
                        help="seeds of the (seed, scale) cases to run (default: 0 1 2)")
    parser.add_argument("--clips", type=positive_int, default=4, help="sample clips (default: 4)")
    parser.add_argument("--calibration-clips", type=positive_int, default=16)
    parser.add_argument("--keep-ir", type=Path, default=None, help="write each default-recipe IR here")
    args = parser.parse_args(argv)
    quiet_third_party_logs()
    print(f"CPU: {cpu_isa().describe()}", flush=True)
    cases = [case for case in VIT_B_CASES if args.cases is None or case[0] in args.cases] \
        if args.cases else MEASURED_CASES
    rows = []
    print(table([]), flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        for seed, scale in cases:
            rows += measure_case("reduced" if args.reduced else "vit_b", seed, scale, args.recipes, Path(workdir),
                                 args.clips, args.calibration_clips, args.keep_ir)
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
