"""The fused kernel on a GPU through the CUDA driver API (``cuda.bindings.driver``), no torch.

It does what the TensorRT plugin does with the PTX: compile it for the device
(``cuda_build.compile_ptx``), load it into the device's primary context, and launch an entry
point with ``launch_config(num_clips)`` and the arguments ``(keypoints, crop_size,
num_clips, part_weights)`` (TensorRT's order: inputs, extra scalars, outputs). The torch CUDA op (``keyreid.kernels.cuda_op``) and
``benchmarks/gpu_check.py`` launch through here, so both exercise the plugin's path.
"""
import ctypes
import logging
from functools import lru_cache
from typing import Callable, Tuple, TypeVar

from keyreid.contract import HEATMAP_MODES
from keyreid.errors import KeyreidError
from keyreid.kernels.cuda_build import (KernelImage, build_nvcc_fallback_image, build_ptx_image,
                                        kernel_name, launch_config)
from keyreid.lazy import require

log = logging.getLogger(__name__)
UNSUPPORTED_PTX_VERSION = "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"
Module = TypeVar("Module")


class CudaDriverError(KeyreidError):
    """A CUDA driver call that failed; ``name`` is the driver's, e.g. CUDA_ERROR_INVALID_VALUE."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def _driver():
    return require("cuda.bindings.driver")


def cuda_call(result):
    """Unpack cuda-python's ``(status, *values)``; raise CudaDriverError naming a bad status."""
    driver = _driver()
    status, *values = result
    if status != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(status)
        name = name.decode() if name else str(int(status))
        raise CudaDriverError(name, f"CUDA driver error {name}")
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
        self.context = cuda_call(driver.cuDevicePrimaryCtxRetain(self.device))
        try:
            self.module, self.image = load_kernel_image(self.compute_capability, self._load_module_data)
            self._get_functions(driver)
        except BaseException:           # give back the context this object will never use
            driver.cuDevicePrimaryCtxRelease(self.device)
            raise

    def _load_module_data(self, image: bytes):
        """The module of a PTX or cubin image in this device's context (the driver JIT-compiles
        PTX for the device)."""
        buffer = ctypes.create_string_buffer(image)      # NUL-terminated, as PTX must be
        with self.current():
            return cuda_call(_driver().cuModuleLoadData(ctypes.addressof(buffer)))

    def _get_functions(self, driver) -> None:
        with self.current():
            try:
                self.functions = {mode: cuda_call(driver.cuModuleGetFunction(self.module, kernel_name(mode).encode()))
                                  for mode in HEATMAP_MODES}
            except BaseException:
                driver.cuModuleUnload(self.module)
                raise

    def current(self):
        """Context manager: this device's primary context is current inside it."""
        return _PushedContext(self.context)

    def launch(self, mode: str, keypoints: int, crop_size: int, part_weights: int, num_clips: int,
               stream: int = 0, geometry=None) -> None:
        """Launch the kernel of ``mode`` on ``stream`` (a CUstream handle, 0 = legacy default)
        with device pointers ``keypoints`` [N,4,17,3], ``crop_size`` [N,4,2] and
        ``part_weights`` [N,128,6] (float32, contiguous). Asynchronous: no synchronisation.
        ``geometry`` ((grid), (block), shared bytes) defaults to ``launch_config(num_clips)``;
        gpu_check passes the TensorRT plugin's to check that both give the same bits."""
        driver = _driver()
        function = self.functions.get(mode)
        if function is None:
            kernel_name(mode)                  # raises the message naming the valid modes
        (grid_x, grid_y, grid_z), (block_x, block_y, block_z), shared = geometry or launch_config(num_clips)
        # kernelParams: an array of pointers to each argument, which the driver copies at launch.
        values = (ctypes.c_void_p(keypoints), ctypes.c_void_p(crop_size), ctypes.c_int32(num_clips),
                  ctypes.c_void_p(part_weights))
        parameters = (ctypes.c_void_p * len(values))(*(ctypes.addressof(value) for value in values))
        with self.current():
            cuda_call(driver.cuLaunchKernel(function, grid_x, grid_y, grid_z, block_x, block_y, block_z,
                                            shared, driver.CUstream(stream), ctypes.addressof(parameters), 0))


class _PushedContext:
    def __init__(self, context):
        self.context = context

    def __enter__(self):
        cuda_call(_driver().cuCtxPushCurrent(self.context))
        return self

    def __exit__(self, *exc_info):
        cuda_call(_driver().cuCtxPopCurrent())
        return False


def load_kernel_image(compute_capability: Tuple[int, int],
                      load: Callable[[bytes], Module]) -> Tuple[Module, KernelImage]:
    """``load`` (a driver module load) of the kernel built for ``compute_capability``, and the
    image it took. First the preferred PTX (NVRTC, else nvcc); when the driver refuses it with
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION, which an NVRTC newer than the driver causes, nvcc's
    image for the device (``build_nvcc_fallback_image``). Any other error is raised as is."""
    preferred = build_ptx_image(compute_capability)
    try:
        return load(preferred.data), preferred
    except CudaDriverError as exc:
        if exc.name != UNSUPPORTED_PTX_VERSION:
            raise
    try:
        fallback = build_nvcc_fallback_image(compute_capability)
    except KeyreidError as exc:
        raise KeyreidError(f"{_too_new(preferred)}, and no other compiler can take over ({exc})") from exc
    log.warning("%s; loading %s's %s instead", _too_new(preferred), fallback.compiler, fallback.kind)
    try:
        return load(fallback.data), fallback
    except CudaDriverError as exc:
        if exc.name != UNSUPPORTED_PTX_VERSION:
            raise
        raise KeyreidError(f"{_too_new(preferred)}, nor {fallback.compiler}'s {fallback.kind}: install "
                           f"an NVRTC or CUDA toolkit no newer than the driver") from exc


def _too_new(image: KernelImage) -> str:
    return (f"the CUDA driver ({_driver_version_or_unknown()}) cannot load PTX {_ptx_isa(image.data)} "
            f"from {image.compiler}")


def _driver_version_or_unknown() -> str:
    try:
        return driver_cuda_version()
    except KeyreidError:
        return "version unknown"


def driver_cuda_version() -> str:
    """The newest CUDA version the installed driver supports, e.g. 'CUDA 12.4'."""
    version = cuda_call(_driver().cuDriverGetVersion())
    return f"CUDA {version // 1000}.{version % 1000 // 10}"


def _ptx_isa(ptx: bytes) -> str:
    """The PTX ISA version a PTX text declares, e.g. 'ISA 9.0'."""
    for line in ptx.decode(errors="replace").splitlines():
        if line.startswith(".version"):
            return "ISA " + line.split()[1]
    return "of unknown ISA"


@lru_cache(maxsize=None)
def fused_kernel(ordinal: int = 0) -> FusedKernel:
    """The kernel loaded on device ``ordinal``, built and loaded once per process."""
    return FusedKernel(ordinal)
