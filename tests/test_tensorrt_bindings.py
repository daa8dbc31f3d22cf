"""Our TensorRT code against the real TensorRT 10 and 11 Python bindings wheels (no TensorRT
library can be installed here, so nothing runs TensorRT; everything is read from the wheels).

The wheels are pip-installed once into a cache outside the repository (KEYREID_CACHE, default
~/.cache/keyreid); later runs only read them.
"""
import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from keyreid.contract import HEATMAP_MODES
from keyreid.errors import KeyreidError
from keyreid.kernels import trt_plugin
from tensorrt_bindings import Bindings, PluginApi, WHEELS, fetch_wheel, misplaced_uses, missing_uses, tensorrt_uses
from tensorrt_onnx_support import parser_problems

REPO = Path(__file__).resolve().parents[1]
TENSORRT_SOURCES = [REPO / "runtime" / "backends" / "tensorrt.py", REPO / "export" / "trt_builder.py"]
PLUGIN_SOURCE = REPO / "kernels" / "trt_plugin.py"


@pytest.fixture(scope="session")
def wheel_cache():
    return Path(os.environ.get("KEYREID_CACHE", Path.home() / ".cache" / "keyreid")) / "tensorrt-bindings"


@pytest.fixture(scope="session", params=list(WHEELS), ids=lambda label: f"tensorrt{label}")
def bindings(request, wheel_cache):
    return Bindings(request.param, fetch_wheel(request.param, wheel_cache))


@pytest.fixture(scope="session")
def plugin_api(bindings):
    if not bindings.has_plugin_api:
        pytest.skip(f"TensorRT {bindings.version} has no tensorrt.plugin (builds use --plugin none)")
    return PluginApi(bindings.folder / "plugin")


def all_uses():
    return [use for path in TENSORRT_SOURCES for use in tensorrt_uses(path)]


# --- names in tensorrt.so -------------------------------------------------------------------
def test_the_wheel_is_the_version_it_claims(bindings):
    init = (bindings.folder / "__init__.py").read_text()
    assert f'__version__ = "{bindings.version}"' in init


def test_every_tensorrt_name_our_code_uses_exists_in_the_bindings(bindings):
    """On 10.3 too: names missing there (ENABLE_PLUGIN_OVERRIDE) are used only behind hasattr."""
    uses = all_uses()
    found = {(use.owner, use.member) for use in uses}
    # The reader sees the calls that matter (so an empty or broken scan cannot pass).
    assert {("IExecutionContext", "execute_async_v3"), ("IExecutionContext", "set_input_shape"),
            ("Builder", "build_serialized_network"), ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"),
            ("OnnxParserFlag", "ENABLE_PLUGIN_OVERRIDE"), ("IProgressMonitor", "phase_start"),
            ("IBuilderConfig.set_timing_cache()", "ignore_mismatch")} <= found
    assert missing_uses(bindings, uses) == []


@pytest.fixture(scope="session")
def documented_methods(wheel_cache):
    """(class, method) pairs with a docstring symbol in any of the wheels."""
    return set().union(*(Bindings(label, fetch_wheel(label, wheel_cache)).documented for label in WHEELS))


def test_every_method_is_called_on_a_class_the_wheels_document_it_for(documented_methods, bindings):
    uses = all_uses()
    evidenced = {(use.owner, use.member) for use in uses if (use.owner, use.member) in documented_methods}
    assert len(evidenced) >= 20          # most calls have the evidence
    # No wheel keeps the symbol of OnnxParser.parse's docstring (only TimingCacheKey.parse's),
    # but every wheel holds the docstring's text.
    assert b"Parse a serialized ONNX model into the TensorRT network." in bindings.binary
    assert misplaced_uses(documented_methods, uses) == [
        f"OnnxParser.parse (trt_builder.py:{_line_of(TENSORRT_SOURCES[1], 'parser.parse(')}) "
        "is documented on TimingCacheKey"]


def test_a_method_called_on_the_wrong_object_is_reported(documented_methods, tmp_path):
    scratch = tmp_path / "wrong_object.py"
    scratch.write_text("serialized = config.build_serialized_network(network, config)\n")
    assert misplaced_uses(documented_methods, tensorrt_uses(scratch)) == [
        "IBuilderConfig.build_serialized_network (wrong_object.py:1) is documented on Builder"]


