"""What a backend declares about itself, once: the model formats it runs, its engine class, the
options it takes (with their command-line flags and help) and the device it needs.

Each backend module ends with one ``BACKEND = Backend(...)``; the registry
(``keyreid.runtime.backends.registry``) collects them, and ``open_engine``, the command-line
tools' engine options, ``compare.py``, the Triton repository writer and the benchmarks ask it.
Options several backends take are declared here once, so a flag means one thing everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Type

from keyreid.cli import positive_int
from keyreid.runtime.backends.formats import ModelKind


@dataclass(frozen=True)
class EngineOption:
    """A keyword argument of engine classes and the command-line flag that sets it."""
    flag: str                                   # "--threads"
    keyword: str                                # "threads": the engine class's keyword argument
    help: str                                   # what it does (the tools add which backends take it)
    type: Optional[Callable[[str], Any]] = None  # argparse type of one value
    choices: Optional[Tuple[str, ...]] = None
    metavar: str = "X"
    repeatable: bool = False                    # given several times, the values form a list


@dataclass(frozen=True)
class Backend:
    name: str                          # what --backend and open_engine(backend=...) call it
    kinds: Tuple[ModelKind, ...]       # the model formats it runs (backends/formats.py)
    engine_class: Type                 # an Engine subclass; constructing it imports nothing heavy
    options: Tuple[EngineOption, ...]  # the options only some backends take
    summary: str                       # one phrase for --help
    device: str                        # where it computes, for people and for schedulers
    needs_gpu: bool = False            # True: a worker running it must own an NVIDIA GPU

    @property
    def keywords(self) -> Tuple[str, ...]:
        return tuple(option.keyword for option in self.options)

    @property
    def flags(self) -> Tuple[str, ...]:
        return tuple(option.flag for option in self.options)


# Options both CPU backends take, declared once.
THREADS = EngineOption(
    "--threads", "threads", "inference threads: ONNX Runtime's (inside one operator) or OpenVINO's "
    "(default: the library's choice, one per core)",
    type=positive_int, metavar="N")
CLIPS_PER_RUN = EngineOption(
    "--clips-per-run", "clips_per_run", "run a batch in pieces of N clips (ONNX Runtime default: 1 on "
    "the CPU provider, where it measured fastest per clip, whole batches on a GPU; OpenVINO default: "
    "whole batches)", type=positive_int, metavar="N")
