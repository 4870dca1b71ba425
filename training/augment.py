"""Training augmentation: the everyday changes photos go through, drawn at random, seeded by the caller.

    augmenter = make_augmenter(config)          # None when config.augment is "none"
    image, saliency = augmenter(image, saliency, rng)

`Augmenter(settings)(image, saliency, rng)` takes a decoded RGB `PIL.Image`, its saliency map (float32
[H, W], or None) and a `random.Random`, and returns both changed, the image at its input size (the
data loader crops afterwards). Each change in `settings.names` is applied with its own coin: a
horizontal flip with probability `flip_p`, every other change with probability `p` (Wang et al.,
CVPR 2020: 0.1 generalised better than 0.5). Geometric changes (flip, shift) move the map with the
image, in relative coordinates, so a map at another resolution stays aligned. The draws come only
from `rng`, in a fixed order, so one rng state gives one result.

The order is the one a photo meets them in: framing (flip, shift), colour, a smaller copy, blur,
then re-compression. The codecs and filters are Pillow's, through `training.perturb`. A call is
`frame` (the geometric changes) then `degrade` (the rest) on the same rng, so a caller can keep the
framed image before its everyday changes (a teacher's clean view, `--distill-view clean`).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
from PIL import Image, ImageEnhance

from core.errors import UserError
from training import perturb
from training.config import AUGMENTATIONS, RESIZE_MAX, TrainConfig, augmentation_names

GEOMETRIC = ("flip", "shift")  # the changes that move the map with the image; the others change pixels only
RESIZE_FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS, Image.Resampling.BOX)


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """Which changes are on, how likely and how strong. Ranges are (low, high), drawn uniformly."""

    names: tuple[str, ...] = AUGMENTATIONS  # applied in AUGMENTATIONS order whatever the order here
    p: float = 0.1  # each everyday change (all but flip)
    flip_p: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 100)
    webp_quality: tuple[int, int] = (30, 100)
    blur_sigma: tuple[float, float] = (0.0, 3.0)  # pixels, at the image's own resolution
    resize_scale: tuple[float, float] = (0.5, RESIZE_MAX)  # downscale factor of the round trip
    colour: float = 0.15  # brightness, contrast and saturation factors in [1 - colour, 1 + colour]
    zoom: tuple[float, float] = (1.0, 1.15)  # shift: a crop 1/zoom of each side, anywhere, resized back

    def __post_init__(self) -> None:
        unknown = [name for name in self.names if name not in AUGMENTATIONS]
        if unknown:
            raise UserError(f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
        for name in ("p", "flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"augmentation {name} {getattr(self, name)}: must be in [0, 1]")
        checks = {
            "jpeg_quality": (1, 100),
            "webp_quality": (0, 100),
            "blur_sigma": (0.0, 10.0),
            "resize_scale": (0.05, 1.0),
            "zoom": (1.0, 2.0),
        }
        for name, (lowest, highest) in checks.items():
            low, high = getattr(self, name)
            if not lowest <= low <= high <= highest:
                raise UserError(f"augmentation {name} ({low}, {high}): need {lowest} <= low <= high <= {highest}")
        if not 0.0 <= self.colour < 1.0:
            raise UserError(f"augmentation colour {self.colour}: must be in [0, 1)")

    @classmethod
    def from_config(cls, config: TrainConfig) -> AugmentSettings:
        return cls(
            names=augmentation_names(config.augment),
            p=config.augment_p,
            flip_p=config.augment_flip_p,
            jpeg_quality=(config.augment_jpeg_min, 100),
            webp_quality=(config.augment_jpeg_min, 100),
            blur_sigma=(0.0, config.augment_blur_max),
            zoom=(1.0, config.augment_zoom_max),
            resize_scale=(config.augment_resize_min, RESIZE_MAX),
        )


Box = tuple[float, float, float, float]  # (left, top, right, bottom) as fractions of the width and height


def _resize_box(image: Image.Image, box: Box, resample: Image.Resampling) -> Image.Image:
    """The part of `image` inside the relative `box`, resized to the image's own size."""
    width, height = image.size
    left, top, right, bottom = box
    return image.resize(image.size, resample, box=(left * width, top * height, right * width, bottom * height))


