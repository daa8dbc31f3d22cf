"""TensorRT backend: runs a serialized TensorRT 10 or 11 engine (``.plan``) with cuda-python.

Written against the TensorRT 10/11 Python API (tensors by name, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); every TensorRT name used here is checked against
the real bindings of both versions by tests/test_tensorrt_bindings.py. Buffers are allocated once
and grow only when a larger batch arrives; pinned host memory, one stream, one synchronisation per
batch; every boolean TensorRT returns and every CUDA error code is checked. A batch is split at
the optimisation profile's maximum and padded up to its minimum, so callers never see the profile.

The plan's sidecar (``model.plan.json``, :mod:`keyreid.plan_sidecar`) is read on load: it
refuses a plan built for another GPU or TensorRT version and gives the camera range and the
ONNX metadata. ``tensorrt`` and ``cuda.bindings`` are imported only when an engine is activated,
so this module imports fine on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.lazy import require
from keyreid.runtime.backends.declaration import Backend, EngineOption
from keyreid.runtime.backends.base import Engine, EngineInfo, FoundTensor, check_io, check_model_file
from keyreid.plan_sidecar import DeviceFacts, check_device, read_sidecar

_log = logging.getLogger(__name__)
# Longest deactivate() waits for a batch still running before leaving its buffers behind.
RELEASE_WAIT_S = 30.0


def _cudart():
    return require("cuda.bindings.runtime")


def cuda_call(result):
    """Unpack a cuda-python ``(err, *values)`` tuple: raise on error, else return the value(s)."""
    cudart = _cudart()
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        name_err, name = cudart.cudaGetErrorName(err)
        shown = name.decode() if name_err == cudart.cudaError_t.cudaSuccess else str(err)
        raise KeyreidError(f"CUDA error {shown}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class _GrowingBuffer:
    """Memory that grows only when asked for more than it holds; ``free`` is idempotent.
    Subclasses name the CUDA allocate/free pair."""

    def __init__(self):
        self.ptr = 0
        self.nbytes = 0

    def _allocate(self, nbytes: int) -> int:
        raise NotImplementedError

    def _release(self, ptr: int) -> None:
        raise NotImplementedError

    def reserve(self, nbytes: int) -> int:
        """Make room for ``nbytes``; return the pointer. Old contents are not kept."""
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(self._allocate(nbytes))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr, self.nbytes = self.ptr, 0, 0
            self._release(ptr)


class DeviceBuffer(_GrowingBuffer):
    """GPU memory."""

    def _allocate(self, nbytes: int) -> int:
        return cuda_call(_cudart().cudaMalloc(nbytes))

    def _release(self, ptr: int) -> None:
        cuda_call(_cudart().cudaFree(ptr))


class PinnedBuffer(_GrowingBuffer):
    """Page-locked host memory (fast, truly asynchronous copies), viewed as NumPy arrays."""

    def _allocate(self, nbytes: int) -> int:
        return cuda_call(_cudart().cudaMallocHost(nbytes))

    def _release(self, ptr: int) -> None:
        cuda_call(_cudart().cudaFreeHost(ptr))

    def view(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """An array over the start of this buffer; valid until the next ``reserve``/``free``."""
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = (ctypes.c_uint8 * count).from_address(self.ptr)
        return np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)


class CudaStream:
    """One CUDA stream; ``destroy`` is idempotent."""

    def __init__(self):
        self.handle = cuda_call(_cudart().cudaStreamCreate())

    def synchronize(self) -> None:
        cuda_call(_cudart().cudaStreamSynchronize(self.handle))

    def destroy(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            cuda_call(_cudart().cudaStreamDestroy(handle))


def _numpy_dtype(trt, trt_dtype) -> Optional[np.dtype]:
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except (TypeError, KeyError):     # bf16, fp8, int4: no NumPy equivalent
        return None


def free_all(frees: Sequence[Callable[[], None]]) -> None:
    """Call every free (of a buffer, a stream) even when one fails; then raise the first
    failure, so one bad free never leaks the others."""
    first_error = None
    for free in frees:
        try:
            free()
        except KeyreidError as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


def split_batch(batch: int, min_batch: int, max_batch: int) -> Iterator[Tuple[int, int, int]]:
    """``(start, stop, run_size)`` chunks covering ``batch`` clips: at most ``max_batch`` each,
    run at ``run_size`` >= ``min_batch`` (the chunk padded by repeating its last clip)."""
    for start in range(0, batch, max_batch):
        stop = min(start + max_batch, batch)
        yield start, stop, max(stop - start, min_batch)


def pad_feed(feed: Dict[str, np.ndarray], start: int, stop: int, size: int) -> Dict[str, np.ndarray]:
    """Clips ``start:stop`` of ``feed``, padded to ``size`` clips by repeating the last one (a
    valid clip, so padding never trips a range check or produces NaNs)."""
    index = np.minimum(np.arange(start, start + size), stop - 1)
    return {name: np.ascontiguousarray(array[index]) for name, array in feed.items()}


def device_facts(trt, cudart) -> DeviceFacts:
    """The current GPU and TensorRT, as a plan's sidecar records them."""
    device = cuda_call(cudart.cudaGetDevice())
    properties = cuda_call(cudart.cudaGetDeviceProperties(device))
    name = properties.name
    name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
    return DeviceFacts(name, (int(properties.major), int(properties.minor)), trt.__version__)


