"""Evaluation: metrics against hand computations, predict, CAM agreement, and `cyborg evaluate` end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from cyborg.cli import main
from tests.datasets import make_csv_dataset, make_plain_dataset
from training.checkpoint import save_checkpoint
from training.config import TrainConfig
from training.evaluate import (
    binary_metrics,
    cam_agreement,
    per_source_metrics,
    pick_examples,
    predict,
    top_region,
)
from training.intervals import auc_interval
from training.model import cam_grid, create_classifier, default_normalisation, fake_probability, select_cam

IMAGE_SIZE = 64  # test_resnet: a 2 x 2 CAM grid


# ---------------------------------------------------------------- metrics


def test_perfect_separation():
    m = binary_metrics([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert m["auc"] == 1.0 and m["eer"] == 0.0
    assert 0.3 < m["eer_threshold"] <= 0.7 and m["threshold"] == m["eer_threshold"]
    assert m["accuracy"] == 1.0 and m["tpr"] == 1.0 and m["fpr"] == 0.0
    assert (m["n_real"], m["n_fake"]) == (3, 3)


def test_inverted_scores():
    m = binary_metrics([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1])
    assert m["auc"] == 0.0 and m["eer"] == 1.0 and m["accuracy"] == 0.0


def test_known_eer_case():
    # reals 0.1 0.2 0.3 0.6, fakes 0.4 0.7 0.8 0.9: 15 of 16 pairs ordered -> AUC 15/16; at 0.6 one real is
    # called fake (FPR 1/4) and one fake missed (FNR 1/4): EER 0.25 there.
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]
    m = binary_metrics(labels, scores)
    assert m["auc"] == pytest.approx(15 / 16)
    assert m["eer"] == pytest.approx(0.25) and m["eer_threshold"] == pytest.approx(0.6)
    assert m["accuracy"] == pytest.approx(0.75) and m["tpr"] == pytest.approx(0.75) and m["fpr"] == pytest.approx(0.25)
    at = binary_metrics(labels, scores, threshold=0.35)  # every fake caught, the 0.6 real called fake
    assert at["threshold"] == 0.35 and at["eer_threshold"] == pytest.approx(0.6)
    assert at["accuracy"] == pytest.approx(7 / 8) and at["tpr"] == 1.0 and at["fpr"] == pytest.approx(0.25)
    assert binary_metrics(labels, scores, threshold=0.6)["fpr"] == pytest.approx(0.25)  # score >= threshold is fake


def test_tied_scores_give_a_finite_threshold():
    # roc_curve's first point sits at threshold +inf; a tie makes it the EER point
    m = binary_metrics([0, 1], [0.5, 0.5])
    assert m["auc"] == 0.5 and m["eer"] == 0.5
    assert np.isfinite(m["eer_threshold"]) and 0.5 < m["eer_threshold"] < 0.5 + 1e-9


def test_one_class_has_no_auc_but_no_crash():
    m = binary_metrics([1, 1, 1], [0.9, 0.4, 0.7])
    assert m["auc"] is None and m["eer"] is None and m["eer_threshold"] is None
    assert m["threshold"] == 0.5 and m["accuracy"] == pytest.approx(2 / 3) and m["fpr"] is None
    assert binary_metrics([0, 0], [0.1, 0.6], threshold=0.5)["accuracy"] == 0.5


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no samples"):
        binary_metrics([], [])
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics([0, 1], [0.2, float("nan")])
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        binary_metrics([0, 1], [0.1, 0.2, 0.3])


def test_per_source_auc_is_each_generator_against_all_reals():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.3, 0.5, 0.7, 0.2, 0.6, 0.8, 0.9]
    sources = ["ffhq", "ffhq", "celeba", "celeba", "progan", "progan", "stylegan", "stylegan"]
    table = per_source_metrics(labels, scores, sources, threshold=0.55)
    assert list(table) == ["celeba", "ffhq", "progan", "stylegan"]
    # progan fakes 0.2, 0.6 against reals 0.1 0.3 0.5 0.7: 1 + 3 = 4 of 8 pairs
    assert table["progan"]["auc"] == pytest.approx(4 / 8)
    assert table["stylegan"]["auc"] == 1.0
    # ffhq reals 0.1, 0.3 against all fakes 0.2 0.6 0.8 0.9: 4 + 3 = 7 of 8 pairs
    assert table["ffhq"]["auc"] == pytest.approx(7 / 8)
    assert table["celeba"]["auc"] == pytest.approx(5 / 8)  # reals 0.5, 0.7 below 3 and 2 of the fakes
    assert table["progan"]["accuracy"] == 0.5 and table["celeba"]["accuracy"] == 0.5 and table["ffhq"]["accuracy"] == 1.0
    assert table["celeba"]["fpr"] == 0.5 and table["celeba"]["tpr"] is None
    assert (table["stylegan"]["n"], table["stylegan"]["n_fake"]) == (2, 2)
    assert "unknown" in per_source_metrics([0, 1], [0.2, 0.8], [None, "x"], 0.5)


def test_cam_agreement_hand_cases():
    maps = np.zeros((4, 4, 4))
    maps[:, 2:, 2:] = 1.0  # top region: the bottom-right 4 of 16 cells
    cams = maps.copy()
    cams[1] = 1.0 - maps[1]  # exactly outside the region
    cams[2] = 0.0  # a constant CAM: no correlation, no mass
    cams[3, :, :] = 0.5  # half everywhere, full in the region: mass 4 / (4 + 12 * 0.5) = 0.4
    cams[3, 2:, 2:] = 1.0
    result = cam_agreement(cams, maps, np.array([True, True, True, True]), np.array([0, 1, 1, 0]))
    assert result["n_maps"] == 4 and result["n_constant_cam_or_map"] == 1
    assert result["by_class"]["fake"]["pearson"] == pytest.approx(-1.0)
    assert result["by_class"]["fake"]["mass_in_top_region"] == pytest.approx(0.0)
    assert result["by_class"]["real"]["pearson"] == pytest.approx(1.0)
    assert result["by_class"]["real"]["mass_in_top_region"] == pytest.approx((1.0 + 0.4) / 2)
    assert result["mass_in_top_region"] == pytest.approx((1.0 + 0.0 + 0.4) / 3)
    assert result["top_region_fraction"] == pytest.approx(0.25)
    assert cam_agreement(cams, maps, np.zeros(4, dtype=bool), np.zeros(4)) is None
    assert top_region(maps)[0].sum() == 4


def test_pick_examples_balances_classes_and_spans_scores():
    labels = np.array([0] * 10 + [1] * 3)
    scores = np.linspace(0, 1, 13)
    picked = pick_examples(labels, scores, 8)
    assert len(picked) == 8 and sum(labels[picked]) == 3  # the short class gives all it has
    assert 0 in picked and 9 in picked  # lowest and highest real
    assert pick_examples(labels, scores, 0) == []


# ---------------------------------------------------------------- predict


class ItemDataset(torch.utils.data.Dataset):
    """Items in training.data.FaceDataset's format, made in memory."""

    def __init__(self, count: int, grid: tuple[int, int]):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=generator)
        self.maps = torch.rand((count, *grid), generator=generator)
        self.grid = grid

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.images[index],
            "label": torch.tensor(index % 2),
            "saliency": self.maps[index],
            "has_saliency": torch.tensor(index % 3 != 0),
            "index": torch.tensor(index),
        }