class Augmenter:
    """`augmenter(image, saliency, rng) -> (image, saliency)`; see the module docstring."""

    def __init__(self, settings: AugmentSettings | None = None):
        self.settings = settings or AugmentSettings()
        self.names = tuple(name for name in AUGMENTATIONS if name in self.settings.names)

    def __repr__(self) -> str:
        return f"Augmenter({self.settings})"

    def __call__(
        self, image: Image.Image, saliency: np.ndarray | None, rng: random.Random
    ) -> tuple[Image.Image, np.ndarray | None]:
        image, saliency = self.frame(image, saliency, rng)
        return self.degrade(image, rng), saliency

    def frame(self, image: Image.Image, saliency: np.ndarray | None, rng: random.Random) -> tuple[Image.Image, np.ndarray | None]:
        """The geometric changes alone (flip, shift; the map follows): the first half of a call."""
        if image.mode != "RGB":
            raise ValueError(f"the augmenter takes RGB images, not {image.mode}")
        if saliency is not None and np.ndim(saliency) != 2:
            raise ValueError(f"saliency must be a 2-D map, not shape {np.shape(saliency)}")
        return self._apply([name for name in self.names if name in GEOMETRIC], image, saliency, rng)

    def degrade(self, image: Image.Image, rng: random.Random) -> Image.Image:
        """The everyday changes of the pixels alone (colour, resize, blur, jpeg, webp): the second half
        of a call, drawing from `rng` where `frame` stopped."""
        return self._apply([name for name in self.names if name not in GEOMETRIC], image, None, rng)[0]

    def _apply(self, names: list[str], image: Image.Image, saliency: np.ndarray | None,
               rng: random.Random) -> tuple[Image.Image, np.ndarray | None]:  # fmt: skip
        size = image.size
        for name in names:
            chance = self.settings.flip_p if name == "flip" else self.settings.p
            if rng.random() < chance:
                image, saliency = getattr(self, f"_{name}")(image, saliency, rng)
        assert image.size == size, "an augmentation changed the image size"
        return image, saliency

    # each change: (image, saliency, rng) -> (image, saliency), drawing its parameters from rng

    def _flip(self, image, saliency, rng):
        flipped = None if saliency is None else np.ascontiguousarray(np.asarray(saliency)[:, ::-1])
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flipped

    def _shift(self, image, saliency, rng):
        zoom = rng.uniform(*self.settings.zoom)
        side = 1.0 / zoom
        left, top = rng.uniform(0.0, 1.0 - side), rng.uniform(0.0, 1.0 - side)
        box = (left, top, left + side, top + side)
        image = _resize_box(image, box, Image.Resampling.BICUBIC)
        if saliency is not None:
            dtype = np.asarray(saliency).dtype
            moved = _resize_box(Image.fromarray(np.asarray(saliency, dtype=np.float32), mode="F"), box, Image.Resampling.BILINEAR)
            saliency = np.asarray(moved, dtype=np.float32).astype(dtype, copy=False)
        return image, saliency

    def _colour(self, image, saliency, rng):
        low, high = 1.0 - self.settings.colour, 1.0 + self.settings.colour
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhancer(image).enhance(rng.uniform(low, high))
        return image, saliency

    def _resize(self, image, saliency, rng):
        scale = rng.uniform(*self.settings.resize_scale)
        down, up = rng.choice(RESIZE_FILTERS), rng.choice(RESIZE_FILTERS[:3])
        return perturb.resize_round_trip(image, scale, down, up), saliency

    def _blur(self, image, saliency, rng):
        return perturb.blur(image, rng.uniform(*self.settings.blur_sigma)), saliency

    def _jpeg(self, image, saliency, rng):
        return perturb.jpeg(image, rng.randint(*self.settings.jpeg_quality)), saliency

    def _webp(self, image, saliency, rng):
        return perturb.webp(image, rng.randint(*self.settings.webp_quality)), saliency


def make_augmenter(config: TrainConfig) -> Augmenter | None:
    """The augmenter `config` asks for (`augment`, `augment_p`, ...), or None for `augment = "none"`."""
    if not augmentation_names(config.augment):
        return None
    return Augmenter(AugmentSettings.from_config(config))
