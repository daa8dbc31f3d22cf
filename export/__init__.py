"""keyreid.export (the ``export/`` folder): turn a trained checkpoint into model files.

Needs the ``export`` extra (torch, onnx, onnxscript), imported only when used, so
``import keyreid.export`` stays cheap.

Public entry points, in data-flow order:

- ``export_onnx(checkpoint_path, output, heatmap_mode=..., precision=...) -> ExportedFile``: what
  ``to_onnx.py`` does, as one call: export, verify against the reference model in ONNX Runtime,
  and only then write the file (progress lines on stderr unless ``progress=False``).
- ``load_checkpoint(path) -> Checkpoint``: read an upstream checkpoint (``weights_only=True``),
  unwrap it, size the model and check every tensor; bad files raise one KeyreidError.
- ``ExportPipeline(checkpoint, heatmap_mode)``: the restructured deploy graph (docs/contract.md
  §5), traced once; ``.model(precision, target_cpu=...) -> onnx.ModelProto`` gives each file,
  with the ``keyreid::KeypointPartPool`` node, stamped and checked; an int8 file is made for a
  CPU class (keyreid/int8_targets.py). ``export_model(...)`` makes one file the same way, in
  memory and not verified (``export_onnx`` does that).
- ``saturation_report(model_path, feed)``: whether an int8 file's products would clip the
  16-bit sums of CPUs without VNNI, replayed in NumPy on its own codes (any CPU).

The command-line tools ``to_onnx.py`` (export, verify, install), ``reference_outputs.py``
(reference results for ``compare.py``) and ``random_checkpoint.py`` are thin layers over these.
"""
import importlib

__all__ = ["export_onnx", "load_checkpoint", "ExportPipeline", "export_model", "saturation_report"]

_HOMES = {"export_onnx": "keyreid.export.onnx_file", "load_checkpoint": "keyreid.export.checkpoint",
          "ExportPipeline": "keyreid.export.pipeline", "export_model": "keyreid.export.pipeline",
          "saturation_report": "keyreid.export.int8_saturation"}


def __getattr__(name: str):
    """Import the public functions on first use (PEP 562), not with the package."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'keyreid.export' has no attribute {name!r}")
