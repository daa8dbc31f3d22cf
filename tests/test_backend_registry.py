"""The backend registry is the one place backends are known: one module each, one line in
BACKEND_MODULES, and every tool's choices, flags and help read it."""
import ast
import subprocess
import sys
from pathlib import Path

from keyreid.runtime import backend_names
from keyreid.runtime.backends import registry
from keyreid.runtime.backends.base import Engine
from keyreid.runtime.backends.formats import FILE_SUFFIXES, model_kind

REPO = Path(__file__).resolve().parents[1]
BACKENDS_FOLDER = REPO / "runtime" / "backends"


def declares_a_backend(path: Path) -> bool:
    return any(isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "BACKEND"
               for node in ast.parse(path.read_text()).body)


def test_every_backend_module_is_registered_and_every_registered_name_is_a_module():
    declaring = sorted(path.stem for path in BACKENDS_FOLDER.glob("*.py") if declares_a_backend(path))
    assert declaring == sorted(registry.BACKEND_MODULES)
    assert backend_names() == tuple(backend.name for backend in registry.BACKENDS)


def test_each_declaration_names_an_engine_class_of_its_own_and_formats_the_registry_knows():
    for backend in registry.BACKENDS:
        assert issubclass(backend.engine_class, Engine) and backend.engine_class.backend == backend.name
        assert set(backend.kinds) <= set(FILE_SUFFIXES) | {"triton"}
        assert backend.summary and backend.device
    assert [backend.name for backend in registry.BACKENDS if backend.needs_gpu] == ["tensorrt"]


def test_reading_the_table_imports_no_backend_library():
    code = ("import sys; import keyreid.runtime.backends as backends; "
            "assert len(backends.BACKENDS) == 4; "
            "heavy = [m for m in ('onnxruntime', 'openvino', 'tensorrt', 'tritonclient', 'cuda') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_tool_offers_the_registered_backends_and_their_declared_flags():
    for tool in ("runtime/infer.py", "runtime/compare.py"):
        help_text = subprocess.run([sys.executable, str(REPO / tool), "--help"], capture_output=True, text=True,
                                   timeout=120).stdout
        flat = " ".join(help_text.split())
        for backend in registry.BACKENDS:
            assert f"{backend.name}: {backend.summary}" in flat
            for option in backend.options:
                assert option.flag in help_text and " ".join(option.help.split()) in flat


def test_the_formats_module_is_the_one_that_reads_model_suffixes():
    assert model_kind("m.ONNX") == "onnx" and model_kind("m.plan") == "tensorrt" and model_kind("m.xml") == "openvino"
    assert model_kind("grpc://host:8001/keyreid") == "triton" and model_kind("m.pt") is None
