"""Frame files -> RGB uint8 frames at the model size (docs/contract.md §2, input ``frames``).

Upstream resizes with torchvision ``T.Resize([256, 128])`` on a PIL image, i.e. PIL's
``Image.resize((128, 256), BILINEAR)``. PIL's bilinear is not OpenCV's: when it shrinks an axis
it widens the triangle filter by the scale factor (antialiasing), and it works in 22-bit fixed
point, one axis at a time, rounding to uint8 in between. Measured against PIL on photo-like
crops, ``cv2.INTER_LINEAR`` is off by 1 grey level where both axes grow but by up to ~40 where
one shrinks; ``cv2.INTER_AREA`` is off by up to ~30 when shrinking and ~70 when growing. So the
resize here is a small NumPy re-implementation of PIL's separable filter that reproduces it bit
for bit (MARS crops are already 256x128 and skip it); OpenCV only decodes, and its
libjpeg-turbo gives the same pixels as PIL's.

Decoding uses ``cv2.IMREAD_UNCHANGED`` on purpose: ``IMREAD_COLOR`` would apply EXIF orientation,
which PIL's ``Image.open(...).convert('RGB')`` (what upstream does) does not.
"""
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional, Tuple, Union

import numpy as np

from keyreid.contract import IMAGE_HEIGHT, IMAGE_WIDTH
from keyreid.errors import KeyreidError
from keyreid.lazy import require

PathLike = Union[str, Path]
CropSize = Tuple[int, int]    # (width, height) of the original crop, in pixels
PassOrder = Literal["horizontal_first", "pillow13"]
PASS_ORDERS = ("horizontal_first", "pillow13")

# Frames whose header declares a larger side are refused before decoding: person crops are a
# few hundred pixels, and a 20000x20000 PNG of 0.4 MB would decode to 1.2 GB.
DEFAULT_MAX_FRAME_SIDE = 4096

# Pillow's Resample.c works in fixed point with this many fractional bits for 8-bit images.
_PIL_PRECISION_BITS = 32 - 8 - 2


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, ...); C4, C8 and CC are other segments.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def declared_size(encoded: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a PNG or JPEG header, without decoding; None if neither can be read."""
    if encoded[:8] == _PNG_SIGNATURE and encoded[12:16] == b"IHDR" and len(encoded) >= 24:
        return int.from_bytes(encoded[16:20], "big"), int.from_bytes(encoded[20:24], "big")
    if encoded[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(encoded):
        if encoded[position] != 0xFF:
            return None
        marker = encoded[position + 1]
        if marker == 0xFF:                      # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):   # markers without a length
            position += 2
            continue
        length = int.from_bytes(encoded[position + 2:position + 4], "big")
        if marker in _JPEG_SOF and position + 9 <= len(encoded):
            height = int.from_bytes(encoded[position + 5:position + 7], "big")
            width = int.from_bytes(encoded[position + 7:position + 9], "big")
            return width, height
        position += 2 + length
    return None


def max_frame_bytes(max_side: int) -> int:
    """Largest frame file accepted for frames of at most ``max_side`` pixels per side: 8-bit RGBA
    pixels uncompressed, plus 16 MiB of metadata."""
    return max_side * max_side * 4 + (16 << 20)


def decode_frame(path: PathLike, max_side: int = DEFAULT_MAX_FRAME_SIDE) -> np.ndarray:
    """Read an image file into RGB uint8 [H, W, 3] at its own size.

    Grayscale is replicated to three channels and an alpha channel is dropped (as PIL's
    ``convert('RGB')`` does); anything else, or a file OpenCV cannot decode, is a KeyreidError
    naming the file. A JPEG or PNG whose header declares a side above ``max_side`` pixels, or a
    file that is neither, is refused before any pixel is decoded.
    """
    cv2 = require("cv2")
    path = Path(path)
    try:
        file_bytes = path.stat().st_size
        # No JPEG or PNG of an allowed size is bigger than its raw pixels plus its metadata: a
        # bigger file is refused before it is read into memory.
        if file_bytes > max_frame_bytes(max_side):
            raise KeyreidError(f"frame {path} is {file_bytes / 2**20:.0f} MiB, more than an image of at most "
                               f"{max_side} pixels per side can take (--max-frame-side)")
        encoded = np.fromfile(str(path), dtype=np.uint8)   # np.fromfile: non-ASCII paths work
    except OSError as exc:
        raise KeyreidError(f"cannot read frame {path}: {exc.strerror or exc}") from exc
    # The whole file: a JPEG's size header may follow large EXIF or ICC segments.
    size = declared_size(encoded.tobytes())
    if size is None:
        raise KeyreidError(f"cannot decode frame {path}: not a JPEG or PNG image")
    if max(size) > max_side:
        raise KeyreidError(f"frame {path} is {size[0]}x{size[1]} pixels, above the limit of "
                           f"{max_side} per side (--max-frame-side)")
    try:
        image = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) if encoded.size else None
    except cv2.error as exc:
        raise KeyreidError(f"cannot decode frame {path}: {exc}") from exc
    if image is None:
        raise KeyreidError(f"cannot decode frame {path}: not a readable image")
    if image.dtype != np.uint8:
        raise KeyreidError(f"frame {path} has {image.dtype} pixels; only 8-bit images are supported")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise KeyreidError(f"frame {path} has shape {image.shape}; expected 1, 3 or 4 channels")


@lru_cache(maxsize=64)
def _pil_bilinear_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """PIL's BILINEAR coefficients for one axis: (source indices, int weights), both [out, taps].

    Follows Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc``: the triangle filter's
    support grows with the downscale factor; weights are normalised per output pixel in double
    precision and then rounded to fixed point. Unused taps get weight 0 and index 0.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale            # the triangle's support, 1, widened when shrinking
    num_taps = int(np.ceil(support)) * 2 + 1
    indices = np.zeros((out_size, num_taps), dtype=np.intp)
    weights = np.zeros((out_size, num_taps), dtype=np.int32)
    for out_index in range(out_size):
        center = (out_index + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), in_size)
        taps = np.arange(first, stop)
        tap_weights = np.maximum(1.0 - np.abs((taps - center + 0.5) * (1.0 / filter_scale)), 0.0)
        total = tap_weights.sum()
        if total != 0.0:
            tap_weights = tap_weights / total
        fixed = tap_weights * (1 << _PIL_PRECISION_BITS)
        # Pillow rounds half away from zero via int(x +/- 0.5); the weights are never negative.
        indices[out_index, :taps.size] = taps
        weights[out_index, :taps.size] = (fixed + 0.5).astype(np.int32)
    indices.setflags(write=False)
    weights.setflags(write=False)
    return indices, weights


