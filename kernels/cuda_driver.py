"""The fused kernel on a GPU through the CUDA driver API (``cuda.bindings.driver``), no torch.

It does what the TensorRT plugin does with the PTX: compile it for the device
(``cuda_build.compile_ptx``), load it into the device's primary context, and launch an entry
point with ``launch_config(num_clips)`` and the arguments ``(keypoints, crop_size,
part_weights, num_clips)``. The torch CUDA op (``keyreid.kernels.cuda_op``) and
``benchmarks/gpu_check.py`` launch through here, so both exercise the plugin's path.
"""
import ctypes
from functools import lru_cache

from keyreid.contract import HEATMAP_MODES
from keyreid.errors import KeyreidError
from keyreid.kernels.cuda_build import compile_ptx, kernel_name, launch_config
from keyreid.lazy import require

# The kernel's parameters as the driver copies them: three device pointers, then an int32.
_ARGUMENT_TYPES = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)


def _driver():
    return require("cuda.bindings.driver")


def cuda_call(result):
    """Unpack cuda-python's ``(status, *values)``; raise KeyreidError naming a bad status."""
    driver = _driver()
    status, *values = result
    if status != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(status)
        raise KeyreidError(f"CUDA driver error {name.decode() if name else int(status)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> int:
    """Number of CUDA devices the driver sees; raises KeyreidError saying why when none can be."""
    driver = _driver()
    try:
        cuda_call(driver.cuInit(0))
    except KeyreidError as exc:
        raise KeyreidError(f"the CUDA driver does not initialise ({exc})") from exc
    except Exception as exc:    # cuda-python raises when libcuda itself is missing
        raise KeyreidError(f"no CUDA driver is installed ({exc})") from exc
    return cuda_call(driver.cuDeviceGetCount())


class FusedKernel:
    """The three entry points, loaded into one device's primary context (the one torch uses)."""

    def __init__(self, ordinal: int = 0):
        driver = _driver()
        count = device_count()
        if not 0 <= ordinal < count:
            raise KeyreidError(f"CUDA device {ordinal} does not exist ({count} visible)")
        self.device = cuda_call(driver.cuDeviceGet(ordinal))
        attribute = driver.CUdevice_attribute
        self.compute_capability = (
            cuda_call(driver.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.device)),
            cuda_call(driver.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.device)))
        self.ptx = compile_ptx(self.compute_capability)
        self.context = cuda_call(driver.cuDevicePrimaryCtxRetain(self.device))
        with self.current():
            # PTX must end in a NUL byte; the driver JIT-compiles it for this device.
            self.module = cuda_call(driver.cuModuleLoadData(self.ptx.encode() + b"\0"))
            self.functions = {mode: cuda_call(driver.cuModuleGetFunction(self.module, kernel_name(mode).encode()))
                              for mode in HEATMAP_MODES}

    def current(self):
        """Context manager: this device's primary context is current inside it."""
        return _PushedContext(self.context)

    def launch(self, mode: str, keypoints: int, crop_size: int, part_weights: int, num_clips: int,
               stream: int = 0) -> None:
        """Launch the kernel of ``mode`` on ``stream`` (a CUstream handle, 0 = legacy default)
        with device pointers ``keypoints`` [N,4,17,3], ``crop_size`` [N,4,2] and
        ``part_weights`` [N,128,6] (float32, contiguous). Asynchronous: no synchronisation."""
        driver = _driver()
        function = self.functions.get(mode)
        if function is None:
            kernel_name(mode)                  # raises the message naming the valid modes
        (grid_x, grid_y, grid_z), (block_x, block_y, block_z), shared = launch_config(num_clips)
        arguments = ((keypoints, crop_size, part_weights, int(num_clips)), _ARGUMENT_TYPES)
        with self.current():
            cuda_call(driver.cuLaunchKernel(function, grid_x, grid_y, grid_z, block_x, block_y, block_z,
                                            shared, driver.CUstream(stream), arguments, 0))


class _PushedContext:
    def __init__(self, context):
        self.context = context

    def __enter__(self):
        cuda_call(_driver().cuCtxPushCurrent(self.context))
        return self

    def __exit__(self, *exc_info):
        cuda_call(_driver().cuCtxPopCurrent())
        return False


@lru_cache(maxsize=None)
def fused_kernel(ordinal: int = 0) -> FusedKernel:
    """The kernel loaded on device ``ordinal``, built and loaded once per process."""
    return FusedKernel(ordinal)
