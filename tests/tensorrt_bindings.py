"""What the real TensorRT Python bindings wheels offer, read from their files, and what our code
uses of them, read from our sources. No TensorRT library is loaded (none can be installed here).

A bindings wheel (``tensorrt-cu12-bindings`` for 10.x, ``tensorrt-cu13-bindings`` for 11.x) holds
``tensorrt_bindings/tensorrt.so`` (the pybind11 module), ``__init__.py`` and the ``plugin/``
Python sources. Every Python name pybind11 registers is a NUL-terminated string literal in the
``.so``; the linker may store a name inside a longer one that ends with it (tail merging:
``num_errors`` lives inside ``get_num_errors``), so a name is present when ``name\\0`` occurs.
Class membership is stronger where the symbol table says it: ``tensorrt::<Class>Doc::<method>``
(the docstring of that method) and ``tensorrt::lambdas::<method>(<Class>&, args...)`` (the C++
signature of a wrapped method).
"""
from __future__ import annotations

import ast
import ctypes
import ctypes.util
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

# The latest 10.x and 11.x releases when this was written (pip index versions), and JetPack 6's
# 10.3, which has no tensorrt.plugin: there only the ONNX-function build path has to work.
WHEELS = {"10.3": ("tensorrt-cu12-bindings", "10.3.0"), "10": ("tensorrt-cu12-bindings", "10.16.1.11"),
          "11": ("tensorrt-cu13-bindings", "11.4.0.106")}

# Variable names our TensorRT code gives TensorRT objects -> the Python class they hold.
# ``self._engine`` counts as ``engine``.
TRT_VARIABLES = {
    "trt": "tensorrt", "builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser",
    "config": "IBuilderConfig", "profile": "IOptimizationProfile", "timing_cache": "ITimingCache",
    "runtime": "Runtime", "engine": "ICudaEngine", "context": "IExecutionContext",
    "registry": "IPluginRegistry", "logger": "Logger", "layer": "ILayer",
}


def fetch_wheel(label: str, cache: Path) -> Path:
    """The wheel's ``tensorrt_bindings`` folder, pip-installed (no dependencies) into ``cache``
    once; later calls only look."""
    package, version = WHEELS[label]
    target = cache / f"{package}-{version}"
    folder = target / "tensorrt_bindings"
    if not (folder / "tensorrt.so").is_file():
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                   "--disable-pip-version-check", "--target", str(target), f"{package}=={version}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0 or not (folder / "tensorrt.so").is_file():
            raise RuntimeError(f"could not fetch {package}=={version}: {result.stderr.strip()[-2000:]}")
    return folder


def _demangle(symbols: List[str]) -> List[str]:
    """C++ names of ``symbols``, by libstdc++'s own demangler (no binutils needed)."""
    libstdcxx = ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
    libc = ctypes.CDLL(None)
    demangle = libstdcxx.__cxa_demangle
    demangle.restype = ctypes.c_void_p
    demangle.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    libc.free.argtypes = [ctypes.c_void_p]
    names = []
    for symbol in symbols:
        status = ctypes.c_int()
        pointer = demangle(symbol.encode(), None, None, ctypes.byref(status))
        if status.value == 0 and pointer:
            names.append(ctypes.string_at(pointer).decode())
            libc.free(pointer)
    return names


