"""Quieter exporter logs for the export tools and the benchmarks (torch is imported here only)."""
import contextlib
import logging


def quiet_third_party_logs() -> None:
    """The exporter logs a warning per missing torchvision op; users need none of it.
    torch configures its loggers when imported, so import it (if present) before quietening."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    # nncf: an INFO line per node it leaves unquantised (the int8 IR export ignores hundreds)
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "nncf"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _DropPreprocessingHint(logging.Filter):
    """ONNX Runtime's quantiser asks on the root logger for its shape pre-processing, which our
    graphs do not need (they are exported with shapes); the line only confuses users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


@contextlib.contextmanager
def quantiser_hint_dropped():
    """Inside: the quantiser's pre-processing hint is not logged; every other record is."""
    hint_filter = _DropPreprocessingHint()
    root = logging.getLogger()
    root.addFilter(hint_filter)
    try:
        yield
    finally:
        root.removeFilter(hint_filter)
