"""Saliency maps: human-map preparation as the paper does it, and proxy maps for data without them.

A human map is a grayscale image with the image's file name in a heatmaps folder; it is resized to
the CAM grid and min-max normalised (`prepare_map`). A constant map carries no information: it
becomes all zeros (never NaN) and `map_stats` reports it.

Proxy maps (`face_part_template`, `write_proxy_maps`) mark the eyes, nose and mouth of FFHQ-aligned
faces; the folder they are written to holds PROVENANCE.json so every run that uses them records
that its maps are proxies, never human.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.errors import UserError
from core.images import HIGH_BIT_DEPTH_MODES, full_scale

PROVENANCE_FILE = "PROVENANCE.json"
CONSTANT_RANGE = 1e-6  # a map whose max - min (in [0, 1] units) is below this is constant


class MapError(UserError):
    """A saliency map that cannot be read."""


def load_map(source: str | os.PathLike[str] | Image.Image) -> np.ndarray:
    """A map as float32 [H, W] in [0, 1] from a file or a PIL image (any mode becomes grayscale)."""
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            with Image.open(source) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, SyntaxError, ValueError) as error:
            raise MapError(f"{source}: unreadable saliency map ({error})") from error
    if image.mode in HIGH_BIT_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float32)
        return np.clip(array / full_scale(image, array), 0.0, 1.0)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA").convert("RGB")
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def min_max(array: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant array becomes zeros (never NaN)."""
    array = np.asarray(array, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    if high - low < CONSTANT_RANGE:
        return np.zeros_like(array, dtype=np.float32)
    return ((array - low) / (high - low)).astype(np.float32)


def is_constant(array: np.ndarray) -> bool:
    return float(np.max(array) - np.min(array)) < CONSTANT_RANGE


def prepare_map(source: str | os.PathLike[str] | Image.Image | np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The paper's preparation: grayscale, resize to the CAM grid (h, w), min-max -> float32 [h, w].

    The resize is an area average (PIL's BOX filter): each cell's target is the mean saliency of the
    pixels it covers, with no leakage from neighbouring cells (a bilinear reduction by 32x spreads
    each cell over its neighbours). A constant map gives zeros.
    """
    height, width = int(grid[0]), int(grid[1])
    array = np.asarray(source, dtype=np.float32) if isinstance(source, np.ndarray) else load_map(source)
    if array.shape != (height, width):
        resized = Image.fromarray(array.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BOX)
        array = np.asarray(resized, dtype=np.float32)
    return min_max(array)


@dataclass(frozen=True)
class MapStats:
    """What `cyborg data check` needs to know about one map file."""

    size: tuple[int, int]  # (width, height), as PIL reports it
    constant: bool


def map_stats(path: str | os.PathLike[str]) -> MapStats:
    """Size and constancy of a map file; MapError if it cannot be read."""
    array = load_map(path)
    return MapStats(size=(array.shape[1], array.shape[0]), constant=is_constant(array))


def read_provenance(maps_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The PROVENANCE.json of a maps folder, or None when it has none (human maps)."""
    path = Path(maps_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable provenance file ({error})") from error
    if not isinstance(data, dict) or "source" not in data:
        raise UserError(f"{path}: provenance file must be a JSON object with a 'source' key")
    return data


# Where the face parts of FFHQ-aligned images are, as fractions of the side: the one home of these
# landmarks. FFHQ's alignment puts the eyes near y = 0.47, x = 0.375 / 0.625 and the mouth near
# y = 0.735 (the mean of 300 FFHQ images of the project's face set agrees within 0.01; docs/data.md).
#
# Proxy maps: one Gaussian blob per part, (centre x, centre y, sigma x, sigma y).
FFHQ_FACE_PARTS = {
    "left_eye": (0.375, 0.47, 0.055, 0.03),
    "right_eye": (0.625, 0.47, 0.055, 0.03),
    "nose": (0.5, 0.595, 0.04, 0.06),
    "mouth": (0.5, 0.735, 0.09, 0.035),
}
# The decoy benchmark's annotated regions (benchmarks.decoy): hard ellipses around the eyes and the
# mouth, (centre x, centre y, radius x, radius y), measured on the mean of 200 FFHQ faces. Kept as
# measured (the centres differ from the ones above by at most 0.015 of the side) so the recorded
# results of docs/guidance.md still describe the same data.
FFHQ_ANNOTATED_REGIONS = {
    "left_eye": (0.37, 0.47, 0.10, 0.06),
    "right_eye": (0.63, 0.47, 0.10, 0.06),
    "mouth": (0.50, 0.72, 0.13, 0.07),
}


def face_part_template(height: int, width: int, parts: dict[str, tuple[float, float, float, float]] = FFHQ_FACE_PARTS) -> np.ndarray:
    """float32 [height, width] in [0, 1]: the maximum of one Gaussian blob per face part."""
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width
    template = np.zeros((height, width), dtype=np.float32)
    for cx, cy, sx, sy in parts.values():
        blob = np.exp(-0.5 * (((xs[None, :] - cx) / sx) ** 2 + ((ys[:, None] - cy) / sy) ** 2))
        template = np.maximum(template, blob)
    return min_max(template)


def to_png_image(array: np.ndarray) -> Image.Image:
    """A [0, 1] map as an 8-bit grayscale image."""
    return Image.fromarray(np.clip(np.asarray(array) * 255.0, 0, 255).round().astype(np.uint8), mode="L")


def proxy_map_name(image_path: Path) -> str:
    """The proxy map's file name: the image's stem with .png (maps are matched by stem when no exact name matches)."""
    return Path(image_path).stem + ".png"


def write_provenance(maps_dir: Path, method: str, **details: Any) -> Path:
    """Write PROVENANCE.json marking the folder's maps as proxies made by `method`."""
    record = {"source": "proxy", "method": method, **details}
    path = Path(maps_dir) / PROVENANCE_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