@dataclass
class Bindings:
    """One bindings wheel, read from its files."""
    label: str
    folder: Path

    @property
    def version(self) -> str:
        return WHEELS[self.label][1]

    @property
    def has_plugin_api(self) -> bool:
        return (self.folder / "plugin").is_dir()

    def __post_init__(self):
        self.binary = (self.folder / "tensorrt.so").read_bytes()
        init = ast.parse((self.folder / "__init__.py").read_text())
        self.python_names = {node.name for node in ast.walk(init) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        self.python_names |= {target.id for node in ast.walk(init) if isinstance(node, ast.Assign)
                              for target in node.targets if isinstance(target, ast.Name)}
        mangled = sorted(set(re.findall(rb"_ZN8tensorrt(?:\d+[A-Za-z_]\w*Doc|7lambdas)\w+", self.binary)))
        demangled = _demangle([symbol.decode() for symbol in mangled])
        self.documented: Set[Tuple[str, str]] = set()        # (C++ class, method) with a docstring
        self.signatures: Dict[str, List[str]] = {}           # method -> C++ parameter types
        for line in demangled:
            doc = re.match(r"tensorrt::(\w+)Doc::(\w+)", line)
            if doc:
                self.documented.add(doc.groups())
            wrapped = re.match(r"tensorrt::lambdas::(\w+)\((.*)\)", line)
            if wrapped:
                self.signatures[wrapped.group(1)] = [part.strip() for part in _split_types(wrapped.group(2))]

    def has_string(self, name: str) -> bool:
        return name.encode() + b"\0" in self.binary

    def has(self, owner: str, member: str) -> bool:
        """``owner.member`` can exist in these bindings (``owner`` "tensorrt" is the module)."""
        if owner == "tensorrt":
            return member in self.python_names or member == "plugin" and (self.folder / "plugin").is_dir() \
                or self.has_string(member)
        return self.has_string(owner) and self.has_string(member)


def _split_types(text: str) -> List[str]:
    """Split a C++ parameter list at top-level commas."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "<("
        depth -= char in ">)"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + ([current] if current.strip() else [])


# --- what our code uses -----------------------------------------------------------------------
@dataclass(frozen=True)
class Use:
    owner: str
    member: str
    where: str            # file:line, for the failure message
    guard: bool = False   # a hasattr/getattr test: the code copes when the name is missing

    def __str__(self):
        return f"{self.owner}.{self.member} ({self.where})"


def _variable(node: ast.AST) -> Optional[str]:
    """``engine`` for ``engine`` and ``self._engine``; None otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr.lstrip("_")
    return None


def tensorrt_uses(path: Path, variables: Dict[str, str] = TRT_VARIABLES) -> List[Use]:
    """Every TensorRT attribute, method, enum member, keyword argument and overridden callback
    the code in ``path`` uses, by the variable naming of TRT_VARIABLES."""
    tree = ast.parse(path.read_text(), str(path))
    uses: List[Use] = []

    def owner_of(node: ast.AST) -> Optional[str]:
        """The TensorRT class an expression holds: a known variable, or ``trt.X`` (class X)."""
        name = _variable(node)
        if name in variables:
            return variables[name]
        if isinstance(node, ast.Attribute) and _variable(node.value) == "trt":
            return node.attr
        return None

    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute):
            owner = owner_of(node.value)
            if owner is not None and (owner == "tensorrt" or not node.attr.startswith("__")):
                uses.append(Use(owner, node.attr, where))
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") and len(node.args) >= 2:
                owner, name = owner_of(node.args[0]), node.args[1]
                if owner is not None and isinstance(name, ast.Constant) and isinstance(name.value, str):
                    uses.append(Use(owner, name.value, where, guard=True))
            elif isinstance(node.func, ast.Attribute) and owner_of(node.func.value) is not None:
                uses += [Use(f"{owner_of(node.func.value)}.{node.func.attr}()", keyword.arg, where)
                         for keyword in node.keywords if keyword.arg]
        elif isinstance(node, ast.ClassDef):
            # A Python subclass of a TensorRT interface: its methods are callbacks TensorRT calls.
            for base in node.bases:
                owner = owner_of(base)
                if owner is not None and owner != "tensorrt":
                    uses += [Use(owner, item.name, f"{path.name}:{item.lineno}") for item in node.body
                             if isinstance(item, ast.FunctionDef) and not item.name.startswith("__")]
    return uses


def misplaced_uses(documented: Set[Tuple[str, str]], uses: List[Use]) -> List[str]:
    """Uses of a method ``documented`` (the (class, method) pairs of one or more wheels) has on
    other classes only: a call on the wrong object. Pass several wheels' pairs: a wheel's
    linker may drop one class's docstring symbol while keeping another's."""
    misplaced = []
    for use in uses:
        owner = "FreeFunctions" if use.owner == "tensorrt" else use.owner   # module-level functions
        owners = {cls for cls, member in documented if member == use.member}
        if owners and owner not in owners:
            misplaced.append(f"{use} is documented on {', '.join(sorted(owners))}")
    return sorted(set(misplaced))


def missing_uses(bindings: Bindings, uses: List[Use]) -> List[str]:
    """The uses the bindings cannot satisfy, as readable lines. A name the code tests for with
    hasattr/getattr may be missing: every use of it is then behind that test."""
    guarded = {(use.owner, use.member) for use in uses if use.guard}
    missing = []
    for use in uses:
        if (use.owner, use.member) in guarded:
            continue
        if use.owner.endswith("()"):         # a keyword argument: pybind11 stores py::arg names
            ok = bindings.has_string(use.member)
        else:
            ok = bindings.has(use.owner, use.member)
        if not ok:
            missing.append(str(use))
    return sorted(set(missing))


# --- the tensorrt.plugin sources --------------------------------------------------------------
@dataclass
class PluginApi:
    """The public ``tensorrt.plugin`` API of one wheel, read from its Python sources."""
    folder: Path

    def __post_init__(self):
        self.public: Dict[str, ast.AST] = {}
        self.sources: Dict[str, str] = {}
        for path in sorted(self.folder.glob("*.py")):
            text = path.read_text()
            self.sources[path.name] = text
            with warnings.catch_warnings():       # NVIDIA's sources have invalid escapes in docstrings
                warnings.simplefilter("ignore", DeprecationWarning)
                tree = ast.parse(text)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and any(
                        "public_api" in ast.unparse(decorator) for decorator in node.decorator_list):
                    self.public[node.name] = node
        # Module-level objects such as ``op`` exported by public_api(symbol=...) calls.
        for text in self.sources.values():
            self.public.update({name: None for name in re.findall(r"public_api\(symbol=\"(\w+)\"\)", text)})

    def members(self, class_name: str) -> Set[str]:
        node = self.public[class_name]
        return {item.name for item in ast.walk(node) if isinstance(item, ast.FunctionDef)}

    def init_keywords(self, class_name: str) -> Set[str]:
        for item in self.public[class_name].body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                return {arg.arg for arg in item.args.args[1:]}
        return set()
