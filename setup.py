"""keyreid: deployment package and optimised inference engine for KeyRe-ID.

One import package, ``keyreid``, whose subpackages are the top-level folders:
``keyreid.kernels`` -> kernels/, ``keyreid.export`` -> export/, ``keyreid.runtime`` -> runtime/.
"""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# Import package -> folder. Subfolders with an __init__.py become subpackages on their own
# (runtime/x/ -> keyreid.runtime.x), so a new one needs no edit here.
PACKAGE_FOLDERS = {
    "keyreid": "keyreid",
    "keyreid.kernels": "kernels",
    "keyreid.export": "export",
    "keyreid.runtime": "runtime",
    "keyreid.benchmarks": "benchmarks",
}
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "keyreid" / "__init__.py").read_text()).group(1)

RUNTIME = ["numpy>=1.24", "opencv-python-headless>=4.8", "onnxruntime>=1.17"]
# Any recent torch works; the README pins the CPU build for CPU-only machines.
EXPORT = ["torch>=2.1", "onnx>=1.16", "onnxscript>=0.1"]
GALLERY = ["faiss-cpu>=1.7.4"]     # large galleries (runtime/results/gallery_index.py); NumPy needs nothing
# OpenVINO's CPU plugin as a second .onnx backend; onnx inlines the file's local functions,
# which OpenVINO's ONNX frontend does not (runtime/backends/openvino.py). Tested with 2026.4.1.
OPENVINO = ["openvino>=2026.0", "onnx>=1.16"]
# int8 IR for OpenVINO (export/to_openvino.py): NNCF's post-training quantisation. nncf 3.4.0
# installs without torch and leaves numpy < 2 alone (it pulls scikit-learn, pydot, rich, ninja,
# safetensors, tabulate, psutil, narwhals); the runtime never imports it.
OPENVINO_INT8 = OPENVINO + ["nncf>=3.4"]
# setuptools: tests/test_install.py installs offline (--no-build-isolation) with the one installed,
# which pyproject.toml's minimum must cover.
# Batch embedding across machines (runtime/batch.py on Ray Data); pyarrow, which Ray Data brings,
# writes its Parquet output. Tested with 2.60; below 2.64, which drops the way runtime/serving/ray_pipeline.py
# bounds an actor's restarts (max_restarts through map_batches' ray_remote_args).
RAY = ["ray[data]>=2.50,<2.64", "pyarrow>=14"]
# The archive gallery (runtime/results/archive_gallery.py): LanceDB, embedded, in a folder on disk or on
# object storage; reads batch.py's Parquet output. Tested with 0.40.
ARCHIVE = ["lancedb>=0.25", "pyarrow>=14"]
TEST = (["pytest>=7", "pytest-benchmark>=4", "pillow>=9", "scipy>=1.10", "setuptools>=70.1"]
        + GALLERY + OPENVINO_INT8 + RAY + ARCHIVE)
# The Triton client (engine grpc:// and http://) and Triton's ModelConfig protobuf (repository checks).
TRITON = ["tritonclient[grpc,http]>=2.40"]
# PyTriton bundles a CPU-capable tritonserver (Linux x86_64/aarch64, glibc >= 2.35, about 190 MB
# installed); runtime/serve_triton.py and the loopback tests run on it. It pins numpy < 2 (and
# older OpenCV and protobuf with it), so the test extra leaves it out: the Triton tests build an
# environment of their own from this extra (benchmarks/triton_server_env.py) and start the server there.
TRITON_SERVER = TRITON + ['nvidia-pytriton>=0.5; platform_system == "Linux" and platform_machine in "x86_64 aarch64"']



def find_packages_in_folders(package_folders):
    """Every package under each folder of ``package_folders``: the folder itself and each
    subfolder that holds an ``__init__.py``, named by its import path."""
    packages = []
    for package, folder in package_folders.items():
        root = HERE / folder
        for init in sorted(root.rglob("__init__.py")):
            packages.append(".".join((package, *init.parent.relative_to(root).parts)))
    return packages


setup(
    name="keyreid",
    version=VERSION,
    description="Deploy KeyRe-ID (keypoint-guided video person re-identification): ONNX, TensorRT, batched runtime",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages_in_folders(PACKAGE_FOLDERS),
    package_dir=PACKAGE_FOLDERS,
    # The fused kernel is compiled on first use (NVRTC or nvcc), so its sources ship with the package.
    package_data={"keyreid.kernels": ["*.cu", "*.cuh", "*.cpp"]},
    install_requires=RUNTIME,
    # One command for every tool (keyreid/command.py); the files stay runnable as scripts.
    entry_points={"console_scripts": ["keyreid = keyreid.command:main"]},
    extras_require={
        "runtime": [],
        "mars": ["scipy>=1.10"],    # reads MARS's info/*.mat files
        "export": EXPORT,
        "gallery": GALLERY,
        "openvino": OPENVINO,
        "openvino-int8": OPENVINO_INT8,
        "triton": TRITON,
        "triton-server": TRITON_SERVER,
        "ray": RAY,
        "archive": ARCHIVE,
        "test": EXPORT + TEST + TRITON,
        "gpu": ["onnxruntime-gpu>=1.17", "tensorrt>=10", "cuda-python>=12"],
    },
)
