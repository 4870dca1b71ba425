"""Data discovery in both layouts, the seeded split, FaceDataset and `cyborg data check`."""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from cyborg.cli import main
from core.errors import UserError
from core.images import read_image, to_model_input
from tests.datasets import corrupt, make_csv_dataset, make_face_image, make_plain_dataset
from training.data import LABELS, FaceDataset, discover, saliency_provenance, split_samples


def test_labels_follow_the_contract():
    from core.contract import CLASS_NAMES, FAKE_INDEX

    assert LABELS[CLASS_NAMES[FAKE_INDEX]] == FAKE_INDEX and sorted(LABELS.values()) == [0, 1]


def test_plain_layout_sources_and_maps(tmp_path):
    data = make_plain_dataset(tmp_path, n_real=3, n_fake=4, sources=["stylegan", "progan"])
    samples = discover(data)
    assert Counter(s.label for s in samples) == {0: 3, 1: 4}
    assert {s.split for s in samples} == {"train"}
    assert Counter(s.source for s in samples) == {"real": 3, "stylegan": 2, "progan": 2}
    assert all(s.map_path is not None and s.map_path.name == s.path.name for s in samples)
    (data / "real" / "notes.txt").write_text("not an image")  # ignored: not an image file
    assert len(discover(data)) == 7


def test_plain_layout_with_split_folders(tmp_path):
    make_plain_dataset(tmp_path, n_real=2, n_fake=2, split="train", seed=1)
    make_plain_dataset(tmp_path, n_real=1, n_fake=1, split="test", seed=2, maps=False)
    data = make_plain_dataset(tmp_path, n_real=1, n_fake=2, split="validation", seed=3)
    samples = discover(data)
    assert Counter(s.split for s in samples) == {"train": 4, "val": 3, "test": 2}
    assert all((s.map_path is None) == (s.split == "test") for s in samples)
    (data / "real").mkdir()
    with pytest.raises(UserError, match="use one layout"):
        discover(data)


def test_csv_layout_authors_format(tmp_path):
    data_root, csv_path, heatmaps = make_csv_dataset(tmp_path, n_real=2, n_fake=3, n_val_real=1, n_val_fake=1, sources=["sg2"])
    samples = discover(data_root, csv=csv_path, heatmaps=heatmaps)
    first = csv_path.read_text().splitlines()[0]
    assert first.startswith("train,Real,/train/original_data/0_real/")
    assert Counter((s.split, s.label) for s in samples) == {("train", 0): 2, ("train", 1): 3, ("val", 0): 1, ("val", 1): 1, ("test", 0): 4, ("test", 1): 4}
    assert all(s.path.is_file() and s.path.is_relative_to(data_root) for s in samples)
    assert all(s.map_path == heatmaps / s.path.name for s in samples)
    assert {s.source for s in samples if s.label == 1} == {"sg2"}
    assert {s.source for s in samples if s.label == 0} == {"0_real"}  # parent folder when the column is empty


def test_csv_header_case_and_aliases(tmp_path):
    data_root, _, _ = make_csv_dataset(tmp_path, n_real=1, n_fake=1, n_test_real=0, n_test_fake=0, maps=False)
    real, fake = sorted(p.relative_to(data_root).as_posix() for p in data_root.rglob("*.png"))
    csv_path = tmp_path / "mixed.csv"
    csv_path.write_text(f"split,class,path\n\nTRAIN,real,{real}\nValidation,FAKE,/{fake},StyleGAN3\n")
    samples = discover(data_root, csv=csv_path)
    assert [(s.split, s.label, s.source, s.map_path) for s in samples] == [("train", 0, "0_real", None), ("val", 1, "StyleGAN3", None)]


def test_unknown_class_lists_valid_names(tmp_path):
    data_root, csv_path, _ = make_csv_dataset(tmp_path, n_real=1, n_fake=1, n_test_real=0, n_test_fake=0, maps=False)
    csv_path.write_text(csv_path.read_text() + "train,Deepfake,/x.png\n")
    with pytest.raises(UserError, match=r"data.csv:3: unknown class 'Deepfake'.*Real, Synthetic, Fake"):
        discover(data_root, csv=csv_path)


@pytest.mark.parametrize(
    "row, message",
    [("holdout,Real,/x.png", "unknown split 'holdout'"), ("train,Real", "expected 'split,class,path"), ("train,Real,", "expected")],
)
def test_bad_csv_rows(tmp_path, row, message):
    (tmp_path / "d").mkdir()
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(row + "\n")
    with pytest.raises(UserError, match=message):
        discover(tmp_path / "d", csv=csv_path)


