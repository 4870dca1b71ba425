"""Training augmentation (training.augment): seeded, size-preserving, the map following the geometry; its settings."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from cyborg.cli import main
from training.augment import Augmenter, AugmentSettings, make_augmenter
from training.config import AUGMENTATIONS, TrainConfig, augmentation_names, load_config_file


def scene(width: int = 72, height: int = 56) -> tuple[Image.Image, np.ndarray]:
    """An image whose brightness is its own saliency map (a smooth blob off the centre) plus a little noise."""
    y, x = np.mgrid[0:height, 0:width]
    blob = np.exp(-(((x - 0.7 * width) / (0.15 * width)) ** 2 + ((y - 0.35 * height) / (0.2 * height)) ** 2)).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 3, (height, width, 3))
    image = Image.fromarray(np.clip(blob[..., None] * 200 + 30 + noise, 0, 255).astype(np.uint8), mode="RGB")
    return image, blob


def only(name: str, **settings) -> Augmenter:
    """An augmenter that always applies one change."""
    return Augmenter(AugmentSettings(names=(name,), p=1.0, flip_p=1.0, **settings))


def brightness(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).mean(axis=2)


def test_the_same_rng_state_gives_the_same_result_and_other_seeds_differ():
    image, saliency = scene()
    augmenter = Augmenter(AugmentSettings(p=0.5))
    outputs = [augmenter(image, saliency, random.Random(seed)) for seed in (7, 7, 8, 9, 10)]
    first, again = outputs[0], outputs[1]
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(again[0]))
    np.testing.assert_array_equal(first[1], again[1])
    assert any(not np.array_equal(np.asarray(first[0]), np.asarray(other[0])) for other in outputs[2:])
    unchanged_input = scene()
    np.testing.assert_array_equal(np.asarray(image), np.asarray(unchanged_input[0]))  # inputs are not modified
    np.testing.assert_array_equal(saliency, unchanged_input[1])


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_every_change_keeps_the_size_and_the_map_shape(name):
    image, saliency = scene(71, 53)  # odd sides
    for seed in range(3):
        out, out_map = only(name)(image, saliency, random.Random(seed))
        assert out.size == image.size and out.mode == "RGB"
        assert out_map.shape == saliency.shape and out_map.dtype == np.float32
        assert only(name)(image, None, random.Random(seed))[1] is None


def test_a_flip_moves_the_map_with_the_image():
    image, saliency = scene()
    out, out_map = only("flip")(image, saliency, random.Random(0))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image)[:, ::-1])
    np.testing.assert_array_equal(out_map, saliency[:, ::-1])
    assert np.argmax(out_map.max(axis=0)) < saliency.shape[1] / 2  # the blob was on the right


def test_a_shift_moves_the_map_with_the_image_even_at_another_resolution():
    image, saliency = scene()
    small_map = np.asarray(Image.fromarray(saliency, mode="F").resize((36, 28), Image.Resampling.BILINEAR))
    moved_any = False
    for seed in range(6):
        augmenter = only("shift", zoom=(1.1, 1.3))
        out, out_map = augmenter(image, saliency, random.Random(seed))
        _, out_small = augmenter(image, small_map, random.Random(seed))
        # the image's brightness is its map: after the shift they still agree
        assert np.corrcoef(brightness(out).ravel(), out_map.ravel())[0, 1] > 0.97
        upsampled = np.asarray(Image.fromarray(out_small, mode="F").resize(out.size, Image.Resampling.BILINEAR))
        assert np.corrcoef(brightness(out).ravel(), upsampled.ravel())[0, 1] > 0.95
        moved_any |= np.abs(out_map - saliency).max() > 0.1
    assert moved_any


def test_probabilities_are_honoured():
    image, _ = scene(32, 32)
    never = Augmenter(AugmentSettings(p=0.0, flip_p=0.0))
    assert np.array_equal(np.asarray(never(image, None, random.Random(1))[0]), np.asarray(image))
    blur = Augmenter(AugmentSettings(names=("blur",), p=0.1, blur_sigma=(1.0, 2.0)))
    changed = sum(not np.array_equal(np.asarray(blur(image, None, random.Random(seed))[0]), np.asarray(image)) for seed in range(400))
    assert 20 <= changed <= 65  # about 40 of 400


def test_jpeg_and_colour_change_pixels_within_their_strength():
    image, _ = scene()
    base = np.asarray(image, dtype=np.float64)
    low = only("jpeg", jpeg_quality=(30, 30))(image, None, random.Random(0))[0]
    high = only("jpeg", jpeg_quality=(95, 95))(image, None, random.Random(0))[0]
    assert 0 < np.abs(np.asarray(high) - base).mean() < np.abs(np.asarray(low) - base).mean()
    coloured = only("colour")(image, None, random.Random(3))[0]
    ratio = np.asarray(coloured, dtype=np.float64).mean() / base.mean()
    assert ratio != 1.0 and 0.6 < ratio < 1.4


# ---------------------------------------------------------------- settings: config, flags, validation


def test_make_augmenter_follows_the_config():
    assert make_augmenter(TrainConfig()) is None  # default: no augmentation, as before
    everyday = make_augmenter(TrainConfig(augment="everyday"))
    assert everyday.names == AUGMENTATIONS and everyday.settings.p == 0.1 and everyday.settings.flip_p == 0.5
    chosen = make_augmenter(
        TrainConfig(augment="JPEG, blur", augment_p=0.3, augment_jpeg_min=50, augment_blur_max=1.5, augment_zoom_max=1.3)
    )
    assert chosen.names == ("blur", "jpeg") and chosen.settings.p == 0.3
    assert chosen.settings.jpeg_quality == (50, 100) and chosen.settings.blur_sigma == (0.0, 1.5)
    assert chosen.settings.zoom == (1.0, 1.3) and everyday.settings.zoom == (1.0, 1.15)
    assert everyday.settings.resize_scale == (0.5, 0.9)
    assert make_augmenter(TrainConfig(augment="resize", augment_resize_min=0.25)).settings.resize_scale == (0.25, 0.9)
    assert augmentation_names("none") == () and augmentation_names("flip,everyday") == AUGMENTATIONS


def test_every_name_has_a_change():
    for name in AUGMENTATIONS:
        assert callable(getattr(Augmenter, f"_{name}")), name


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"augment": "jpeg,sharpen"}, r"--augment 'jpeg,sharpen': unknown augmentation\(s\) sharpen; choose none, everyday or a comma list of flip, shift"),
        ({"augment": "none,jpeg"}, "unknown augmentation"),
        ({"augment_p": 1.5}, r"--augment-p 1.5: must be in \[0, 1\]"),
        ({"augment_flip_p": -0.1}, "--augment-flip-p"),
        ({"augment_jpeg_min": 0}, "--augment-jpeg-min 0"),
        ({"augment_blur_max": 20.0}, "--augment-blur-max 20.0"),
        ({"augment_zoom_max": 0.8}, r"--augment-zoom-max 0.8: must be in \[1, 2\]"),
        ({"augment_resize_min": 0.95}, r"--augment-resize-min 0.95: must be in \[0.05, 0.9\]"),
        ({"augment_resize_min": 0.0}, "--augment-resize-min 0.0"),
    ],
)
def test_bad_settings_are_refused_clearly(settings, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**settings).validate()


def test_the_resize_round_trip_draws_its_scale_from_the_configured_range(monkeypatch):
    from training import perturb

    drawn = []
    real = perturb.resize_round_trip
    monkeypatch.setattr(perturb, "resize_round_trip", lambda image, scale, *filters: drawn.append(scale) or real(image, scale, *filters))
    image, saliency = scene(128, 128)
    for low in (0.5, 0.25):
        drawn.clear()
        augmenter = make_augmenter(TrainConfig(augment="resize", augment_p=1.0, augment_resize_min=low))
        for seed in range(200):
            changed, _ = augmenter(image, saliency, random.Random(seed))
            assert changed.size == image.size
        assert len(drawn) == 200 and low <= min(drawn) < low + 0.05 and 0.85 < max(drawn) <= 0.9


def test_augment_settings_refuse_impossible_ranges():
    with pytest.raises(UserError, match="jpeg_quality"):
        AugmentSettings(jpeg_quality=(90, 40))
    with pytest.raises(UserError, match="unknown augmentation"):
        AugmentSettings(names=("rotate",))


def test_train_flags_and_config_file_reach_the_config(tmp_path, capsys):
    from training.commands.train import build_config
    from cyborg.cli import build_parser

    config_file = tmp_path / "settings.json"
    config_file.write_text(json.dumps({"arch": "test_resnet", "augment": "everyday", "augment_p": 0.2}))
    assert load_config_file(config_file)["augment"] == "everyday"
    argv = ["train", "DATA", "--config", str(config_file), "--augment-p", "0.05", "--augment-flip-p", "0",
            "--augment-resize-min", "0.25", "--out", "o"]  # fmt: skip
    args = build_parser(argv).parse_args(argv)
    config = build_config(args)
    assert (config.augment, config.augment_p, config.augment_flip_p, config.augment_resize_min) == ("everyday", 0.05, 0.0, 0.25)
    data = tmp_path / "data"
    assert main(["train", str(data), "--arch", "test_resnet", "--augment", "jpeg,sharpen", "--out", str(tmp_path / "run")]) == 2
    assert "choose none, everyday or a comma list" in capsys.readouterr().err
