"""CAM heatmaps as pictures: a grayscale PNG at the image's size, or a colour overlay on the image."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from PIL import Image

from serving.images import RESAMPLING

COLORMAP = "jet"
OVERLAY_ALPHA = 0.45


def upsample(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """CAM float [h,w] in [0,1] resized (bilinear) to float32 [height,width], clipped to [0,1]."""
    image = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F").resize((width, height), RESAMPLING)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def grayscale_png(cam: np.ndarray, width: int, height: int) -> bytes:
    """8-bit grayscale PNG of the CAM at width x height (0 = no evidence, 255 = most)."""
    return encode_png((upsample(cam, width, height) * 255).round().astype(np.uint8))


def overlay_png(cam: np.ndarray, picture: np.ndarray, alpha: float = OVERLAY_ALPHA) -> bytes:
    """RGB PNG: the CAM through a matplotlib colormap blended over picture (uint8 [H,W,3])."""
    height, width = picture.shape[:2]
    colours = matplotlib.colormaps[COLORMAP](upsample(cam, width, height))[..., :3]
    blended = (1 - alpha) * picture.astype(np.float32) + alpha * 255.0 * colours
    return encode_png(np.clip(blended, 0, 255).round().astype(np.uint8))


def render(kind: str, cam: np.ndarray, picture: np.ndarray) -> bytes:
    """PNG bytes of heatmap `kind` ("png" or "overlay") for a picture uint8 [H,W,3]."""
    if kind == "png":
        return grayscale_png(cam, picture.shape[1], picture.shape[0])
    if kind == "overlay":
        return overlay_png(cam, picture)
    raise ValueError(f"no picture for heatmap kind {kind!r}")