def test_missing_folders_and_empty_data(tmp_path):
    with pytest.raises(UserError, match="data folder not found"):
        discover(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no images found"):
        discover(tmp_path)
    data = make_plain_dataset(tmp_path, n_real=1, n_fake=1, maps=False)
    with pytest.raises(UserError, match="--heatmaps .*not found"):
        discover(data, heatmaps=tmp_path / "maps-nowhere")


def test_maps_match_by_stem_when_names_differ(tmp_path):
    data = make_plain_dataset(tmp_path, n_real=2, n_fake=2, maps=False)
    real = sorted((data / "real").iterdir())[0]
    jpeg = real.with_suffix(".jpg")
    Image.open(real).save(jpeg, quality=90)
    real.unlink()
    maps = tmp_path / "m"
    maps.mkdir()
    Image.new("L", (8, 8)).save(maps / (jpeg.stem + ".png"))
    by_path = {s.path: s.map_path for s in discover(data, heatmaps=maps)}
    assert by_path[jpeg] == maps / (jpeg.stem + ".png")
    assert sum(m is not None for m in by_path.values()) == 1


def test_split_is_seeded_stratified_and_deterministic(tmp_path):
    data = make_plain_dataset(tmp_path, n_real=20, n_fake=10, maps=False, size=16)
    samples = discover(data)
    first = split_samples(samples, 0.2, seed=7)
    shuffled = list(samples)
    random.Random(1).shuffle(shuffled)
    again = split_samples(shuffled, 0.2, seed=7)
    assert first == again  # same seed: same split, whatever the input order
    assert Counter(s.label for s in first["val"]) == {0: 4, 1: 2}  # 20 % of each class
    assert all(s.split == "val" for s in first["val"]) and all(s.split == "train" for s in first["train"])
    assert {s.path for s in first["train"]}.isdisjoint(s.path for s in first["val"])
    assert len(first["train"]) + len(first["val"]) == 30 and first["test"] == []
    other = split_samples(samples, 0.2, seed=8)
    assert {s.path for s in other["val"]} != {s.path for s in first["val"]}


def test_split_keeps_explicit_validation(tmp_path):
    data_root, csv_path, heatmaps = make_csv_dataset(tmp_path, n_real=4, n_fake=4, n_val_real=1, n_val_fake=2, maps=False)
    splits = split_samples(discover(data_root, csv=csv_path), 0.5, seed=0)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (8, 3, 8)


def test_face_dataset_items(tmp_path):
    data = make_plain_dataset(tmp_path, n_real=2, n_fake=2, size=32)
    samples = discover(data)
    samples[0] = type(samples[0])(samples[0].path, samples[0].label, "train", "real", None)  # one without a map
    dataset = FaceDataset(samples, image_size=64, cam_grid=(2, 2))
    item = dataset[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 64)
    assert torch.equal(item["image"], torch.from_numpy(to_model_input(read_image(samples[0].path), 64, 64)))
    assert item["label"].dtype == torch.long and int(item["index"]) == 0
    assert not item["has_saliency"] and torch.count_nonzero(item["saliency"]) == 0
    with_map = dataset[1]
    assert with_map["has_saliency"] and with_map["saliency"].dtype == torch.float32 and with_map["saliency"].shape == (2, 2)
    assert with_map["saliency"].argmax() == 3 and float(with_map["saliency"].max()) == 1.0  # region: bottom-right
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["has_saliency"].tolist() == [False, True, True, True]
    # fake images (label 1) are brighter in the marked region than real ones: learnable
    region = lambda i: dataset[i]["image"][:, 32:, 32:].float().mean()  # noqa: E731
    assert min(region(i) for i in (2, 3)) > max(region(i) for i in (0, 1)) + 50


def test_face_dataset_names_unreadable_images(tmp_path, caplog):
    data = make_plain_dataset(tmp_path, n_real=3, n_fake=3)
    samples = discover(data)
    bad = [corrupt(samples[1].path), corrupt(samples[4].map_path)]
    with pytest.raises(UserError, match="2 unreadable") as error:
        FaceDataset(samples, 32, (1, 1))
    assert all(str(path) in str(error.value) for path in bad)
    with caplog.at_level(logging.WARNING):
        dataset = FaceDataset(samples, 32, (1, 1), skip_unreadable=True)
    assert len(dataset) == 4 and str(bad[0]) in caplog.text
    later = dataset.samples[0].path
    later.write_bytes(later.read_bytes()[:60])  # truncated after the up-front check
    with pytest.raises(UserError, match=str(later)):
        dataset[0]


def test_saliency_provenance(tmp_path):
    data = make_plain_dataset(tmp_path, n_real=1, n_fake=1)
    assert saliency_provenance(discover(data)) == "human"
    assert saliency_provenance(data / "maps") == "human"
    (data / "maps" / "PROVENANCE.json").write_text(json.dumps({"source": "proxy", "method": "test"}))
    assert saliency_provenance(discover(data)) == "proxy"
    assert saliency_provenance(data / "maps") == "proxy"
    shutil.rmtree(data / "maps")
    assert saliency_provenance(discover(data)) == "none" and saliency_provenance(None) == "none"


# ---- cyborg data check ----------------------------------------------------------------------------


def run_check(capsys, *args: str) -> tuple[int, dict]:
    code = main(["data", "check", *map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def kinds(report: dict) -> dict[str, str]:
    return {p["kind"]: p["severity"] for p in report["problems"]}


def test_check_clean_data(tmp_path, capsys):
    data_root, csv_path, heatmaps = make_csv_dataset(tmp_path, n_real=3, n_fake=3, n_test_real=2, n_test_fake=2, sources=["sg"])
    code, report = run_check(capsys, data_root, "--csv", csv_path, "--heatmaps", heatmaps)
    assert code == 0 and report["errors"] == 0 and report["problems"] == []
    assert report["counts"]["train"]["fake/sg"] == 3 and report["counts"]["test"]["real"] == 2
    assert report["maps"] == {"with_map": 10, "without_map": 0, "provenance": "human"}
    assert main(["data", "check", str(data_root), "--csv", str(csv_path), "--heatmaps", str(heatmaps)]) == 0
    text = capsys.readouterr().out
    assert "0 error(s), 0 warning(s)" in text and "train: 3 real, 3 fake" in text


def test_check_reports_every_problem(tmp_path, capsys):
    data_root, csv_path, heatmaps = make_csv_dataset(tmp_path, n_real=7, n_fake=2, n_test_real=2, n_test_fake=2)
    train_real = sorted((data_root / "train" / "original_data" / "0_real").iterdir())
    test_fake = sorted((data_root / "test" / "original_data" / "1_fake").iterdir())
    corrupt(train_real[0])  # unreadable image
    corrupt(heatmaps / train_real[1].name)  # unreadable map
    Image.new("L", (32, 32), 7).save(heatmaps / train_real[2].name)  # constant map
    Image.open(heatmaps / train_real[3].name).resize((16, 16)).save(heatmaps / train_real[3].name)  # other size
    (heatmaps / train_real[4].name).unlink()  # missing map
    shutil.copy(train_real[5], test_fake[0])  # same content in train and test, under both labels
    rows = csv_path.read_text()
    rows += "test,Real,/train/original_data/0_real/gone.png\n"  # missing image
    test_real = data_root / "test" / "original_data" / "0_real"
    make_face_image(0, 32, np.random.default_rng(99)).save(test_real / train_real[5].name)
    rows += f"test,Real,/test/original_data/0_real/{train_real[5].name}\n"  # same name, other content, two splits
    shutil.copy(train_real[6], train_real[6].with_name("dup.png"))
    rows += "train,Real,/train/original_data/0_real/dup.png\n"  # same content twice within train
    csv_path.write_text(rows)
    code, report = run_check(capsys, data_root, "--csv", csv_path, "--heatmaps", heatmaps)
    assert code == 1
    found = kinds(report)
    assert found == {
        "unreadable_image": "error",
        "missing_image": "error",
        "unreadable_map": "error",
        "shared_content": "error",
        "conflicting_labels": "error",
        "constant_map": "warning",
        "map_size": "warning",
        "missing_map": "warning",
        "class_imbalance": "warning",
        "shared_name": "warning",
        "duplicate_content": "warning",
        "ambiguous_map_name": "warning",
    }
    files = {p["kind"]: " ".join(p["files"]) for p in report["problems"]}
    assert train_real[0].name in files["unreadable_image"] and "gone.png" in files["missing_image"]
    assert "16x16, image 32x32" in files["map_size"] and "train: 8 real, 2 fake" in files["class_imbalance"]
    assert train_real[5].name in files["shared_content"] and test_fake[0].name in files["shared_content"]


def test_check_missing_class_and_no_maps(tmp_path, capsys):
    data = make_plain_dataset(tmp_path, n_real=2, n_fake=0, maps=False)
    code, report = run_check(capsys, data)
    assert code == 1 and kinds(report) == {"missing_class": "error", "no_maps": "warning"}
    assert report["problems"][0]["files"] == ["fake"]


def test_check_bad_input_is_a_user_error(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_dataset_images_are_deterministic(tmp_path):
    a = make_plain_dataset(tmp_path / "a", n_real=1, n_fake=1, seed=3)
    b = make_plain_dataset(tmp_path / "b", n_real=1, n_fake=1, seed=3)
    for pa, pb in zip(sorted(a.rglob("*.png")), sorted(b.rglob("*.png"))):
        assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))
