"""Checkpoint file -> verified ONNX file, as one library call: what ``to_onnx.py`` does.

The model is written to a temporary file beside the output, run in ONNX Runtime against the
reference model on sample clips (keyreid/tolerances.py), and renamed into place only if it
passes; a failed check raises ``VerificationFailed`` and leaves nothing behind.
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from keyreid.cli import Steps
from keyreid.comparator import ComparisonReport
from keyreid.contract import DEFAULT_HEATMAP_MODE, DEFAULT_PRECISION, HeatmapMode, Precision
from keyreid.cpu_features import cpu_isa
from keyreid.errors import KeyreidError
from keyreid.export.verify import DEFAULT_SAMPLE_CLIPS
from keyreid.files import atomic_output, check_distinct_outputs, check_writable
from keyreid.model_metadata import ModelMetadata, read_metadata
from keyreid.runtime.backends.formats import ONNX_SUFFIXES


class VerificationFailed(KeyreidError):
    """The exported file did not reproduce the reference model; nothing was written."""

    def __init__(self, report: ComparisonReport):
        super().__init__(f"the exported model failed verification ({'; '.join(report.failures())}); "
                         "nothing was written. Export with verify=False (to_onnx.py --no-verify) to keep it anyway")
        self.report = report


@dataclass(frozen=True)
class ExportedFile:
    """What ``export_onnx`` wrote."""
    path: Path
    metadata: ModelMetadata                    # what the file records (docs/contract.md §7)
    report: Optional[ComparisonReport]         # the parity check; None when not verified

    @property
    def size_mib(self) -> float:
        return self.path.stat().st_size / 2 ** 20


def export_onnx(checkpoint: Union[str, Path], output: Union[str, Path, None] = None, *,
                heatmap_mode: HeatmapMode = DEFAULT_HEATMAP_MODE, precision: Precision = DEFAULT_PRECISION,
                target_cpu: Optional[str] = None, opset: Optional[int] = None, verify: bool = True,
                verify_clips: int = DEFAULT_SAMPLE_CLIPS, progress: bool = True) -> ExportedFile:
    """Export ``checkpoint`` to ``output`` (default: its path with suffix .onnx), verified.

    Args:
        checkpoint: an upstream KeyRe-ID checkpoint (.pth).
        heatmap_mode, precision, target_cpu, opset: as ``export_model``.
        verify: run the file in ONNX Runtime against the reference model first, and write it
            only if it passes (VerificationFailed otherwise).
        verify_clips: sample clips for that check.
        progress: numbered progress lines on stderr.
    """
    from keyreid.export.checkpoint import load_checkpoint, load_reference_model
    from keyreid.export.onnx_export import DEFAULT_OPSET, write_model_atomically
    from keyreid.export.pipeline import ExportPipeline, export_steps
    from keyreid.export.verify import verify_onnx

    checkpoint, opset = Path(checkpoint), opset or DEFAULT_OPSET
    if opset < DEFAULT_OPSET:
        raise KeyreidError(f"opset {opset} is too old: the exporter needs opset {DEFAULT_OPSET} or newer")
    if verify_clips < 1:
        raise KeyreidError(f"verify_clips must be at least 1, got {verify_clips}")
    output = Path(output) if output is not None else checkpoint.with_suffix(ONNX_SUFFIXES[0])
    check_distinct_outputs({"the output": output}, {"the checkpoint": checkpoint})
    check_writable(output, "the output")

    def say(line: str) -> None:
        if progress:
            print(f"      {line}", file=sys.stderr, flush=True)

    steps = Steps(total=1 + export_steps(precision) + int(verify), quiet=not progress)
    steps(f"loading checkpoint {checkpoint}")
    loaded = load_checkpoint(checkpoint)
    config = loaded.config
    say(f"width {config.embed_dim}, {config.depth} blocks, {config.num_cameras} cameras, "
        f"{config.num_identities} training identities -> {config.embedding_dim}-d embeddings")
    model = ExportPipeline(loaded, heatmap_mode, opset, step=steps).model(precision, target_cpu)
    report = None
    # Verify the bytes that will be installed, then rename them into place.
    with atomic_output(output) as staging:
        write_model_atomically(model, staging)
        if verify:
            steps(f"verifying against the reference model in ONNX Runtime ({verify_clips} clips)")
            say(f"on {cpu_isa().describe()}")
            report = verify_onnx(staging, load_reference_model(loaded), heatmap_mode, precision, verify_clips)
            if not report.passed:
                steps.done()
                raise VerificationFailed(report)
    steps.done()
    return ExportedFile(output, read_metadata({entry.key: entry.value for entry in model.metadata_props}, output),
                        report)
