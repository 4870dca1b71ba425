"""Image decoding and resizing: the one definition used by training and serving alike.

Every image, whatever its file format or mode, becomes an RGB uint8 array of the model's exact
input size through `decode_image` then `prepare` (`to_model_input` with the contract's scale and
crop); training's data loader, export's parity
check and calibration, and the server call the same two functions, so the server sees pixels
prepared exactly as the model saw them in training. Which file names count as images
(`IMAGE_EXTENSIONS`) and how a list of files becomes a batch (`load_images`) live here too.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.contract import LEGACY_SCALE, RESIZE_METHOD, ModelContract
from core.errors import ImageError, ImageTooLarge, UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")  # data sets, maps, calibration
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # PIL modes with more than 8 bits a channel
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64_000_000  # about 8000 x 8000
MIN_SIDE = 8
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR}[RESIZE_METHOD]
REDUCE_STRIP_PIXELS = 1 << 20  # pixels widened at once when a mode must be widened before `reduce`


def decode_image(
    data: bytes,
    name: str = "image",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce_to: int = 0,
) -> Image.Image:
    """Decode encoded bytes (JPEG, PNG, WebP, BMP, ...) into an upright RGB image.

    EXIF orientation is applied; grayscale, palette, alpha, CMYK and 16-bit images become RGB.
    With `reduce_to`, an image whose shorter side is at least twice that is decoded at a reduced
    scale (JPEG's DCT scaling through `draft`, otherwise an integer box `reduce` right after
    decoding) that keeps its shorter side at `reduce_to` or more: what bounds a server's memory per
    image. Raises ImageError naming `name` and the problem; whatever the codec raises on bad bytes
    becomes an ImageError too, quoting at most a short prefix of its message.
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
            if reduce_to and image.format == "JPEG" and min(width, height) >= 2 * reduce_to:
                image.draft("RGB", scaled_size((width, height), reduce_to))
            image.load()
            if reduce_to and (factor := min(image.size) // reduce_to) >= 2:
                image = reduced(image, factor)
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        # Pillow's own limit (about 179 Mpixels at decode) speaks for ours: name the server's.
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{claimed.group(1)} pixels is" if claimed else "more pixels than"
        raise ImageTooLarge(f"{name}: {size} over the {max_pixels}-pixel limit (a decompression bomb)") from error
    except UnidentifiedImageError as error:
        raise ImageError(f"{name}: not a recognised image format") from error
    except MemoryError as error:
        raise ImageTooLarge(f"{name}: too large to decode") from error
    except Exception as error:  # noqa: BLE001 - bad bytes make codecs raise anything (RuntimeError, TypeError, ...)
        raise ImageError(f"{name}: corrupt or truncated image ({clip(f'{type(error).__name__}: {error}')})") from error


def clip(text: str, limit: int = 120) -> str:
    """`text` cut to at most `limit` characters (an ellipsis marks the cut): for error messages that
    quote input or a library's words, which must stay short."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def reduced(image: Image.Image, factor: int) -> Image.Image:
    """`image` shrunk by an integer `factor` with a box filter (Pillow's `reduce`); modes `reduce`
    does not take are widened first (bilevel to L, palette to RGBA, 16-bit to 32-bit), one strip of
    rows at a time, so a 64-Mpixel bilevel image never exists as 64 MB of gray (or a palette one as
    256 MB of RGBA) beside itself; any other mode is left unchanged."""
    wider = {"1": "L", "P": "RGBA", "I;16": "I", "I;16L": "I", "I;16B": "I"}.get(image.mode)
    if not wider:
        try:
            return image.reduce(factor)
        except (ValueError, NotImplementedError):
            return image
    width, height = image.size
    rows = factor * max(1, REDUCE_STRIP_PIXELS // (width * factor))  # whole boxes: the same result as at once
    out = Image.new(wider, (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        out.paste(image.crop((0, top, width, min(height, top + rows))).convert(wider).reduce(factor), (0, top // factor))
    return out


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
    if image.mode in HIGH_BIT_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float32)  # float32: 4 bytes a pixel, not 8, at the pixel limit
        high = full_scale(image, array)
        array *= 255.0 / high
        image = Image.fromarray(np.clip(array, 0, 255, out=array).round(out=array).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_model_input(image: Image.Image, height: int, width: int, scale: int = LEGACY_SCALE) -> np.ndarray:
    """The model's uint8 [3, H, W] (CHW) input from an RGB image.

    With `scale`, the image is scaled (aspect ratio kept) so that its shorter side is `scale`, then
    centre-cropped to height x width; with scale 0, it is resized straight to height x width.
    """
    if scale == LEGACY_SCALE:
        if image.size != (width, height):
            image = image.resize((width, height), RESAMPLING)
    else:
        image = centre_crop(scale_to(image, scale), height, width)
    return to_chw(image)


def prepare(image: Image.Image, contract: ModelContract) -> np.ndarray:
    """`to_model_input` with the preprocessing `contract` records: what serving does to every image."""
    return to_model_input(image, contract.input_height, contract.input_width, contract.scale)


def input_region(size: tuple[int, int], contract: ModelContract) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of an image of `size` that `prepare` turns into the model's
    input, in that image's own pixels: where a CAM belongs on the picture."""
    if contract.scale == LEGACY_SCALE:
        return (0, 0, *size)
    scaled = scaled_size(size, contract.scale)
    left, top, right, bottom = crop_box(scaled, contract.input_height, contract.input_width)
    x, y = size[0] / scaled[0], size[1] / scaled[1]
    return (round(left * x), round(top * y), round(right * x), round(bottom * y))


def to_chw(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def scaled_size(size: tuple[int, int], scale: int) -> tuple[int, int]:
    """(width, height) with the shorter side brought to `scale`, aspect ratio kept."""
    width, height = size
    if min(width, height) == scale:
        return size
    if width <= height:
        return (scale, max(scale, round(height * scale / width)))
    return (max(scale, round(width * scale / height)), scale)


def scale_to(image: Image.Image, scale: int) -> Image.Image:
    """The image resized (aspect ratio kept) so that its shorter side is `scale`; untouched when it is."""
    size = scaled_size(image.size, scale)
    return image if size == image.size else image.resize(size, RESAMPLING)


def crop_box(size: tuple[int, int], height: int, width: int, left: int | None = None, top: int | None = None) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of a height x width crop of an image of `size`; centred
    unless `left`/`top` are given. ImageError if the image is smaller than the crop."""
    image_width, image_height = size
    if image_width < width or image_height < height:
        raise ImageError(f"a {image_width}x{image_height} image is smaller than the {width}x{height} crop")
    left = (image_width - width) // 2 if left is None else left
    top = (image_height - height) // 2 if top is None else top
    return (left, top, left + width, top + height)


def centre_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    box = crop_box(image.size, height, width)
    return image if box == (0, 0, *image.size) else image.crop(box)


def full_scale(image: Image.Image, array: np.ndarray) -> float:
    """The value that means "white" in a high-bit-depth image: 65535 for 16-bit modes, and for 32-bit
    integer or float images whose values exceed 255; 255 otherwise."""
    return 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def image_files(source: Path, flag: str = "--calibration-data") -> list[str]:
    """Image paths from a folder (recursively, sorted) or a text file with one path per line."""
    if source.is_dir():
        return sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        return [line for line in lines if line and not line.startswith("#")]
    raise UserError(f"{flag} {source}: no such folder or list file")


def spread(items: Sequence, limit: int) -> list:
    """Up to `limit` items taken evenly across the list (lists of images are often sorted by class)."""
    if len(items) <= limit:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def load_images(paths: Sequence[str], height: int, width: int, scale: int = LEGACY_SCALE) -> np.ndarray:
    """uint8 [N, 3, H, W] of the readable images among `paths`, prepared as in training and serving."""
    return load_labelled_images(paths, [-1] * len(paths), height, width, scale)[0]


def load_labelled_images(
    paths: Sequence[str], labels: Sequence[int], height: int, width: int, scale: int = LEGACY_SCALE
) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) for the readable images among `paths`; unreadable ones are skipped with a warning."""
    arrays, kept = [], []
    for path, label in zip(paths, labels):
        try:
            arrays.append(to_model_input(read_image(path), height, width, scale))
            kept.append(label)
        except ImageError as error:
            log.warning("skipping %s", error)
    images = np.stack(arrays) if arrays else np.zeros((0, 3, height, width), dtype=np.uint8)
    return images, np.asarray(kept, dtype=np.int64)
