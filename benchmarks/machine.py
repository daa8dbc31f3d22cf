"""Describe the machine and software a measurement came from, printed with every result."""
import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(threads: int) -> dict:
    versions = {}
    for module in ("torch", "onnxruntime", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "absent"
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), **versions}


def banner(info: dict) -> str:
    return (f"machine: {info['cpu']}, {info['logical_cores']} logical cores; {info['threads']} threads "
            f"per engine; python {info['python']}, torch {info['torch']}, onnxruntime {info['onnxruntime']}")
