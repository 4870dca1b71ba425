"""Everyday changes a photo goes through on its way to a user, and the named set the robustness benchmark uses.

The primitives (JPEG and WebP re-compression, Gaussian blur, resizing, centre crop, PNG round trip)
are Pillow's own codecs and filters, each a plain function of an RGB `PIL.Image`; training's
augmenter (`training.augment`) draws its random changes from the same functions. `PERTURBATIONS`
names the fixed changes `cyborg evaluate --perturb` measures; `parse_perturbations` reads the flag.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Callable

from PIL import Image, ImageFilter

from core.errors import UserError

RESAMPLE = Image.Resampling.BICUBIC  # how the benchmark's resizes resample (a typical photo tool's choice)


# ---------------------------------------------------------------- primitives


def encode_round_trip(image: Image.Image, fmt: str, **options) -> Image.Image:
    """`image` encoded as `fmt` ("JPEG", "WEBP", "PNG") with Pillow's codec and decoded again, as RGB."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """JPEG re-compression at `quality` (1-100, libjpeg's scale; 4:2:0 chroma as most encoders use)."""
    return encode_round_trip(image, "JPEG", quality=int(quality))


def webp(image: Image.Image, quality: int) -> Image.Image:
    """Lossy WebP re-compression at `quality` (0-100)."""
    return encode_round_trip(image, "WEBP", quality=int(quality), method=4)


def png(image: Image.Image) -> Image.Image:
    """A PNG round trip (lossless: only what happened before it shows)."""
    return encode_round_trip(image, "PNG")


def blur(image: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation `sigma` pixels (Pillow's GaussianBlur radius is the sigma)."""
    return image.filter(ImageFilter.GaussianBlur(float(sigma))) if sigma > 0 else image.copy()


def rescale(image: Image.Image, scale: float, resample: Image.Resampling = RESAMPLE) -> Image.Image:
    """The image resized by `scale` (each side rounded, at least 1 pixel)."""
    width, height = image.size
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, resample)


def resize_round_trip(
    image: Image.Image, scale: float, down: Image.Resampling = RESAMPLE, up: Image.Resampling = RESAMPLE
) -> Image.Image:
    """Downscaled by `scale` and back to the original size: the detail a smaller copy lost."""
    return rescale(image, scale, down).resize(image.size, up)


def shrink_round_trip(image: Image.Image, side: int) -> Image.Image:
    """Downscaled until its shorter side is `side` pixels and back to its own size (bicubic both ways):
    what a face found at that size in a photo still holds once scaled up to the model's input. An image
    already that small is returned as it is."""
    shorter = min(image.size)
    return image if shorter <= side else resize_round_trip(image, side / shorter)


def centre_crop(image: Image.Image, fraction: float) -> Image.Image:
    """The centre `fraction` of each side (the crop is smaller; nothing is resized)."""
    width, height = image.size
    crop_w, crop_h = max(1, round(width * fraction)), max(1, round(height * fraction))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def screenshot(image: Image.Image, scale: float = 0.75) -> Image.Image:
    """A screenshot-like copy: shown at `scale` (bilinear, as a browser does), saved as PNG."""
    return png(rescale(image, scale, Image.Resampling.BILINEAR))


def identity(image: Image.Image) -> Image.Image:
    return image


# ---------------------------------------------------------------- the benchmark's named changes


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """One named change: `apply(image) -> image` on a decoded RGB image, before the model's preprocessing."""

    name: str
    description: str
    apply: Callable[[Image.Image], Image.Image]  # picklable (a module function or a partial of one): data workers

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.apply(image)


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p
    for p in (
        Perturbation("clean", "the decoded image as is", identity),
        Perturbation("jpeg90", "JPEG re-compression, quality 90", functools.partial(jpeg, quality=90)),
        Perturbation("jpeg70", "JPEG re-compression, quality 70", functools.partial(jpeg, quality=70)),
        Perturbation("jpeg50", "JPEG re-compression, quality 50", functools.partial(jpeg, quality=50)),
        Perturbation("jpeg30", "JPEG re-compression, quality 30", functools.partial(jpeg, quality=30)),
        Perturbation("webp", "WebP re-compression, quality 80", functools.partial(webp, quality=80)),
        Perturbation("half", "half-size round trip (bicubic down and up)", functools.partial(resize_round_trip, scale=0.5)),
        Perturbation("small96", "a small face: shorter side down to 96 px and back up (bicubic)", functools.partial(shrink_round_trip, side=96)),
        Perturbation("small64", "a small face: shorter side down to 64 px and back up (bicubic)", functools.partial(shrink_round_trip, side=64)),
        Perturbation("up2x", "2x bicubic upscale, kept at the larger size", functools.partial(rescale, scale=2.0)),
        Perturbation("blur1", "Gaussian blur, sigma 1 pixel", functools.partial(blur, sigma=1.0)),
        Perturbation("blur2", "Gaussian blur, sigma 2 pixels", functools.partial(blur, sigma=2.0)),
        Perturbation("crop80", "centre crop, 80% of each side", functools.partial(centre_crop, fraction=0.8)),
        Perturbation("screenshot", "0.75x bilinear resize, then a PNG round trip", screenshot),
    )
}


def parse_perturbations(text: str, flag: str = "--perturb") -> list[Perturbation]:
    """A comma list of PERTURBATIONS names, or "all", as Perturbations in the order given ("clean" first
    always: the reference every other change is read against). UserError names the valid ones."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        names = list(PERTURBATIONS)
    unknown = [name for name in names if name not in PERTURBATIONS]
    if unknown or not names:
        what = f"unknown perturbation(s) {', '.join(unknown)}" if unknown else "no perturbation named"
        raise UserError(f"{flag} {text!r}: {what}; choose from {', '.join(PERTURBATIONS)}, or all")
    ordered = ["clean"] + [name for name in dict.fromkeys(names) if name != "clean"]
    return [PERTURBATIONS[name] for name in ordered]
