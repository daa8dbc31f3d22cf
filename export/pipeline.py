"""One export pipeline per checkpoint and heatmap mode: the deploy graph is traced once, and every
precision (fp32, fp16, int8 for any CPU class) derives from that one trace.

    pipeline = ExportPipeline(load_checkpoint("ckpt.pth"), "max", step=print)
    fp32 = pipeline.model("fp32")                        # traces (tens of seconds for ViT-B)
    int8 = pipeline.model("int8", target_cpu="avx2")     # reuses the trace

``to_onnx.py``, the benchmarks and the tests all build their files this way, so a file made for
a benchmark is the file a user gets. Each ``model()`` is a fresh, stamped and checked
``onnx.ModelProto``; the trace itself is never handed out, so no precision changes another's.
"""
from __future__ import annotations

from typing import Callable, Optional

from keyreid.contract import DEFAULT_HEATMAP_MODE, DEFAULT_PRECISION, PRECISIONS, HeatmapMode, Precision
from keyreid.errors import KeyreidError
from keyreid.export.onnx_export import DEFAULT_OPSET, build_deploy_model, check_model, export_fp32, stamp_metadata
from keyreid.lazy import require


def export_steps(precision: Precision, traced: bool = False) -> int:
    """Progress steps of making one file: tracing (unless ``traced`` already), the precision's
    conversion (none for fp32) and the check."""
    return (not traced) + (precision != "fp32") + 1


class ExportPipeline:
    """A checkpoint's deploy graph, traced on first use and kept; ``model(precision)`` makes files."""

    def __init__(self, checkpoint, heatmap_mode: str = DEFAULT_HEATMAP_MODE, opset: int = DEFAULT_OPSET,
                 step: Optional[Callable[[str], None]] = None):
        """
        Args:
            checkpoint: a ``Checkpoint`` from ``load_checkpoint``.
            heatmap_mode: the keypoint heatmap generator the checkpoint was trained with
                (docs/contract.md §3).
            opset: default-domain ONNX opset, at least ONNX_OPSET.
            step: called with a sentence before each slow step (progress lines).
        """
        self.checkpoint = checkpoint
        self.heatmap_mode = HeatmapMode(heatmap_mode).value
        self.opset = opset
        self.step = step or (lambda message: None)
        self._trace = None

    def steps(self, precision: Precision) -> int:
        """How many times the next ``model(precision)`` calls ``step``."""
        return export_steps(precision, traced=self._trace is not None)

    def deploy_model(self):
        """The restructured torch model (docs/contract.md §5), before tracing."""
        return build_deploy_model(self.checkpoint, self.heatmap_mode)

    def _traced(self):
        if self._trace is None:
            self.step(f"tracing the deploy graph (opset {self.opset}, heatmap mode {self.heatmap_mode})")
            self._trace = export_fp32(self.checkpoint, self.heatmap_mode, self.opset)
        return self._trace

    def model(self, precision: Precision = DEFAULT_PRECISION, target_cpu: Optional[str] = None):
        """The finished, checked ModelProto at ``precision`` (not yet written).

        Args:
            precision: fp32 (exact), fp16 (GPUs) or int8 (ONNX Runtime dynamic quantisation, CPUs).
            target_cpu: int8 only: the CPU class the weights are made for (avx2, vnni, amx; None
                or "auto": this machine's; see keyreid/int8_targets.py).
        """
        from keyreid.export.precision import resolve_int8_target, to_fp16, to_int8

        if precision not in PRECISIONS:
            raise KeyreidError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if target_cpu not in (None, "auto") and precision != "int8":
            raise KeyreidError(f"a target CPU applies to int8 models only, not {precision}")
        int8_target = resolve_int8_target(target_cpu) if precision == "int8" else None
        model = require("onnx").ModelProto()
        model.CopyFrom(self._traced())
        if precision == "fp16":
            self.step("casting weights and matmuls to fp16")
            model = to_fp16(model)
        elif precision == "int8":
            self.step(f"quantising matmul weights to int8 for {int8_target} CPUs (ONNX Runtime dynamic "
                      "quantisation)")
            model = to_int8(model, int8_target)
        stamp_metadata(model, self.checkpoint, self.heatmap_mode, precision, self.opset, int8_target)
        self.step("checking the model (onnx.checker, full check)")
        check_model(model)
        return model


def export_model(checkpoint, heatmap_mode: str = DEFAULT_HEATMAP_MODE, precision: Precision = DEFAULT_PRECISION,
                 opset: int = DEFAULT_OPSET, step: Optional[Callable[[str], None]] = None,
                 target_cpu: Optional[str] = None):
    """One file's ModelProto: ``ExportPipeline(checkpoint, heatmap_mode, opset, step).model(precision,
    target_cpu)``. Making several precisions of one checkpoint, keep the pipeline instead."""
    return ExportPipeline(checkpoint, heatmap_mode, opset, step).model(precision, target_cpu)
