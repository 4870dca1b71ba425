"""Image decoding and resizing: the one definition used by training and serving alike.

Every image, whatever its file format or mode, becomes an RGB uint8 array of the model's exact
input size through `decode_image` then `to_model_input`; training's data loader calls the same two
functions, so the server sees pixels prepared exactly as the model saw them in training.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cyborg.errors import UserError
from serving.contract import RESIZE_METHOD

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64_000_000  # about 8000 x 8000
MIN_SIDE = 8
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR}[RESIZE_METHOD]


class ImageError(UserError):
    """An image that cannot be used: empty, corrupt, truncated, too large, too small or animated."""


class ImageTooLarge(ImageError):
    """An image over the byte or pixel limit."""


def decode_image(
    data: bytes,
    name: str = "image",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode encoded bytes (JPEG, PNG, WebP, BMP, ...) into an upright RGB image.

    EXIF orientation is applied; grayscale, palette, alpha, CMYK and 16-bit images become RGB.
    Raises ImageError naming `name` and the problem.
    """
    if not data:
        raise ImageError(f"{name}: empty image data")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{name}: {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{name}: {width}x{height} pixels is over the {max_pixels}-pixel limit")
            if getattr(image, "n_frames", 1) > 1:
                raise ImageError(f"{name}: animated {image.format} images ({image.n_frames} frames) are not supported")
            if min(width, height) < MIN_SIDE:
                raise ImageError(f"{name}: {width}x{height} is too small (at least {MIN_SIDE} pixels a side)")
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageTooLarge(f"{name}: {error}") from error
    except UnidentifiedImageError as error:
        raise ImageError(f"{name}: not a recognised image format") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name}: corrupt or truncated image ({error})") from error


def read_image(path: str | os.PathLike[str], **limits) -> Image.Image:
    """`decode_image` for a file on disk."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ImageError(f"{path}: cannot read ({error.strerror})") from error
    return decode_image(data, name=str(path), **limits)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16-bit scaled down)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / high), 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_model_input(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Resize an RGB image straight to height x width and return uint8 [3, H, W] (CHW)."""
    if image.size != (width, height):
        image = image.resize((width, height), RESAMPLING)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