class TrtEngine(Engine):
    """A serialized TensorRT engine and its sidecar. One execution context: calls are serialised
    by a lock."""

    backend = "tensorrt"

    def __init__(self, path: "str | Path", *, plugin_libraries: Sequence["str | Path"] = (),
                 num_cameras: Optional[int] = None):
        """
        Args:
            path: the ``.plan`` file, built for this GPU and TensorRT version, with its sidecar
                ``<path>.json`` beside it.
            plugin_libraries: shared libraries to load into the plugin registry before
                deserializing. Plans built with the AOT plugin (the default) need none.
            num_cameras: overrides the sidecar's number of cameras.
        """
        super().__init__(path, num_cameras=num_cameras)
        self._plugin_libraries = [Path(library) for library in plugin_libraries]
        self._lock = threading.Lock()
        self._runtime = self._engine = self._context = self._stream = None
        self._input_names: List[str] = []
        self._output_names: List[str] = []
        self._min_batch = self._max_batch = 1
        self._dtypes: Dict[str, Optional[np.dtype]] = {}
        self._device: Dict[str, DeviceBuffer] = {}
        self._host: Dict[str, PinnedBuffer] = {}

    def activate_impl(self) -> EngineInfo:
        check_model_file(self.path)
        trt = require("tensorrt")
        cudart = _cudart()   # imported now, so a missing cuda-python is reported before any work
        sidecar = read_sidecar(self.path)
        check_device(self.path, sidecar, device_facts(trt, cudart))
        try:
            return self._load(trt, sidecar)
        except BaseException:
            with contextlib.suppress(KeyreidError):     # keep the error that stopped activation
                self._release()                         # free whatever was created before it
            raise

    def _load(self, trt, sidecar) -> EngineInfo:
        logger = trt.Logger(trt.Logger.WARNING)
        if not trt.init_libnvinfer_plugins(logger, ""):
            raise KeyreidError("TensorRT could not register its built-in plugins")
        registry = trt.get_plugin_registry()
        for library in self._plugin_libraries:
            if not library.is_file() or registry.load_library(str(library)) is None:
                raise KeyreidError(f"{library}: cannot load TensorRT plugin library")

        self._runtime = runtime = trt.Runtime(logger)
        try:
            plan = self.path.read_bytes()
        except OSError as exc:
            raise KeyreidError(f"{self.path}: cannot be read ({exc.strerror or exc})") from exc
        self._engine = engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise KeyreidError(f"{self.path}: TensorRT cannot deserialize this engine (truncated or not an "
                               "engine, or its plugin library was not loaded)")

        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        inputs = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        outputs = [name for name in names if name not in inputs]

        def found(name):
            shape = tuple(dim if dim >= 0 else None for dim in engine.get_tensor_shape(name))
            return FoundTensor(name, _numpy_dtype(trt, engine.get_tensor_dtype(name)), shape)

        input_specs, output_specs = check_io(self.path, [found(name) for name in inputs],
                                             [found(name) for name in outputs], sidecar.metadata)
        # Profile 0 (the one a fresh context uses) bounds the batch axis of every input.
        profiles = [engine.get_tensor_profile_shape(name, 0) for name in inputs]
        self._min_batch = max(int(shapes[0][0]) for shapes in profiles)
        self._max_batch = min(int(shapes[2][0]) for shapes in profiles)
        if self._min_batch > self._max_batch:
            raise KeyreidError(f"{self.path}: the inputs' optimisation profiles share no batch size")

        self._context = engine.create_execution_context()
        if self._context is None:
            raise KeyreidError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
        self._stream = CudaStream()
        self._input_names, self._output_names = inputs, [spec.name for spec in output_specs]
        self._dtypes = {name: _numpy_dtype(trt, engine.get_tensor_dtype(name)) for name in names}
        self._device = {name: DeviceBuffer() for name in names}
        self._host = {name: PinnedBuffer() for name in names}
        metadata = sidecar.metadata.replace(tensorrt_version=sidecar.tensorrt_version, plugin=sidecar.plugin)
        # No batch limit for callers: infer_impl splits at the profile's maximum.
        return EngineInfo(input_specs, output_specs, None, metadata.num_cameras, metadata)

    @property
    def compute_precision(self) -> str:
        """fp32 files build with TensorRT's default TF32 matmuls (Ampere and newer GPUs); fp16
        files compute in fp16."""
        precision = super().compute_precision
        return "tf32" if precision == "fp32" else precision

    def infer_impl(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        batch = len(feed["camera"])
        results: Dict[str, list] = {name: [] for name in self._output_names}
        with self._lock:
            for start, stop, size in split_batch(batch, self._min_batch, self._max_batch):
                chunk = feed if (start, stop, size) == (0, batch, batch) else pad_feed(feed, start, stop, size)
                try:
                    outputs = self._run_batch(chunk)
                except BaseException:
                    # No copy may still use buffers the next batch frees; keep the original error.
                    with contextlib.suppress(KeyreidError):
                        self._stream.synchronize()
                    raise
                for name, array in outputs.items():
                    results[name].append(array[:stop - start])
        return {name: parts[0] if len(parts) == 1 else np.concatenate(parts) for name, parts in results.items()}

    def _run_batch(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Copy in, enqueue, copy out, one synchronisation (lock held)."""
        cudart = _cudart()
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        context, stream = self._context, self._stream.handle
        for name in self._input_names:
            array = np.ascontiguousarray(feed[name])
            if not context.set_input_shape(name, array.shape):
                raise KeyreidError(f"{self.path}: TensorRT rejected shape {list(array.shape)} for input '{name}'")
            host = self._host[name]
            host.reserve(array.nbytes)
            host.view(array.shape, array.dtype)[...] = array
            device_ptr = self._device[name].reserve(array.nbytes)
            cuda_call(cudart.cudaMemcpyAsync(device_ptr, host.ptr, array.nbytes, to_device, stream))
            if not context.set_tensor_address(name, device_ptr):
                raise KeyreidError(f"{self.path}: TensorRT rejected the address of input '{name}'")

        shapes = {}
        for name in self._output_names:
            shape = tuple(context.get_tensor_shape(name))
            if any(dim < 0 for dim in shape):
                raise KeyreidError(f"{self.path}: TensorRT could not infer the shape of output '{name}'")
            dtype = self._dtypes[name]
            shapes[name] = (shape, dtype)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self._host[name].reserve(nbytes)
            if not context.set_tensor_address(name, self._device[name].reserve(nbytes)):
                raise KeyreidError(f"{self.path}: TensorRT rejected the address of output '{name}'")

        if not context.execute_async_v3(int(stream)):
            raise KeyreidError(f"{self.path}: TensorRT failed to enqueue the batch")
        for name, (shape, dtype) in shapes.items():
            nbytes = int(np.prod(shape)) * dtype.itemsize
            cuda_call(cudart.cudaMemcpyAsync(self._host[name].ptr, self._device[name].ptr, nbytes,
                                             to_host, stream))
        self._stream.synchronize()
        # Copy out of the pinned buffers: the next batch reuses them.
        return {name: self._host[name].view(shape, dtype).copy() for name, (shape, dtype) in shapes.items()}

    def deactivate_impl(self) -> None:
        # A batch still running (a hung GPU, after the runner gave up on it) holds the lock: wait
        # a bounded time, then leave its buffers to the process's exit rather than hang here.
        if not self._lock.acquire(timeout=RELEASE_WAIT_S):
            _log.warning("%s: a batch is still running after %g s; its GPU memory is left to the "
                         "process's exit", self.path, RELEASE_WAIT_S)
            return
        try:
            self._release()
        finally:
            self._lock.release()

    def _release(self) -> None:
        """Free everything activation took, whatever state it got to; frees all even when one
        fails, then raises the first failure."""
        buffers = list(self._device.values()) + list(self._host.values())
        stream = self._stream
        # Context before engine before runtime: each needs the next one alive.
        self._context = self._engine = self._runtime = self._stream = None
        self._device, self._host = {}, {}
        try:
            if stream is not None and stream.handle is not None:
                stream.synchronize()
        finally:
            free_all([buffer.free for buffer in buffers] + ([stream.destroy] if stream is not None else []))


PLUGIN_LIBRARY = EngineOption(
    "--plugin-library", "plugin_libraries",
    "a TensorRT plugin library (.so) to load before the engine (repeatable); "
    "keyreid's own plans need none", type=Path, metavar="LIB", repeatable=True)

BACKEND = Backend(
    name="tensorrt", kinds=("tensorrt",), engine_class=TrtEngine, options=(PLUGIN_LIBRARY,),
    summary="TensorRT .plan/.engine/.trt files on an NVIDIA GPU",
    device="the NVIDIA GPU the plan was built for", needs_gpu=True)
