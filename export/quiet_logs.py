"""Quieter exporter logs for the export tools and the benchmarks (torch is imported here only)."""
import logging


def quiet_third_party_logs() -> None:
    """The exporter logs a warning per missing torchvision op; users need none of it.
    torch configures its loggers when imported, so import it (if present) before quietening."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
