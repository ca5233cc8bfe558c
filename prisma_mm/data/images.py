"""Turning any image a user hands us into an 8-bit RGB PIL image.

Handles every PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F …), uint8 / uint16 / float arrays
(HW, HWC with 1, 3 or 4 channels) and tensors (CHW or HW, uint8 or float in [0, 1]).
Transparent pixels are composited onto white, 16-bit data is scaled to 8 bits.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from prisma_mm.errors import PrismaError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = 65535 if array.max(initial=0) > 255 else 255
        return (array.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return (array * scale).round().clip(0, 255).astype(np.uint8)
    raise PrismaError(f"image array has dtype {array.dtype}; expected uint8, uint16 or float")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise PrismaError(
            f"image array has shape {tuple(array.shape)}; expected HW, HWC (C = 1, 3 or 4) or CHW"
        )
    array = np.ascontiguousarray(_to_uint8(array))
    return Image.fromarray(array)  # uint8 HW -> L, HWx3 -> RGB, HWx4 -> RGBA


def to_pil_rgb(image: Any) -> Image.Image:
    """Any supported image as an 8-bit RGB PIL image."""
    if isinstance(image, str | Path):
        path = Path(image).expanduser()
        if not path.exists():
            raise PrismaError(f"image file {str(image)!r} does not exist: check the path")
        if not path.is_file():
            raise PrismaError(f"image path {str(image)!r} is not a file: pass an image file")
        image = load_image(path)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype == torch.bfloat16:
            image = image.float()
        image = _from_array(image.numpy())
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    if not isinstance(image, Image.Image):
        raise PrismaError(
            f"cannot read an image from a {type(image).__name__}: "
            "pass a PIL image, a numpy array or a tensor"
        )
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file as RGB; a damaged file raises :class:`BadImage`."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise BadImage(f"{path}: empty file (0 bytes)")
    return _decode(path, str(path))


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode image bytes (from a shard) as RGB; a damaged image raises :class:`BadImage`."""
    if not data:
        raise BadImage(f"{name}: empty file")
    return _decode(io.BytesIO(data), name)


_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


def _decode(source: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with Image.open(source) as handle:
            handle.load()
            return to_pil_rgb(handle)
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as error:
        raise BadImage(f"{name}: {error.__class__.__name__}: {error}") from error


class BadImage(PrismaError):
    """An input that is not a readable image; data sources skip and count these, and a
    user's own call (``model.preprocess(path)``) sees it as the one-line PrismaError it is."""
