"""One engine interface for every backend, Polygraphy style.

An :class:`Engine` is a context manager: ``activate()`` loads the model, ``infer(feed)`` runs a
batch given as name -> array, ``deactivate()`` frees what ``activate()`` took. Backends are small
subclasses implementing the ``*_impl`` hooks; everything that is the same for every backend (the
contract check of a model's inputs and outputs, the check of every feed before it reaches the
backend) lives here, so a caller never writes ``if backend == "trt"``.

Construction is cheap and lazy (it stores arguments); the heavy work and the optional heavy
imports (onnxruntime, tensorrt, cuda-python) happen in ``activate()``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from keyreid.contract import CLIP_FRAMES, NUM_PARTS, TensorSpec, camera_problem, input_specs, output_specs
from keyreid.errors import KeyreidError
from keyreid.model_metadata import ModelMetadata



@dataclass(frozen=True)
class FoundTensor:
    """What a backend reports about one model input or output, before the contract check.

    ``dtype`` is None when the backend's element type has no NumPy equivalent; ``shape`` holds
    None for a dynamic axis.
    """
    name: str
    dtype: Optional[np.dtype]
    shape: Tuple[Optional[int], ...]


@dataclass(frozen=True)
class EngineInfo:
    """What an activated engine knows about itself; returned by ``activate_impl``."""
    input_specs: Tuple[TensorSpec, ...]
    output_specs: Tuple[TensorSpec, ...]
    max_batch: Optional[int]       # None: no limit
    num_cameras: Optional[int]     # None: unknown, only the lower bound -1 is checked
    # what the model file says about itself; None only for a Triton model whose configuration
    # carries no keyreid parameters (a server keyreid's repository writer did not set up)
    metadata: Optional[ModelMetadata] = None


def _describe_shape(shape: Sequence[object]) -> str:
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


def _check_tensor(kind: str, found: FoundTensor, expected: TensorSpec, problems: list) -> None:
    """Append to ``problems`` every way ``found`` differs from the contract's ``expected``."""
    if found.dtype != expected.dtype:
        found_type = "an element type with no NumPy equivalent" if found.dtype is None else found.dtype.name
        problems.append(f"{kind} '{found.name}' has {found_type}; the contract needs {expected.dtype.name}")
    if len(found.shape) != len(expected.shape):
        problems.append(f"{kind} '{found.name}' has shape {_describe_shape(found.shape)}; "
                        f"the contract needs {_describe_shape(expected.shape)}")
        return
    for axis, (got, want) in enumerate(zip(found.shape, expected.shape)):
        if want == "N":
            if got is not None:
                problems.append(f"the batch axis of {kind} '{found.name}' is fixed at {got}; "
                                "the contract needs a dynamic batch (N)")
        elif isinstance(want, int) and got != want:
            shown = "dynamic" if got is None else str(got)
            problems.append(f"axis {axis} of {kind} '{found.name}' is {shown}; the contract needs {want}")


def _embedding_length(embedding: Optional[FoundTensor], metadata: Optional[ModelMetadata],
                      problems: list) -> Optional[int]:
    """The model's embedding length if it is a valid one, else None (with the reason in ``problems``)."""
    if embedding is None or len(embedding.shape) != 2:
        return None     # reported by the generic check
    length = embedding.shape[1]
    clip_frames = metadata.clip_frames if metadata else CLIP_FRAMES
    units = 1 + NUM_PARTS * clip_frames    # length = model width * units (docs/contract.md §2)
    if length is None:
        problems.append("output 'embedding' has a dynamic length; the contract needs a fixed one")
        return None
    if metadata is not None and length != metadata.embedding_dim:
        problems.append(f"output 'embedding' has length {length}; the file's metadata says {metadata.embedding_dim}")
        return None
    if length <= 0 or length % units:
        problems.append(f"output 'embedding' has length {length}, not a multiple of {units} "
                        f"(model width * (1 + {NUM_PARTS} parts * {clip_frames} frames))")
        return None
    return length