def _resample_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One PIL fixed-point pass along ``axis`` (0 = rows/height, 1 = columns/width).

    int32 is wide enough, as in Pillow: each sum is at most 255 * 2**22 plus rounding slack.
    """
    indices, weights = _pil_bilinear_taps(image.shape[axis], out_size)
    out_shape = image.shape[:axis] + (out_size,) + image.shape[axis + 1:]
    weight_shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    accumulator = np.full(out_shape, 1 << (_PIL_PRECISION_BITS - 1), dtype=np.int32)
    product = np.empty(out_shape, dtype=np.int32)
    for tap in range(indices.shape[1]):
        tap_weights = weights[:, tap].reshape(weight_shape)
        np.multiply(np.take(image, indices[:, tap], axis=axis), tap_weights, out=product)
        accumulator += product
    accumulator >>= _PIL_PRECISION_BITS
    return np.clip(accumulator, 0, 255).astype(np.uint8)


def resize_like_pil(image: np.ndarray, width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT,
                    pass_order: PassOrder = "horizontal_first") -> np.ndarray:
    """Resize RGB uint8 [H, W, 3] to [height, width, 3] exactly as PIL's BILINEAR resize does.

    An axis that already has the target size is left alone. The two passes round to uint8 in
    between, so their order changes pixels by one grey level. Args:
        pass_order: ``"horizontal_first"`` is Pillow up to 12.0 at least, including the 11.2.1
            that upstream pins (so the checkpoint saw this). ``"pillow13"`` is Pillow 13's rule:
            vertical first when the height shrinks by more than twice as many pixels as the width.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise KeyreidError(f"resize expects an [H, W, C] uint8 image, got {image.dtype} {image.shape}")
    if pass_order not in PASS_ORDERS:
        raise KeyreidError(f"pass_order must be one of {PASS_ORDERS}, got {pass_order!r}")
    in_height, in_width = image.shape[:2]
    height_shrink, width_shrink = in_height - height, in_width - width
    vertical_first = pass_order == "pillow13" and height_shrink > 0 and height_shrink > 2 * width_shrink
    axes = ((0, height), (1, width)) if vertical_first else ((1, width), (0, height))
    for axis, size in axes:
        if image.shape[axis] != size:
            image = _resample_axis(image, size, axis)
    return np.ascontiguousarray(image)


def load_frame(path: PathLike, max_side: int = DEFAULT_MAX_FRAME_SIDE) -> Tuple[np.ndarray, CropSize]:
    """Decode and resize one frame: (RGB uint8 [256, 128, 3], original (width, height))."""
    image = decode_frame(path, max_side)
    crop_size = (int(image.shape[1]), int(image.shape[0]))
    return resize_like_pil(image), crop_size


def load_frame_pil(path: PathLike) -> Tuple[np.ndarray, CropSize]:
    """Upstream's own path, for tests: ``Image.open(path).convert('RGB').resize((128, 256), BILINEAR)``.

    Pillow is a test-only dependency, so it is imported here and not at module load.
    """
    try:
        image_module = require("PIL.Image")
    except KeyreidError as exc:
        raise KeyreidError("Pillow is not installed (only the reference path needs it): "
                           "pip install pillow") from exc
    try:
        with image_module.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise KeyreidError(f"cannot decode frame {path}: {exc}") from exc
    crop_size = image.size
    resized = image.resize((IMAGE_WIDTH, IMAGE_HEIGHT), image_module.BILINEAR)
    return np.asarray(resized, dtype=np.uint8), crop_size
