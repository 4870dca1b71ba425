"""The named everyday changes (training.perturb) and `cyborg evaluate --perturb` end to end on a tiny trained model."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from cyborg.cli import main
from tests.datasets import make_plain_dataset
from training import perturb
from training.perturb import PERTURBATIONS, parse_perturbations

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def photo(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    """A smooth gradient with fine noise: compression and blur have detail to take away."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255.0 / width, y * 255.0 / height, np.full((height, width), 128.0)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8), mode="RGB")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_parse_keeps_order_puts_clean_first_and_expands_all():
    assert [p.name for p in parse_perturbations("jpeg50, blur2")] == ["clean", "jpeg50", "blur2"]
    assert [p.name for p in parse_perturbations("blur2,clean,blur2")] == ["clean", "blur2"]
    assert [p.name for p in parse_perturbations("all")] == list(PERTURBATIONS)
    assert set(PERTURBATIONS) == {"clean", "jpeg90", "jpeg70", "jpeg50", "jpeg30", "webp", "half", "small96", "small64", "up2x", "blur1", "blur2", "crop80", "screenshot"}


@pytest.mark.parametrize("text", ["jpeg40", "jpeg50,sharpen", "", " , "])
def test_unknown_or_missing_names_are_refused_listing_the_valid_ones(text):
    with pytest.raises(UserError, match="choose from clean, jpeg90, .*screenshot, or all"):
        parse_perturbations(text)


def test_each_change_has_the_documented_size_and_changes_pixels():
    image = photo(192, 160)
    sizes = {"up2x": (384, 320), "crop80": (154, 128), "screenshot": (144, 120)}
    for name, perturbation in PERTURBATIONS.items():
        changed = perturbation(image)
        assert changed.mode == "RGB" and changed.size == sizes.get(name, image.size), name
        if changed.size == image.size:
            difference = np.abs(pixels(changed) - pixels(image)).mean()
            assert (difference == 0) == (name == "clean"), (name, difference)
        pickle.loads(pickle.dumps(perturbation))  # data-loader workers get a copy


def test_jpeg_quality_really_changes_the_bytes_and_the_pixels():
    image = photo()
    error = {q: np.abs(pixels(perturb.jpeg(image, q)) - pixels(image)).mean() for q in (95, 70, 30)}
    assert 0 < error[95] < error[70] < error[30]
    sizes = {}
    for quality in (95, 30):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes[quality] = buffer.tell()
    assert sizes[30] < sizes[95] / 2
    assert np.abs(pixels(perturb.webp(image, 80)) - pixels(image)).mean() > 0


def test_blur_strength_and_round_trips():
    image = photo()
    high_pass = lambda im: np.abs(np.diff(pixels(im), axis=1)).mean()  # noqa: E731
    assert high_pass(perturb.blur(image, 2.0)) < high_pass(perturb.blur(image, 1.0)) < high_pass(image)
    assert perturb.blur(image, 0) is not image and pixels(perturb.blur(image, 0)).tolist() == pixels(image).tolist()
    assert high_pass(perturb.resize_round_trip(image, 0.5)) < high_pass(image)
    crop = perturb.centre_crop(image, 0.5)
    np.testing.assert_array_equal(pixels(crop), pixels(image)[20:60, 24:72])


def test_a_small_face_loses_more_the_smaller_it_was_and_an_already_small_one_is_kept():
    image = photo(256, 256)
    high_pass = lambda im: np.abs(np.diff(pixels(im), axis=1)).mean()  # noqa: E731
    small96, small64 = PERTURBATIONS["small96"](image), PERTURBATIONS["small64"](image)
    assert small64.size == small96.size == image.size
    assert high_pass(small64) < high_pass(small96) < high_pass(PERTURBATIONS["half"](image)) < high_pass(image)
    # the same as scaling by 96 / 256 and back, whatever the aspect ratio: the shorter side decides
    np.testing.assert_array_equal(pixels(small96), pixels(perturb.resize_round_trip(image, 96 / 256)))
    wide = photo(384, 192)
    assert perturb.rescale(wide, 64 / 192).size == (128, 64)
    np.testing.assert_array_equal(pixels(perturb.shrink_round_trip(wide, 64)), pixels(perturb.resize_round_trip(wide, 64 / 192)))
    tiny = photo(80, 60)
    assert perturb.shrink_round_trip(tiny, 64) is tiny  # no detail to take away


# ---------------------------------------------------------------- cyborg evaluate --perturb


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A model trained for 3 epochs on a tiny two-source set (so its AUC means something), and the set."""
    from training.config import TrainConfig
    from training.trainer import fit

    root = tmp_path_factory.mktemp("robust")
    data = make_plain_dataset(root / "data", n_real=16, n_fake=16, size=48, maps=False, sources=["gan_a", "gan_b"])
    out = root / "run"
    config = TrainConfig(
        data=str(data), arch="cyborg_local_tiny", weights="none", image_size=48, epochs=3, batch_size=8, lr=0.02,
        lr_step=2, workers=0, device="cpu", out=str(out), val_fraction=0.25, guidance="ce", alpha=1.0,
    )  # fmt: skip
    fit(config, progress=False)
    return out / "best.pt", data


def test_evaluate_perturb_writes_metrics_per_change_and_source_and_the_plot(tiny_run, tmp_path, capsys):
    checkpoint, data = tiny_run
    out = tmp_path / "eval"
    assert main(["evaluate", str(checkpoint), str(data), "--perturb", "jpeg50,blur2", "--cams", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "perturbation" in printed and "jpeg50" in printed and "blur2" in printed

    results = json.loads((out / "results.json").read_text())
    table = results["perturbations"]
    assert list(table) == ["clean", "jpeg50", "blur2"]
    assert table["clean"]["auc"] == results["auc"] and table["clean"]["accuracy"] == results["accuracy"]  # the same scores
    assert table["clean"]["auc_vs_clean"] == 0
    for name, row in table.items():
        for key in ("auc", "eer", "accuracy"):
            assert 0.0 <= row[key] <= 1.0, (name, key)
        assert set(row["per_source"]) == set(results["per_source"])
        for source, cell in row["per_source"].items():
            assert 0.0 <= cell["auc"] <= 1.0 and 0.0 <= cell["eer"] <= 1.0 and 0.0 <= cell["accuracy"] <= 1.0, (name, source)
    assert table["blur2"]["auc"] != table["clean"]["auc"] or table["blur2"]["accuracy"] != table["clean"]["accuracy"]
    assert results["files"]["perturbations"] == "perturbations.png"
    with Image.open(out / "perturbations.png") as image:
        assert image.format == "PNG" and min(image.size) > 300
        assert np.asarray(image.convert("RGB"), dtype=np.float32).std() > 10  # drawn, not blank


def test_evaluate_without_perturb_is_unchanged_and_unknown_names_are_refused(tiny_run, tmp_path, capsys):
    checkpoint, data = tiny_run
    out = tmp_path / "plain"
    assert main(["evaluate", str(checkpoint), str(data), "--cams", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "perturbations" not in results and "perturbations" not in results["files"]
    assert not (out / "perturbations.png").exists()
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint), str(data), "--perturb", "jpeg50,jpeg10", "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err
    assert "jpeg10" in error and "choose from clean, jpeg90" in error
    assert not (tmp_path / "bad").exists()  # refused before any work
