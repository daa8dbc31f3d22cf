"""Describe the machine and software a measurement came from, printed with every result."""
import os
import platform


def describe(threads: int) -> dict:
    from keyreid.cpu_features import cpu_isa

    isa = cpu_isa()
    versions = {}
    for module in ("torch", "onnxruntime", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "absent"
    return {"cpu": isa.model or platform.processor() or platform.machine(), "cpu_class": isa.cpu_class,
            "isa": isa.describe(), "logical_cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), **versions}


def banner(info: dict) -> str:
    return (f"machine: {info['isa']}, {info['logical_cores']} logical cores; {info['threads']} threads "
            f"per engine; python {info['python']}, torch {info['torch']}, onnxruntime {info['onnxruntime']}")


def gemm_session(precision: str, threads: int, size: int):
    """(session, feed): one square matrix product the way the engines run it, in ONNX Runtime.

    fp32: MatMul on float32. int8: MatMulInteger on uint8 x int8, what dynamic quantisation runs.
    """
    import numpy as np
    from onnx import TensorProto, helper

    from keyreid.benchmarks.model_speed import onnxruntime_session

    rng = np.random.default_rng(0)
    if precision == "fp32":
        op, types = "MatMul", (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT)
        feed = {"a": rng.standard_normal((size, size), np.float32), "b": rng.standard_normal((size, size), np.float32)}
    else:
        op, types = "MatMulInteger", (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)
        feed = {"a": rng.integers(0, 256, (size, size), dtype=np.uint8),
                "b": rng.integers(-127, 128, (size, size), dtype=np.int8)}
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], f"gemm_{precision}",
                              [helper.make_tensor_value_info("a", types[0], [size, size]),
                               helper.make_tensor_value_info("b", types[1], [size, size])],
                              [helper.make_tensor_value_info("c", types[2], [size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnxruntime_session(model.SerializeToString(), threads), feed


def gemm_rates(threads: int, size: int = 2048, repeats: int = 5) -> dict:
    """This machine's matrix-product limits with ``threads`` threads: median of ``repeats``
    products of square ``size`` matrices, in operations per second (2 per multiply-add) for
    both fp32 and int8 so the two share a unit."""
    rates = {"size": size, "threads": threads}
    for precision in ("fp32", "int8"):
        session, feed = gemm_session(precision, threads, size)
        rates[f"{precision}_ops_per_s"] = _square_product_rate(lambda: session.run(None, feed), size, repeats)
    rates["torch_fp32_ops_per_s"] = _torch_fp32_rate(threads, size, repeats)
    for precision in OPENVINO_PRECISIONS:
        rates[f"openvino_{precision}_ops_per_s"] = _openvino_rate(precision, threads, size, repeats)
    return rates


# OpenVINO's compute precisions measured (its own names); bf16 only where the CPU has it.
OPENVINO_PRECISIONS = ("f32", "bf16")


def _square_product_rate(product, size: int, repeats: int) -> float:
    """Operations per second of ``product()``, one size x size matrix product: a warm-up, then
    the median of ``repeats`` calls."""
    import math
    import statistics

    from keyreid.benchmarks.model_speed import timed_calls

    return 2 * size ** 3 / statistics.median(timed_calls(product, repeats, budget_s=math.inf))


def _torch_fp32_rate(threads: int, size: int, repeats: int):
    """torch's fp32 matmul (oneDNN / MKL on x86) on the same matrices: what the reference model
    multiplies with, so its share of the ONNX Runtime limit can be read. None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
    return _square_product_rate(lambda: torch.matmul(a, b), size, repeats)


def _openvino_rate(precision: str, threads: int, size: int, repeats: int):
    """OpenVINO's CPU plugin multiplying an input by a constant matrix (as the model's layers do)
    in compute precision ``precision``: the limit of the OpenVINO rows. None without OpenVINO,
    or for bf16 on a CPU without bf16 arithmetic."""
    from keyreid.cpu_features import cpu_isa

    try:
        import numpy as np
        import openvino as ov
        import openvino.properties as properties
        import openvino.properties.hint as hints
    except ImportError:
        return None
    if precision == "bf16" and not cpu_isa().bf16:
        return None
    rng = np.random.default_rng(0)
    activation = ov.opset13.parameter([size, size], ov.Type.f32, name="a")
    weight = ov.opset13.constant(rng.standard_normal((size, size), np.float32))
    model = ov.Model([ov.opset13.matmul(activation, weight, False, False)], [activation], f"gemm_{precision}")
    compiled = ov.Core().compile_model(model, "CPU", {
        hints.inference_precision: ov.Type.bf16 if precision == "bf16" else ov.Type.f32,
        hints.performance_mode: hints.PerformanceMode.LATENCY, properties.inference_num_threads: threads})
    request, feed = compiled.create_infer_request(), {"a": rng.standard_normal((size, size), np.float32)}
    return _square_product_rate(lambda: request.infer(feed), size, repeats)