def test_predict_matches_a_direct_forward_and_restores_mode():
    torch.manual_seed(0)
    model = create_classifier("test_resnet").train()
    grid = cam_grid(model, IMAGE_SIZE)
    dataset = ItemDataset(7, grid)
    out = predict(model, dataset, batch_size=3, with_cams=True)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        direct = model(dataset.images)
    np.testing.assert_allclose(out["scores"], fake_probability(direct.logits).numpy(), atol=1e-5)  # other batch sizes: float noise
    np.testing.assert_allclose(out["cams"], select_cam(direct.class_maps, direct.logits.argmax(1)).numpy(), atol=1e-4)
    assert out["cams"].shape == (7, *grid)
    np.testing.assert_array_equal(out["labels"], [0, 1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(out["indices"], np.arange(7))
    np.testing.assert_array_equal(out["has_saliency"], [i % 3 != 0 for i in range(7)])
    np.testing.assert_allclose(out["saliency"], dataset.maps.numpy())
    assert set(predict(model, dataset, batch_size=4)) == {"scores", "labels", "indices"}


# ---------------------------------------------------------------- cyborg evaluate


def write_checkpoint(path, data_root, val_metrics=None, seed: int = 0):
    torch.manual_seed(seed)
    model = create_classifier("test_resnet")
    mean, std = default_normalisation("test_resnet")
    config = TrainConfig(arch="test_resnet", data=str(data_root), weights="none", image_size=IMAGE_SIZE, val_fraction=0.25)
    state = {
        "config": config.to_dict(),
        "model": model.state_dict(),
        "mean": list(mean),
        "std": list(std),
        "image_size": IMAGE_SIZE,
        "cam_grid": list(cam_grid(model, IMAGE_SIZE)),
        "epoch": 3,
        "best": {"epoch": 2, "val_auc": 0.75},
        "saliency": "human",
        "data": {"root": str(data_root)},
    }
    if val_metrics is not None:
        state["val_metrics"] = val_metrics
    save_checkpoint(state, path)
    return path


def read_predictions(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_end_to_end_on_the_authors_layout(tmp_path, capsys):
    data_root, csv_path, heatmaps = make_csv_dataset(
        tmp_path, n_real=2, n_fake=2, n_test_real=6, n_test_fake=6, size=IMAGE_SIZE, sources=["progan", "stylegan2"]
    )
    val = {"auc": 0.9, "eer": 0.1, "eer_threshold": 0.47, "accuracy": 0.9, "threshold": 0.47}
    checkpoint = write_checkpoint(tmp_path / "best.pt", tmp_path / "train_data", val_metrics=val)
    out = tmp_path / "eval"
    argv = ["evaluate", str(checkpoint), str(data_root), "--csv", str(csv_path), "--heatmaps", str(heatmaps), "--out", str(out), "--batch-size", "5", "--cams", "8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "AUC" in printed and "progan" in printed and "CAM vs human maps" in printed

    results = json.loads((out / "results.json").read_text())
    for key in ("auc", "eer", "accuracy", "threshold", "per_source", "n_images", "cam_agreement", "checkpoint", "data"):
        assert key in results
    assert results["data"]["split"] == "test" and results["n_images"] == 12  # auto: the CSV's test rows only
    assert (results["n_real"], results["n_fake"]) == (6, 6)
    assert results["threshold"] == 0.47 and "validation" in results["threshold_source"]
    assert set(results["per_source"]) == {"progan", "stylegan2", "0_real"}  # reals: no source value, their folder
    assert results["per_source"]["progan"]["n_fake"] == 3
    assert results["checkpoint"]["arch"] == "test_resnet" and results["checkpoint"]["val_metrics"] == val
    assert len(results["checkpoint"]["sha256"]) == 64 and results["data"]["includes_training_images"] is False
    agreement = results["cam_agreement"]
    assert agreement["maps"] == "human" and agreement["n_maps"] == 12 and -1 <= agreement["pearson"] <= 1

    # the figures are consistent with the per-image scores written beside them
    rows = read_predictions(out / "predictions.csv")
    labels = np.array([row["label"] == "fake" for row in rows], dtype=int)
    scores = np.array([float(row["score"]) for row in rows])
    assert len(rows) == 12
    assert results["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-4)
    assert results["accuracy"] == pytest.approx(((scores >= 0.47) == labels).mean(), abs=1e-4)
    progan = np.array(["progan" in row["path"] for row in rows]) | (labels == 0)
    assert results["per_source"]["progan"]["auc"] == pytest.approx(roc_auc_score(labels[progan], scores[progan]), abs=1e-4)
    # each AUC with the bootstrap interval of the same pairs (training.intervals), printed beside it
    assert results["auc_ci"] == list(auc_interval(labels, scores)) and results["intervals"]["confidence"] == 0.95
    assert results["per_source"]["progan"]["auc_ci"] == list(auc_interval(labels[progan], scores[progan]))
    low, high = results["auc_ci"]
    assert low <= results["auc"] <= high and f"interval {low:.3f}-{high:.3f}" in printed

    assert results["calibration"]["calibration"] is None  # no validation predictions in this checkpoint to fit on
    assert 0 <= results["calibration"]["raw"]["ece"] <= 1 and results["files"]["reliability"] == "reliability.png"
    for name in ("roc.png", "cams.png", "reliability.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 300
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        assert pixels.std() > 10  # drawn, not blank


def test_cli_threshold_flag_split_val_and_no_validation_threshold(tmp_path):
    data = make_plain_dataset(tmp_path, n_real=8, n_fake=8, size=IMAGE_SIZE, maps=False)
    checkpoint = write_checkpoint(tmp_path / "last.pt", data)  # no val_metrics: the default threshold applies
    out = tmp_path / "eval_all"
    assert main(["evaluate", str(checkpoint), str(data), "--out", str(out), "--cams", "4"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["split"] == "all" and results["n_images"] == 16
    assert results["threshold"] == 0.5 and "default" in results["threshold_source"]
    assert results["cam_agreement"] is None and results["data"]["includes_training_images"] is True

    # --split val is the checkpoint's own seeded hold-out (val_fraction 0.25 of each class: 2 + 2)
    out = tmp_path / "eval_val"
    assert main(["evaluate", str(checkpoint), str(data), "--split", "val", "--threshold", "0.3", "--cams", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["split"] == "val" and results["n_images"] == 4
    assert results["threshold"] == 0.3 and results["threshold_source"] == "--threshold"
    assert results["files"]["cams"] is None and not (out / "cams.png").exists() and (out / "roc.png").is_file()
    rows = read_predictions(out / "predictions.csv")
    fake_scores = np.array([float(row["score"]) for row in rows if row["label"] == "fake"])
    assert results["tpr"] == pytest.approx((fake_scores >= 0.3).mean())
    assert all(row["called"] == ("fake" if float(row["score"]) >= 0.3 else "real") for row in rows)


def test_cli_clear_errors(tmp_path, capsys):
    data = make_plain_dataset(tmp_path, n_real=2, n_fake=2, size=IMAGE_SIZE, maps=False)
    checkpoint = write_checkpoint(tmp_path / "best.pt", data)
    assert main(["evaluate", str(checkpoint), str(data), "--split", "test", "--out", str(tmp_path / "o")]) == 2
    assert "--split test: no images in that split" in capsys.readouterr().err
    assert main(["evaluate", str(checkpoint), str(data), "--split", "everything", "--out", str(tmp_path / "o")]) == 2
    assert "choose one of auto, test, val, train, all" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt"), str(data), "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(checkpoint), str(data), "--threshold", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "--threshold 1.5" in capsys.readouterr().err
    assert main(["evaluate", str(checkpoint), str(data), "--calibrate", "isotonic", "--out", str(tmp_path / "o")]) == 2
    assert "--calibrate 'isotonic': one of auto, none, temperature, platt" in capsys.readouterr().err
