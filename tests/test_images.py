"""Image decoding for serving: odd formats become RGB, bad input is refused with a clear message."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.errors import ImageError, ImageTooLarge
from core.images import decode_image, to_model_input


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(width=40, height=30) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is rewritten to claim width x height (CRC fixed)."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_lossless_formats_round_trip(fmt):
    pixels = gradient()
    options = {"lossless": True} if fmt == "WEBP" else {}
    image = decode_image(encode(Image.fromarray(pixels), fmt, **options))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)


def test_cmyk_jpeg_and_16_bit_png_become_rgb():
    cmyk = decode_image(encode(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG", quality=95))
    assert cmyk.mode == "RGB" and cmyk.size == (20, 10)
    red = np.asarray(cmyk)[5, 10]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60  # C=0 M=Y=255 is red

    deep = np.full((12, 16), 65535 // 2, np.uint16)
    deep[:, 8:] = 65535
    rgb = np.asarray(decode_image(encode(Image.fromarray(deep), "PNG")))
    assert rgb.shape == (12, 16, 3)
    assert abs(int(rgb[0, 0, 0]) - 127) <= 1 and rgb[0, 15, 0] == 255


def test_exif_orientation_is_applied():
    image = Image.fromarray(gradient(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 40)


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"", ImageError, "empty"),
        (b"hello, this is text and not an image", ImageError, "not a recognised image"),
        (encode(Image.fromarray(gradient(64, 64)), "JPEG")[:300], ImageError, "truncated"),
        (encode(Image.new("RGB", (1, 1)), "PNG"), ImageError, "too small"),
        (png_claiming(60000, 60000), ImageTooLarge, "3600000000 pixels"),
        (animated_gif(), ImageError, "animated"),
    ],
    ids=["empty", "text", "truncated-jpeg", "1x1", "60000x60000", "animated-gif"],
)
def test_bad_images_are_refused_by_name(data, error, message):
    with pytest.raises(error, match=message):
        decode_image(data)


def test_byte_limit_and_model_input():
    with pytest.raises(ImageTooLarge, match="byte limit"):
        decode_image(b"x" * 101, max_bytes=100)
    array = to_model_input(Image.fromarray(gradient(40, 30)), 16, 24)
    assert array.shape == (3, 16, 24) and array.dtype == np.uint8


@pytest.mark.parametrize("mode", ["1", "P", "I;16"])
def test_widened_modes_reduce_strip_by_strip_exactly_as_at_once(mode, monkeypatch):
    from core import images

    rng = np.random.default_rng(3)
    height, width = 301, 257
    if mode == "1":
        image = Image.fromarray(rng.integers(0, 2, (height, width)).astype(bool))
    elif mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).convert("P")
        image.putpalette(rng.integers(0, 256, 768).tolist())
        image.info["transparency"] = 5
    else:
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    assert image.mode == mode
    widened = {"1": "L", "P": "RGBA", "I;16": "I"}[mode]
    converted = []
    convert = Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: (converted.append(self.size), convert(self, *a, **k))[1])
    monkeypatch.setattr(images, "REDUCE_STRIP_PIXELS", 20 * width)  # strips of 18 rows at factor 3
    strips = images.reduced(image, 3)
    monkeypatch.setattr(Image.Image, "convert", convert)
    assert np.array_equal(np.asarray(strips), np.asarray(image.convert(widened).reduce(3)))
    assert strips.mode == widened and max(h for _, h in converted) == 18  # 18-row strips, never the whole image
