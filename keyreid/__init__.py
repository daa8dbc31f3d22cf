"""keyreid: deploy KeyRe-ID video person re-identification models.

Subpackages map onto the repository's folders and follow the data flow
checkpoint -> deploy model -> ONNX -> engine -> runner -> embeddings:

- ``keyreid.kernels``: the ``KeypointPartPool`` op (keypoints -> part weights) in every form.
- ``keyreid.export``: checkpoint loading, the reference and deploy models, ONNX export.
- ``keyreid.runtime``: engines, the batched runner and the command-line tools (no torch).

What all of them share lives here: the I/O contract (``contract``), the CPU's instruction-set
class (``cpu_features.cpu_isa``), int8 recipes per CPU class (``int8_targets``), the tolerance
table (``tolerances``), the comparator, errors and file writing.
"""
from keyreid.errors import KeyreidError

__version__ = "0.1.0"

__all__ = ["KeyreidError", "__version__"]
