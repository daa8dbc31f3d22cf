"""keyreid: deployment package and optimised inference engine for KeyRe-ID.

One import package, ``keyreid``, whose subpackages are the top-level folders:
``keyreid.kernels`` -> kernels/, ``keyreid.export`` -> export/, ``keyreid.runtime`` -> runtime/.
"""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "keyreid" / "__init__.py").read_text()).group(1)

RUNTIME = ["numpy>=1.24", "opencv-python-headless>=4.8", "onnxruntime>=1.17"]
# Any recent torch works; the README pins the CPU build for CPU-only machines.
EXPORT = ["torch>=2.1", "onnx>=1.16", "onnxscript>=0.1"]
TEST = ["pytest>=7", "pytest-benchmark>=4", "pillow>=9", "scipy>=1.10"]

setup(
    name="keyreid",
    version=VERSION,
    description="Deploy KeyRe-ID (keypoint-guided video person re-identification): ONNX, TensorRT, batched runtime",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["keyreid", "keyreid.kernels", "keyreid.export", "keyreid.runtime"],
    package_dir={
        "keyreid": "keyreid",
        "keyreid.kernels": "kernels",
        "keyreid.export": "export",
        "keyreid.runtime": "runtime",
    },
    install_requires=RUNTIME,
    extras_require={
        "runtime": [],
        "mars": ["scipy>=1.10"],    # reads MARS's info/*.mat files
        "export": EXPORT,
        "test": EXPORT + TEST,
        "gpu": ["onnxruntime-gpu>=1.17", "tensorrt>=10", "cuda-python>=12"],
    },
)
