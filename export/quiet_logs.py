"""Quieter exporter logs for the export tools, the library's export and the benchmarks (torch is
imported here only)."""
import contextlib
import logging
from typing import Dict, Iterator

# torch.onnx: a warning per torchvision op it cannot register when torchvision is not installed
# (keyreid uses none of them); nncf: an INFO line per node it leaves unquantised (the int8 IR
# export ignores hundreds).
NOISY_LOGGERS = ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "nncf")


def _import_torch_if_present() -> None:
    """torch configures its loggers when imported: import it first, or they are set afterwards."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pass


def quiet_third_party_logs() -> None:
    """For command-line tools: the exporters' noise off for the rest of the process."""
    _import_torch_if_present()
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def exporter_logs_quietened() -> Iterator[None]:
    """For the library (``export_model``): the exporters' noise off inside the block only, so a
    caller's own logging configuration is as it was afterwards. Loggers already set quieter (by
    ``quiet_third_party_logs`` or the caller) stay so."""
    _import_torch_if_present()
    previous: Dict[str, int] = {}
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        previous[name] = logger.level
        if logger.getEffectiveLevel() < logging.ERROR:
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


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
