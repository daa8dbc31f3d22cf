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


def gemm_rates(threads: int, size: int = 2048, repeats: int = 5) -> dict:
    """This machine's matrix-product limits, measured the way the engines run: ONNX Runtime's
    CPU provider with ``threads`` threads, square ``size`` matrices, median of ``repeats``.

    fp32: MatMul on float32. int8: MatMulInteger on uint8 x int8 (what dynamic quantisation
    runs), in operations (2 per multiply-add) so both rates share a unit.
    """
    import statistics
    import time

    import numpy as np
    from onnx import TensorProto, helper

    from model_speed import onnxruntime_session

    rng = np.random.default_rng(0)
    cases = {"fp32": ("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT,
                      rng.standard_normal((size, size), np.float32), rng.standard_normal((size, size), np.float32)),
             "int8": ("MatMulInteger", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32,
                      rng.integers(0, 256, (size, size), dtype=np.uint8),
                      rng.integers(-127, 128, (size, size), dtype=np.int8))}
    rates = {"size": size, "threads": threads}
    for name, (op, a_type, b_type, out_type, a, b) in cases.items():
        graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], f"gemm_{name}",
                                  [helper.make_tensor_value_info("a", a_type, [size, size]),
                                   helper.make_tensor_value_info("b", b_type, [size, size])],
                                  [helper.make_tensor_value_info("c", out_type, [size, size])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        session = onnxruntime_session(model.SerializeToString(), threads)
        feed = {"a": a, "b": b}
        session.run(None, feed)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        rates[f"{name}_ops_per_s"] = 2 * size ** 3 / statistics.median(times)
    return rates