def test_names_used_behind_hasattr_exist_in_the_latest_releases(bindings):
    if bindings.label == "10.3":
        pytest.skip("JetPack 6's TensorRT is why those names are guarded")
    guarded = {(use.owner, use.member) for use in all_uses() if use.guard}
    assert guarded and all(bindings.has(owner, member) for owner, member in guarded)


def test_a_misspelt_name_in_a_scratch_copy_is_reported(bindings, tmp_path):
    scratch = tmp_path / "engine_trt.py"
    scratch.write_text(TENSORRT_SOURCES[0].read_text().replace(".execute_async_v3(", ".execute_async_v4("))
    assert missing_uses(bindings, tensorrt_uses(scratch)) == [
        f"IExecutionContext.execute_async_v4 (engine_trt.py:{_line_of(scratch, 'execute_async_v4')})"]


def _line_of(path: Path, text: str) -> int:
    return next(number for number, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_names_tensorrt_11_removed_are_reported_for_11_only(bindings, tmp_path):
    """Precision flags, implicit-batch flags and INT8 calibrators are gone in TensorRT 11: the
    check sees it in the real wheels, which is why the builder is strongly typed."""
    scratch = tmp_path / "old_style_build.py"
    scratch.write_text("config.set_flag(trt.BuilderFlag.FP16)\n"
                       "network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))\n"
                       "calibrator = trt.IInt8EntropyCalibrator2\n")
    missing = missing_uses(bindings, tensorrt_uses(scratch))
    removed = ["BuilderFlag.FP16", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "tensorrt.IInt8EntropyCalibrator2"]
    assert [line.split(" ")[0] for line in missing] == (sorted(removed) if bindings.label == "11" else [])


def _calls(method: str):
    """(file, positional argument count) of every call ``<obj>.method(...)`` in our sources."""
    for path in TENSORRT_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method:
                yield path.name, len(node.args)


@pytest.mark.parametrize("method, owner", [("execute_async_v3", "IExecutionContext"),
                                           ("set_tensor_address", "IExecutionContext"),
                                           ("get_tensor_profile_shape", "ICudaEngine")])
def test_wrapped_methods_are_called_with_their_compiled_signature(bindings, method, owner):
    """These methods are C++ lambdas whose signature is in the symbol table: (self&, args...)."""
    parameters = bindings.signatures[method]
    assert parameters[0] == f"nvinfer1::{owner}&"
    calls = list(_calls(method))
    assert calls and all(count == len(parameters) - 1 for _, count in calls), (parameters, calls)


def test_stream_and_addresses_are_passed_as_integers(bindings):
    assert bindings.signatures["execute_async_v3"][1] == "unsigned long"       # cudaStream_t as int
    assert bindings.signatures["set_tensor_address"][2] == "unsigned long"     # device pointer as int
    engine_source = TENSORRT_SOURCES[0].read_text()
    assert "execute_async_v3(int(stream))" in engine_source


# --- the tensorrt.plugin API ----------------------------------------------------------------
def _plugin_functions():
    """The functions trt_plugin registers, by decorator: {"register": FunctionDef, "aot_impl": ...}."""
    functions = {}
    for node in ast.walk(ast.parse(PLUGIN_SOURCE.read_text())):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute):
                    functions[decorator.func.attr] = node
    return functions


