"""Human-map preparation (the paper's resize + min-max) and proxy maps with their provenance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cyborg.cli import main
from core.errors import UserError
from tests.datasets import corrupt, make_csv_dataset, make_plain_dataset
from training.data import discover, saliency_provenance
from training.saliency import (
    FFHQ_FACE_PARTS,
    PROVENANCE_FILE,
    MapError,
    face_part_template,
    map_stats,
    prepare_map,
    read_provenance,
)


def test_prepare_map_resizes_and_min_maxes():
    array = np.full((64, 64), 40, dtype=np.uint8)
    array[32:, :32] = 240  # bottom-left quarter marked
    prepared = prepare_map(Image.fromarray(array, mode="L"), (2, 2))
    assert prepared.dtype == np.float32 and prepared.shape == (2, 2)
    np.testing.assert_allclose(prepared, [[0.0, 0.0], [1.0, 0.0]], atol=1e-6)
    tall = prepare_map(Image.fromarray(array, mode="L"), (7, 3))  # any grid, h x w
    assert tall.shape == (7, 3) and tall.min() == 0.0 and tall.max() == 1.0 and tall[-1, 0] == 1.0


def test_prepare_map_is_an_area_average_per_cell():
    array = np.array([[0, 4, 8, 8], [4, 0, 8, 8], [0, 0, 2, 2], [0, 0, 2, 2]], dtype=np.float32)
    # cell means [[2, 8], [0, 2]], then min-max
    np.testing.assert_allclose(prepare_map(array, (2, 2)), [[0.25, 1.0], [0.0, 0.25]], atol=1e-6)


def test_prepare_map_min_max_of_a_graded_map():
    # a horizontal ramp 50..200 at grid size: min-max maps it linearly onto 0..1
    ramp = np.tile(np.linspace(50, 200, 4, dtype=np.float32), (4, 1))
    np.testing.assert_allclose(prepare_map(ramp, (4, 4))[0], [0.0, 1 / 3, 2 / 3, 1.0], atol=1e-6)


@pytest.mark.parametrize("value", [0, 128, 255])
def test_constant_map_gives_zeros_not_nan(tmp_path, value):
    path = tmp_path / "flat.png"
    Image.new("L", (20, 20), value).save(path)
    prepared = prepare_map(path, (3, 3))
    assert not np.isnan(prepared).any() and np.count_nonzero(prepared) == 0
    assert map_stats(path).constant and map_stats(path).size == (20, 20)


def test_colour_and_16_bit_maps_become_grayscale(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:4, :, 0] = 255  # red top half
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    np.testing.assert_allclose(prepare_map(tmp_path / "rgb.png", (2, 1)), [[1.0], [0.0]], atol=1e-6)
    deep = np.zeros((8, 8), dtype=np.uint16)
    deep[:, 4:] = 60000
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_allclose(prepare_map(tmp_path / "deep.png", (1, 2)), [[0.0, 1.0]], atol=1e-6)
    assert not map_stats(tmp_path / "deep.png").constant


def test_unreadable_map_is_named(tmp_path):
    path = corrupt(tmp_path / "broken.png")
    with pytest.raises(MapError, match="broken.png"):
        prepare_map(path, (2, 2))


def test_face_part_template_marks_eyes_nose_mouth():
    template = face_part_template(256, 256)
    assert template.dtype == np.float32 and template.min() == 0.0 and template.max() == pytest.approx(1.0)
    for cx, cy, _, _ in FFHQ_FACE_PARTS.values():
        assert template[int(cy * 256), int(cx * 256)] > 0.9
    assert template[10, 10] < 0.01 and template[128, 20] < 0.01  # background and cheek-side stay dark
    assert np.allclose(template, template[:, ::-1], atol=0.02)  # left-right symmetric


def test_saliency_prior_writes_proxy_maps_and_provenance(tmp_path, capsys):
    data = make_plain_dataset(tmp_path, n_real=2, n_fake=3, size=40, maps=False, sources=["sg"])
    jpeg = data / "real" / "photo.jpg"
    Image.new("RGB", (48, 36), (90, 60, 30)).save(jpeg)
    out = tmp_path / "proxy"
    assert main(["saliency", "prior", str(data), "--out", str(out)]) == 0
    assert "wrote 6 proxy maps" in capsys.readouterr().out
    provenance = read_provenance(out)
    assert provenance["source"] == "proxy" and provenance["method"] == "ffhq-face-parts" and provenance["count"] == 6
    samples = discover(data, heatmaps=out)
    assert all(s.map_path is not None for s in samples)
    by_image = {s.path.name: s.map_path for s in samples}
    assert by_image["photo.jpg"].name == "photo.png"
    with Image.open(by_image["photo.jpg"]) as image:
        assert image.mode == "L" and image.size == (48, 36)
    np.testing.assert_allclose(prepare_map(by_image["photo.jpg"], (36, 48)), face_part_template(36, 48), atol=1 / 255 + 1e-6)
    assert saliency_provenance(samples) == "proxy" and saliency_provenance(out) == "proxy"
    # data check sees proxy maps of the right size: no problem
    assert main(["data", "check", str(data), "--heatmaps", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["maps"]["provenance"] == "proxy" and report["problems"] == []


def test_saliency_prior_on_csv_data_with_fixed_size(tmp_path, capsys):
    data_root, csv_path, _ = make_csv_dataset(tmp_path, n_real=1, n_fake=1, n_test_real=1, n_test_fake=1, maps=False)
    out = tmp_path / "proxy"
    assert main(["saliency", "prior", str(data_root), "--csv", str(csv_path), "--out", str(out), "--size", "64"]) == 0
    maps = sorted(out.glob("*.png"))
    assert len(maps) == 4 and all(Image.open(p).size == (64, 64) for p in maps)
    assert read_provenance(out)["csv"] == str(csv_path.resolve())


def test_saliency_prior_never_overwrites_human_maps(tmp_path, capsys):
    data = make_plain_dataset(tmp_path, n_real=1, n_fake=1)
    before = {p.name: p.read_bytes() for p in (data / "maps").iterdir()}
    assert main(["saliency", "prior", str(data), "--out", str(data / "maps")]) == 2
    assert "human maps" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (data / "maps").iterdir()} == before
    assert not (data / "maps" / PROVENANCE_FILE).exists()
    # a folder of earlier proxy maps may be rewritten
    assert main(["saliency", "prior", str(data), "--out", str(tmp_path / "p")]) == 0
    assert main(["saliency", "prior", str(data), "--out", str(tmp_path / "p")]) == 0


def test_bad_provenance_file_is_a_user_error(tmp_path):
    (tmp_path / PROVENANCE_FILE).write_text("[1, 2]")
    with pytest.raises(UserError, match="PROVENANCE.json"):
        read_provenance(tmp_path)
