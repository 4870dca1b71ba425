"""CAM heatmaps as pictures: a grid upsampled to an image's size, a grayscale PNG, a colour overlay.

numpy and Pillow only: the colour map is matplotlib's "jet" rebuilt from its segment table with
matplotlib's own lookup-table rule (256 entries), so overlays look exactly as they did when
matplotlib drew them, without importing matplotlib (tests/test_heatmaps.py compares the two).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from core.images import RESAMPLING

OVERLAY_ALPHA = 0.45
COLORMAP_SIZE = 256
DEFAULT_MAX_SIDE = 1024  # PNG heatmaps and overlays: longest side, in pixels (serving's --max-heatmap-side)
# matplotlib's "jet": per channel, (x, y) points of a piecewise-linear map from [0, 1] to [0, 1].
JET_SEGMENTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
RESAMPLE_MODES = {"bilinear": RESAMPLING, "nearest": Image.Resampling.NEAREST}


def _lookup_table(points: tuple[tuple[float, float], ...], size: int = COLORMAP_SIZE) -> np.ndarray:
    """matplotlib.colors._create_lookup_table for a continuous segment table (gamma 1)."""
    x = np.array([p[0] for p in points]) * (size - 1)
    y = np.array([p[1] for p in points])
    xind = (size - 1) * np.linspace(0, 1, size)
    ind = np.searchsorted(x, xind)[1:-1]
    distance = (xind[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
    return np.clip(np.concatenate([[y[0]], distance * (y[ind] - y[ind - 1]) + y[ind - 1], [y[-1]]]), 0.0, 1.0)


JET = np.stack([_lookup_table(JET_SEGMENTS[channel]) for channel in ("red", "green", "blue")], axis=1)  # [256, 3]
# The overlay's blend as integer tables: picture weight (1 - alpha) on 0..255 and alpha x 255 x jet,
# in 1/256ths, so an overlay is uint16 arithmetic on uint8 arrays (no float RGBA at any size).
_KEEP = np.round((1 - OVERLAY_ALPHA) * 256 * np.arange(256)).astype(np.uint16)  # [256]
_JET_ADD = np.round(OVERLAY_ALPHA * 255.0 * 256 * JET).astype(np.uint16)  # [256, 3]


def colormap(values: np.ndarray) -> np.ndarray:
    """RGB floats [..., 3] in [0, 1] of the "jet" map for values in [0, 1] (matplotlib's indexing)."""
    index = np.array(values, copy=True)
    index *= COLORMAP_SIZE
    index[index == COLORMAP_SIZE] = COLORMAP_SIZE - 1
    return JET.take(index.astype(int), axis=0, mode="clip")


def upsample(cam: np.ndarray, height: int, width: int, resample: str = "bilinear") -> np.ndarray:
    """A CAM float [h, w] (or a stack [N, h, w]) in [0, 1] resized to [height, width], clipped to [0, 1].

    "bilinear" is the resampling `core.images` uses for model inputs; "nearest" keeps a mask's edges.
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim == 3:
        return np.stack([upsample(one, height, width, resample) for one in cam]) if len(cam) else np.zeros((0, height, width), np.float32)
    image = Image.fromarray(cam, mode="F").resize((width, height), RESAMPLE_MODES[resample])
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def grayscale_png(cam: np.ndarray, width: int, height: int) -> bytes:
    """8-bit grayscale PNG of the CAM at width x height (0 = no evidence, 255 = most)."""
    return encode_png((upsample(cam, height, width) * 255).round().astype(np.uint8))


def colour_index(values: np.ndarray) -> np.ndarray:
    """uint8 indices into the 256-entry colour map for values in [0, 1] (matplotlib's indexing)."""
    return np.minimum(np.asarray(values, dtype=np.float32) * COLORMAP_SIZE, COLORMAP_SIZE - 1).astype(np.uint8)


def blend(picture: np.ndarray, values: np.ndarray) -> np.ndarray:
    """uint8 [H,W,3]: the "jet" colours of `values` (float [H,W] in [0, 1]) blended at OVERLAY_ALPHA
    over `picture` (uint8 [H,W,3]) in uint16 arithmetic; within 1 of the float blend."""
    mixed = _KEEP[picture]
    mixed += _JET_ADD[colour_index(values)]
    mixed += 128
    return (mixed >> 8).astype(np.uint8)


def overlay_png(cam: np.ndarray, picture: np.ndarray, alpha: float = OVERLAY_ALPHA) -> bytes:
    """RGB PNG: the CAM through the "jet" colour map blended over picture (uint8 [H,W,3])."""
    height, width = picture.shape[:2]
    if alpha == OVERLAY_ALPHA:
        return encode_png(blend(picture, upsample(cam, height, width)))
    colours = colormap(upsample(cam, height, width))
    blended = (1 - alpha) * picture.astype(np.float32) + alpha * 255.0 * colours
    return encode_png(np.clip(blended, 0, 255).round().astype(np.uint8))


def bounded(size: tuple[int, int], region: tuple[int, int, int, int] | None, max_side: int = DEFAULT_MAX_SIDE):
    """(size, region) of a picture of `size` (width, height) scaled down, aspect ratio kept, so that its
    longer side is at most `max_side`, and the region the model saw carried along to it; unchanged
    when the picture is within the bound. Heatmaps are drawn at this size."""
    width, height = size
    region = (0, 0, width, height) if region is None else tuple(region)
    if max(width, height) <= max_side:
        return (width, height), region
    factor = max_side / max(width, height)
    new = (max(1, round(width * factor)), max(1, round(height * factor)))
    x, y = new[0] / width, new[1] / height
    left, top, right, bottom = region
    box = (round(left * x), round(top * y), round(right * x), round(bottom * y))
    box = (box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1))  # never an empty region
    return new, box


def render(kind: str, cam: np.ndarray, picture: np.ndarray, region: tuple[int, int, int, int] | None = None) -> bytes:
    """PNG bytes of heatmap `kind` ("png" or "overlay") for a picture uint8 [H,W,3].

    `region` (left, top, right, bottom) is the part of the picture the model saw (`core.images.input_region`);
    the CAM is placed there and the rest of the picture carries no evidence (0 in "png", uncoloured in "overlay").
    """
    height, width = picture.shape[:2]
    if kind not in ("png", "overlay"):
        raise ValueError(f"no picture for heatmap kind {kind!r}")
    if region is None or tuple(region) == (0, 0, width, height):
        return grayscale_png(cam, width, height) if kind == "png" else overlay_png(cam, picture)
    left, top, right, bottom = region
    placed = upsample(cam, bottom - top, right - left)
    if kind == "png":
        canvas = np.zeros((height, width), dtype=np.uint8)
        canvas[top:bottom, left:right] = (placed * 255).round().astype(np.uint8)
        return encode_png(canvas)
    blended = picture.copy()
    blended[top:bottom, left:right] = blend(picture[top:bottom, left:right], placed)
    return encode_png(blended)