def _trtp_uses():
    """(name, member) for every ``trtp.name`` and ``trtp.name.member`` in the plugin source."""
    uses = set()
    for node in ast.walk(ast.parse(PLUGIN_SOURCE.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trtp":
            uses.add((node.attr, None))
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "trtp"):
            uses.add((node.value.attr, node.attr))
    return uses


def test_aot_plugins_arrive_with_the_version_the_builder_requires(bindings):
    from keyreid.export.trt_builder import AOT_PLUGIN_MIN_VERSION, version_tuple
    has_aot = bindings.has_string("QuickPluginCreationRequest")
    assert has_aot == (version_tuple(bindings.version) >= AOT_PLUGIN_MIN_VERSION)


def test_the_bindings_have_aot_plugins(bindings, plugin_api):
    # tensorrt.plugin defines KernelLaunchParams only when this binding exists (IS_AOT_ENABLED).
    assert 'IS_AOT_ENABLED = hasattr(trt, "QuickPluginCreationRequest")' in plugin_api.sources["_export.py"]
    assert bindings.has_string("QuickPluginCreationRequest")


def test_every_tensorrt_plugin_name_the_plugin_uses_is_public(plugin_api):
    uses = _trtp_uses()
    assert {("register", None), ("aot_impl", None), ("KernelLaunchParams", None), ("SymIntExprs", None)} <= uses
    assert sorted(name for name, _ in uses if name not in plugin_api.public) == []
    members = sorted(f"{name}.{member}" for name, member in uses
                     if member is not None and plugin_api.public.get(name) is not None
                     and member not in plugin_api.members(name))
    assert members == []


def test_tensor_descriptions_offer_what_the_shape_function_uses(plugin_api):
    assert {"like", "shape_expr"} <= plugin_api.members("TensorDesc")
    assert "from_tuple" in plugin_api.members("ShapeExprs")


def test_launch_parameters_are_set_by_keywords_kernel_launch_params_takes(plugin_api):
    assert set(trt_plugin.launch_geometry(1)) == plugin_api.init_keywords("KernelLaunchParams")
    assert "trtp.KernelLaunchParams(**launch_geometry(num_clips))" in PLUGIN_SOURCE.read_text()


@pytest.mark.parametrize("num_clips", [1, 7, 32])
def test_launch_geometry_is_the_kernels_launch_config(num_clips):
    from keyreid.kernels.cuda_build import launch_config
    geometry = trt_plugin.launch_geometry(num_clips)
    (grid, block, shared) = launch_config(num_clips)
    assert (geometry["grid_x"], geometry["grid_y"], geometry["grid_z"]) == grid
    assert (geometry["block_x"], geometry["block_y"], geometry["block_z"]) == block
    assert geometry["shared_mem"] == shared


def _expected_trailing_parameters(plugin_api) -> list:
    """The parameters aot_impl must end with, read from the wheel's own validation code."""
    source = plugin_api.sources["_validate.py"]
    body = source[source.index("def _validate_aot_impl"):]
    trailing = re.search(r'\+ ", (outputs[^"]*)\)"', body).group(1)
    return [name.strip() for name in trailing.split(",")]


def test_aot_impl_signature_matches_what_tensorrt_plugin_validates(plugin_api):
    functions = _plugin_functions()
    register, aot_impl = functions["register"], functions["aot_impl"]
    register_parameters = [arg.arg for arg in register.args.args]
    expected = register_parameters + _expected_trailing_parameters(plugin_api)
    assert [arg.arg for arg in aot_impl.args.args] == expected
    annotations = {arg.arg: ast.unparse(arg.annotation) for arg in aot_impl.args.args}
    assert annotations["outputs"] == "Tuple[trtp.TensorDesc]" and annotations["tactic"] == "int"


def test_aot_impl_returns_the_documented_four_tuple(plugin_api):
    aot_impl_docs = ast.get_docstring(plugin_api.public["aot_impl"])
    schema = re.search(r"-> (Tuple\[str, str, KernelLaunchParams, SymExprs\])", aot_impl_docs)
    assert schema is not None
    returned = ast.unparse(_plugin_functions()["aot_impl"].returns).replace("trtp.", "")
    assert returned == schema.group(1)
    return_statement = [node for node in ast.walk(_plugin_functions()["aot_impl"]) if isinstance(node, ast.Return)]
    assert [len(node.value.elts) for node in return_statement] == [4]


def test_register_declares_tensor_inputs_then_the_mode_attribute(plugin_api):
    register = _plugin_functions()["register"]
    annotations = [ast.unparse(arg.annotation) for arg in register.args.args]
    assert annotations == ["trtp.TensorDesc", "trtp.TensorDesc", "str"]
    assert ast.unparse(register.returns) == "Tuple[trtp.TensorDesc]"
    # register reads annotations as objects: a module with postponed (string) annotations fails.
    future_imports = [alias.name for node in ast.parse(PLUGIN_SOURCE.read_text()).body
                      if isinstance(node, ast.ImportFrom) and node.module == "__future__" for alias in node.names]
    assert "annotations" not in future_imports


# --- the PTX handed to TensorRT -------------------------------------------------------------
TWO_ORDERS = r"""
extern "C" __global__ void tensorrt_order(const float* keypoints, const float* crop_size, int num_clips,
                                          float* part_weights) { if (num_clips) part_weights[0] = keypoints[0] + crop_size[0]; }
extern "C" __global__ void outputs_before_extra(const float* keypoints, const float* crop_size,
                                                float* part_weights, int num_clips) { if (num_clips) part_weights[0] = keypoints[0] + crop_size[0]; }
"""


@pytest.fixture(scope="module")
def two_order_ptx(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc here to compile real PTX")
    folder = tmp_path_factory.mktemp("ptx")
    (folder / "orders.cu").write_text(TWO_ORDERS)
    subprocess.run([nvcc, "--ptx", "-arch=compute_75", "-o", str(folder / "orders.ptx"), str(folder / "orders.cu")],
                   check=True, capture_output=True, timeout=300)
    return (folder / "orders.ptx").read_text()


def test_ptx_entry_in_tensorrt_argument_order_is_accepted(two_order_ptx):
    assert trt_plugin.entry_parameters(two_order_ptx, "tensorrt_order") == ["b64", "b64", "b32", "b64"]
    trt_plugin.check_kernel_arguments(two_order_ptx, "tensorrt_order")


def test_ptx_entry_with_outputs_before_the_extra_argument_is_refused_as_is(two_order_ptx):
    with pytest.raises(KeyreidError, match="inputs, extra arguments, then outputs"):
        trt_plugin.check_kernel_arguments(two_order_ptx, "outputs_before_extra")


def test_missing_ptx_entry_is_refused(two_order_ptx):
    with pytest.raises(KeyreidError, match="no entry point keypoint_part_pool_max"):
        trt_plugin.check_kernel_arguments(two_order_ptx, "keypoint_part_pool_max")


def _assemble(ptx: str, folder: Path, arch: str) -> str:
    """ptxas's report on ``ptx`` for ``arch``: the PTX TensorRT would load is well formed."""
    ptxas = shutil.which("ptxas") or str(Path(shutil.which("nvcc")).resolve().parent / "ptxas")
    source = folder / "kernel.ptx"
    source.write_text(ptx)
    result = subprocess.run([ptxas, f"-arch={arch}", "-v", str(source), "-o", str(folder / "kernel.cubin")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.mark.parametrize("mode", HEATMAP_MODES)
def test_fused_kernel_ptx_has_the_entry_and_arguments_the_plugin_hands_over(mode, tmp_path):
    from keyreid.kernels import cuda_build
    try:
        ptx = cuda_build.compile_ptx((8, 7))       # Jetson Orin
    except KeyreidError as exc:
        pytest.skip(f"no CUDA compiler here: {exc}")
    name = cuda_build.kernel_name(mode)
    trt_plugin.check_kernel_arguments(ptx, name)       # handed over as compiled, no rewriting
    assert trt_plugin.entry_parameters(ptx, name) == ["b64", "b64", "b32", "b64"]
    if shutil.which("nvcc"):
        assert f"Compiling entry function '{name}' for 'sm_87'" in _assemble(ptx, tmp_path, "sm_87")


# --- the ONNX graphs TensorRT parses --------------------------------------------------------
@pytest.fixture(scope="module")
def exported_models(reduced_onnx):
    import onnx
    from keyreid.export.precision import to_fp16
    fp32 = onnx.load(str(reduced_onnx))
    return {"fp32": fp32, "fp16": to_fp16(onnx.load(str(reduced_onnx)))}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_operator_of_the_export_is_supported_by_tensorrts_onnx_parser(exported_models, precision):
    model = exported_models[precision]
    assert len(model.functions) == 1          # the op's body is checked too
    assert parser_problems(model) == []


@pytest.mark.parametrize("mode", HEATMAP_MODES)
def test_every_heatmap_modes_function_body_is_supported(mode):
    from keyreid.kernels.onnx_function import make_part_pool_model
    assert parser_problems(make_part_pool_model(mode)) == []


def test_the_support_check_finds_an_unsupported_operator_and_dynamic_axes(exported_models):
    import onnx
    model = onnx.ModelProto()
    model.CopyFrom(exported_models["fp32"])
    body = model.functions[0]
    body.node[0].op_type = "MatMulInteger"             # CPU-only quantised op, not in TensorRT's table
    slices = [node for node in model.graph.node if node.op_type == "Slice"]
    slices[0].input[3] = model.graph.input[0].name      # axes from a runtime tensor
    problems = parser_problems(model)
    assert any("MatMulInteger is not supported" in problem for problem in problems)
    assert any("Slice" in problem and "not from an initializer" in problem for problem in problems)
