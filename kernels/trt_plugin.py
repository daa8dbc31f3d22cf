"""``keyreid::KeypointPartPool`` in its TensorRT form: an AOT Python plugin (``tensorrt.plugin``).

At build time TensorRT calls the two functions registered here: the shape function
([N, 4, 17, 3] keypoints -> [N, 128, 6] float32 part weights, N symbolic) and ``aot_impl``, which
hands over the fused CUDA kernel of :mod:`keyreid.kernels.cuda_build`: its entry point for the
node's heatmap mode, its PTX compiled for the building GPU, the launch geometry (grid linear in
the symbolic N) and the clip count as the one extra argument. TensorRT stores all of it in the
plan, so the plan runs with no Python and no plugin library.

TensorRT passes an AOT kernel its input tensors, then the extra scalar arguments, then the
output tensors (``tensorrt.plugin.aot_impl``: extra args are "located after the tensor inputs and
before the tensor outputs"), and the fused kernel's entry points are declared in that order:
``(keypoints, crop_size, num_clips, part_weights)``. :func:`check_kernel_arguments` reads the
compiled PTX's entry declaration before it is handed over, so a kernel with any other signature
fails the build with a sentence instead of writing garbage at run time.

Needs TensorRT >= 10.9 (JetPack 6's 10.3 has no ``tensorrt.plugin``; there the node's ONNX
function is built instead: ``to_tensorrt.py --plugin none``). This module imports without
tensorrt; :func:`register_plugin` takes the ``tensorrt.plugin`` module.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the registered
functions' annotations as objects (TensorDesc, str), not strings.
"""
import re
from typing import Dict, List, Tuple

from keyreid.contract import NUM_PARTS, NUM_PATCHES, OP_DOMAIN, OP_NAME
from keyreid.errors import KeyreidError

PLUGIN_ID = f"{OP_DOMAIN}::{OP_NAME}"
# What TensorRT passes the kernel, in order, with the PTX parameter width each needs.
KERNEL_ARGUMENTS = (("keypoints", "b64"), ("crop_size", "b64"), ("num_clips", "b32"), ("part_weights", "b64"))
_PTX_WIDTHS = {"u64": "b64", "s64": "b64", "b64": "b64", "u32": "b32", "s32": "b32", "b32": "b32"}


def _entry_declarations(ptx: str, kernel_name: str) -> "re.Match":
    """The match whose group 1 is entry ``kernel_name``'s parameter declarations."""
    match = re.search(r"\.entry\s+" + re.escape(kernel_name) + r"\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise KeyreidError(f"the compiled kernel has no entry point {kernel_name}")
    return match


def entry_parameters(ptx: str, kernel_name: str) -> List[str]:
    """Widths (``b64``/``b32``) of the parameters of PTX entry ``kernel_name``, in order."""
    types = re.findall(r"\.param\s+\.(\w+)", _entry_declarations(ptx, kernel_name).group(1))
    return [_PTX_WIDTHS.get(kind, kind) for kind in types]


def check_kernel_arguments(ptx: str, kernel_name: str) -> None:
    """Raise unless entry ``kernel_name`` takes exactly what TensorRT passes (KERNEL_ARGUMENTS)."""
    found = entry_parameters(ptx, kernel_name)
    expected = [width for _, width in KERNEL_ARGUMENTS]
    if found != expected:
        wanted = ", ".join(f"{name} ({width})" for name, width in KERNEL_ARGUMENTS)
        raise KeyreidError(f"kernel {kernel_name} takes ({', '.join(found)}), but TensorRT passes an AOT "
                           f"plugin's inputs, extra arguments, then outputs: ({wanted})")


def launch_geometry(num_clips) -> Dict[str, object]:
    """``cuda_build.launch_config`` as KernelLaunchParams keywords, in arithmetic that also works
    on TensorRT's symbolic batch size (launch_config itself wants an int)."""
    from keyreid.kernels import cuda_build

    return {"grid_x": num_clips * cuda_build.BLOCKS_PER_CLIP, "grid_y": 1, "grid_z": 1,
            "block_x": cuda_build.THREADS_PER_BLOCK, "block_y": 1, "block_z": 1,
            "shared_mem": cuda_build.DYNAMIC_SHARED_BYTES}


def register_plugin(trtp, compute_capability: Tuple[int, int]) -> None:
    """Register the plugin with ``trtp`` (the ``tensorrt.plugin`` module), compiling for a GPU of
    ``compute_capability``. Registering twice in one process is a no-op."""
    from keyreid.kernels import cuda_build

    if hasattr(trtp.op, OP_DOMAIN) and hasattr(getattr(trtp.op, OP_DOMAIN), OP_NAME):
        return

    @trtp.register(PLUGIN_ID)
    def part_pool_shape(keypoints: trtp.TensorDesc, crop_size: trtp.TensorDesc,
                        mode: str) -> Tuple[trtp.TensorDesc]:
        part_weights = keypoints.like()      # float32, like the keypoints
        part_weights.shape_expr = trtp.ShapeExprs.from_tuple((keypoints.shape_expr[0], NUM_PATCHES, NUM_PARTS))
        return (part_weights,)

    @trtp.aot_impl(PLUGIN_ID)
    def part_pool_kernel(keypoints: trtp.TensorDesc, crop_size: trtp.TensorDesc, mode: str,
                         outputs: Tuple[trtp.TensorDesc], tactic: int
                         ) -> Tuple[str, str, trtp.KernelLaunchParams, trtp.SymExprs]:
        num_clips = keypoints.shape_expr[0]          # symbolic: the engine's batch size
        kernel_name = cuda_build.kernel_name(mode)
        ptx = cuda_build.compile_ptx(compute_capability)
        check_kernel_arguments(ptx, kernel_name)
        launch = trtp.KernelLaunchParams(**launch_geometry(num_clips))
        extra_args = trtp.SymIntExprs(1)
        extra_args[0] = trtp.SymInt32(num_clips)
        return kernel_name, ptx, launch, extra_args