def check_io(source: object, inputs: Sequence[FoundTensor], outputs: Sequence[FoundTensor],
             metadata: Optional[ModelMetadata]) -> Tuple[Tuple[TensorSpec, ...], Tuple[TensorSpec, ...]]:
    """Check a model's inputs and outputs against docs/contract.md §6 and return the engine's specs.

    The clip length, frame size and embedding length come from the file's ``metadata``
    (keyreid/model_metadata.py); the model's tensors must agree with it. Without metadata (a
    Triton model configured by hand) the contract's geometry applies and the embedding length is
    read from the model: a fixed multiple of 25. Every problem is listed in one KeyreidError
    naming ``source``.
    """
    problems: list = []
    found_inputs = {tensor.name: tensor for tensor in inputs}
    found_outputs = {tensor.name: tensor for tensor in outputs}
    clip_frames = metadata.clip_frames if metadata else CLIP_FRAMES
    expected_inputs = (input_specs(metadata.clip_frames, metadata.image_height, metadata.image_width)
                       if metadata else input_specs())

    embedding_length = _embedding_length(found_outputs.get("embedding"), metadata, problems)
    if embedding_length is not None:
        expected_outputs = output_specs(embedding_length // (1 + NUM_PARTS * clip_frames), clip_frames)
    else:   # already reported; check the rest of the tensor against an open length
        embedding, part_weights = output_specs()
        expected_outputs = (TensorSpec(embedding.name, embedding.dtype, ("N", None), embedding.meaning),
                            part_weights)

    for kind, found, expected in (("input", found_inputs, expected_inputs), ("output", found_outputs, expected_outputs)):
        expected_names = [spec.name for spec in expected]
        for spec in expected:
            if spec.name in found:
                _check_tensor(kind, found[spec.name], spec, problems)
            else:
                problems.append(f"missing {kind} '{spec.name}' ({spec.dtype.name} {_describe_shape(spec.shape)})")
        problems += [f"unexpected {kind} '{name}' (the contract has {', '.join(expected_names)})"
                     for name in found if name not in expected_names]

    if problems:
        raise KeyreidError(f"{source}: does not match the KeyRe-ID I/O contract "
                           "(docs/contract.md section 6):\n  - " + "\n  - ".join(problems))
    return expected_inputs, expected_outputs


def check_feed(feed: Mapping[str, np.ndarray], input_specs: Sequence[TensorSpec],
               max_batch: Optional[int] = None, num_cameras: Optional[int] = None) -> int:
    """Check one batch against the engine's input specs; return its batch size.

    Runs before the backend sees anything, so a wrong feed gives one readable KeyreidError
    instead of a backend-specific crash (or, worse, a silent cast).
    """
    if not isinstance(feed, Mapping):
        raise KeyreidError(f"an engine feed is a dict of input name -> array, got {type(feed).__name__}")
    problems = []
    expected_names = [spec.name for spec in input_specs]
    problems += [f"missing input '{name}'" for name in expected_names if name not in feed]
    problems += [f"unexpected input '{name}' (inputs are {', '.join(expected_names)})"
                 for name in feed if name not in expected_names]
    batch_sizes: Dict[str, int] = {}
    for spec in input_specs:
        value = feed.get(spec.name)
        if value is None:
            continue
        if not isinstance(value, np.ndarray):
            problems.append(f"input '{spec.name}' must be a numpy array, got {type(value).__name__}")
            continue
        if value.dtype != spec.dtype:
            problems.append(f"input '{spec.name}' has dtype {value.dtype}; the engine needs {spec.dtype.name}")
        shape_ok = value.ndim == len(spec.shape) and all(
            want == "N" or got == want for got, want in zip(value.shape, spec.shape))
        if not shape_ok:
            problems.append(f"input '{spec.name}' has shape {list(value.shape)}; "
                            f"the engine needs {_describe_shape(spec.shape)}")
            continue
        batch_sizes[spec.name] = value.shape[0]
    if len(set(batch_sizes.values())) > 1:
        problems.append("inputs disagree on the batch size: "
                        + ", ".join(f"{name} {size}" for name, size in batch_sizes.items()))
    batch = next(iter(batch_sizes.values()), 0)
    if not problems:
        if batch < 1:
            problems.append("the batch is empty")
        elif max_batch is not None and batch > max_batch:
            problems.append(f"batch of {batch} clips is above this engine's maximum of {max_batch}")
    if not problems:
        reasons = (camera_problem(int(index), num_cameras) for index in np.unique(feed["camera"]))
        problems = [reason for reason in reasons if reason]
    if problems:
        raise KeyreidError("bad engine input: " + "; ".join(problems))
    return batch


def check_model_file(path: Path) -> Path:
    """Fail early, with the file's name, on a path that cannot hold a model."""
    if not path.exists():
        raise KeyreidError(f"{path}: engine file does not exist")
    if not path.is_file():
        raise KeyreidError(f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise KeyreidError(f"{path}: engine file is empty")
    return path


class Engine:
    """Runs batches of clips through one model; subclasses implement the ``*_impl`` hooks.

    Use as a context manager (``with open_engine(path) as engine: engine.infer(feed)``) or call
    ``activate()`` / ``deactivate()`` yourself. ``infer`` takes and returns name -> array dicts
    following docs/contract.md §6; feeds are checked against the engine's specs first.
    """

    def __init__(self, path: "str | Path", *, num_cameras: Optional[int] = None):
        """
        Args:
            path: the model file.
            num_cameras: number of cameras C for the camera range check; None reads it from
                the model where the backend can (ONNX metadata ``num_cameras``).
        """
        self.path = Path(path)
        self._num_cameras_override = num_cameras
        self._info: Optional[EngineInfo] = None

    backend = ""     # the backend's name (backends/registry.py); set by each subclass

    # --- hooks for backends -------------------------------------------------------------
    def activate_impl(self) -> EngineInfo:
        """Load the model and return what it is; raise KeyreidError for a bad file."""
        raise NotImplementedError

    def infer_impl(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run one checked batch; return every output by name."""
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        """Free what ``activate_impl`` took."""
        raise NotImplementedError

    # --- the interface ------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._info is not None

    def activate(self) -> "Engine":
        if self._info is None:
            info = self.activate_impl()
            if self._num_cameras_override is not None:
                info = replace(info, num_cameras=self._num_cameras_override)
            self._info = info
        return self

    def deactivate(self) -> None:
        if self._info is not None:
            self._info = None
            self.deactivate_impl()

    def __enter__(self) -> "Engine":
        return self.activate()

    def __exit__(self, *exc_info) -> None:
        self.deactivate()

    def _active_info(self) -> EngineInfo:
        if self._info is None:
            raise KeyreidError(f"{self.path}: engine is not active; call activate() or use it in a with-block")
        return self._info

    @property
    def input_specs(self) -> Tuple[TensorSpec, ...]:
        return self._active_info().input_specs

    @property
    def output_specs(self) -> Tuple[TensorSpec, ...]:
        return self._active_info().output_specs

    @property
    def max_batch(self) -> Optional[int]:
        """Most clips per ``infer`` call; None means no limit."""
        return self._active_info().max_batch

    @property
    def num_cameras(self) -> Optional[int]:
        """Number of cameras C (valid indices 0..C-1 and -1); None when the model does not say."""
        return self._active_info().num_cameras

    @property
    def metadata(self) -> Optional[ModelMetadata]:
        """What the model file records about itself (heatmap mode, precision, clip length,
        cameras, provenance); None only for a Triton model configured without keyreid's parameters."""
        return self._active_info().metadata

    @property
    def clip_frames(self) -> int:
        """Frames per clip this model takes (from its metadata, checked against its inputs)."""
        return int(self._active_info().input_specs[0].shape[1])

    @property
    def compute_precision(self) -> str:
        """The precision the backend computes in, for banners: by default what the model file
        says it stores (metadata ``precision``); backends that choose their own say so."""
        metadata = self._active_info().metadata
        return metadata.precision if metadata else "as stored in the model"

    @property
    def embedding_dim(self) -> int:
        """Length of one clip embedding, read from the model (19200 for ViT-B)."""
        return int(self._active_info().output_specs[0].shape[1])

    def infer(self, feed: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        info = self._active_info()
        batch = check_feed(feed, info.input_specs, info.max_batch, info.num_cameras)
        outputs = self.infer_impl(dict(feed))
        for spec in info.output_specs:
            array = outputs.get(spec.name)
            expected_shape = (batch,) + tuple(spec.shape[1:])
            if array is None or array.shape != expected_shape:
                got = "nothing" if array is None else list(array.shape)
                raise KeyreidError(f"{self.path}: output '{spec.name}' came back as {got}, "
                                   f"expected {list(expected_shape)}")
        return {spec.name: outputs[spec.name] for spec in info.output_specs}

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"{type(self).__name__}({str(self.path)!r}, {state})"


def run_in_pieces(run: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]],
                  feed: Dict[str, np.ndarray], clips_per_run: Optional[int]) -> Dict[str, np.ndarray]:
    """``run`` on consecutive pieces of ``clips_per_run`` clips (None: the whole batch at once),
    the outputs joined in order. Every clip's result depends on that clip alone, so the pieces
    give what one run would."""
    batch = len(feed["camera"])
    step = clips_per_run or batch
    if step >= batch:
        return run(feed)
    pieces = [run({name: value[start:start + step] for name, value in feed.items()})
              for start in range(0, batch, step)]
    return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}
