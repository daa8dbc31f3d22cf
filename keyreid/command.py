"""The ``keyreid`` command: every tool of the project as a subcommand, ``trtexec`` / ``polygraphy
run`` style.

    keyreid export ckpt.pth                 # = python export/to_onnx.py ckpt.pth
    keyreid infer --engine model.onnx ...   # = python runtime/infer.py ...
    keyreid --help                          # the subcommands

Each subcommand is the tool's own ``main``, imported only when it runs: ``keyreid infer`` never
imports torch, and ``keyreid --help`` imports no tool at all. This module sits above every layer
(docs/architecture.md); nothing imports it.
"""
from __future__ import annotations

import importlib
import sys
import textwrap
from typing import Dict, NamedTuple, Optional, Sequence

from keyreid import __version__


class Subcommand(NamedTuple):
    module: str      # the tool's module, with a main(argv) -> int
    script: str      # the same tool as a file, for people who run it that way
    summary: str


# In data-flow order: checkpoint -> files -> engines -> embeddings -> results.
SUBCOMMANDS: Dict[str, Subcommand] = {
    "demo": Subcommand("keyreid.demo", "python -m keyreid.demo",
                       "random checkpoint -> ONNX -> embeddings -> ranking, on made-up data"),
    "export": Subcommand("keyreid.export.to_onnx", "export/to_onnx.py",
                         "trained PyTorch checkpoint -> verified ONNX file (fp32, fp16, int8)"),
    "tensorrt": Subcommand("keyreid.export.to_tensorrt", "export/to_tensorrt.py",
                           "ONNX file -> TensorRT engine (.plan) with its sidecar, on an NVIDIA GPU"),
    "openvino": Subcommand("keyreid.export.to_openvino", "export/to_openvino.py",
                           "fp32 ONNX file -> verified OpenVINO int8 IR (.xml + .bin)"),
    "triton": Subcommand("keyreid.export.to_triton", "export/to_triton.py",
                         "ONNX file or plan -> Triton Inference Server model repository"),
    "infer": Subcommand("keyreid.runtime.infer", "runtime/infer.py",
                        "tracklet folders -> embeddings; query/gallery evaluation and rankings"),
    "stream": Subcommand("keyreid.runtime.stream", "runtime/stream.py",
                         "video files and network streams with a tracker's tracks -> matched tracks"),
    "batch": Subcommand("keyreid.runtime.batch", "runtime/batch.py",
                        "tracklet folders or MARS -> resumable Parquet embeddings on Ray Data (local or a cluster)"),
    "compare": Subcommand("keyreid.runtime.compare", "runtime/compare.py",
                          "check an engine against the reference model or another engine"),
    "gallery": Subcommand("keyreid.runtime.gallery", "runtime/gallery.py",
                          "build a cross-camera gallery from embeddings, and search it"),
    "serve": Subcommand("keyreid.runtime.serve_triton", "runtime/serve_triton.py",
                        "serve an engine through Triton Inference Server (gRPC and HTTP)"),
    "bench": Subcommand("keyreid.benchmarks.run", "benchmarks/run.py",
                        "measure the engines side by side against the reference model"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: keyreid SUBCOMMAND [options]   (keyreid SUBCOMMAND --help for its options)",
             "", "Deploy KeyRe-ID: checkpoint -> ONNX -> engine -> embeddings.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in SUBCOMMANDS.items()]
    files = ", ".join(command.script for command in SUBCOMMANDS.values() if command.script.endswith(".py"))
    lines += [""] + textwrap.wrap(f"Each is also a file you can run: {files}.", 96)
    lines += ["", "exit status: 0 done; 1 bad input or a failed check; 2 wrong usage; "
              "130/143 interrupted/terminated"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"keyreid {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    command = SUBCOMMANDS.get(name)
    if command is None:
        print(f"keyreid: unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    from keyreid.cli import run_as

    tool = importlib.import_module(command.module)
    return run_as(f"keyreid {name}", tool.main, rest)


if __name__ == "__main__":
    sys.exit(main())
