"""The trainer: resume equivalence, checkpoints, NaN stop, bad input, the CLI, and a behavioural decoy test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyborg.cli import main
from core.errors import UserError
from tests.datasets import corrupt, make_plain_dataset
from training import guidance
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.config import TrainConfig
from training.data import FaceDataset, discover
from training.evaluate import binary_metrics, predict
from training.intervals import auc_interval
from training.trainer import TrainingDiverged, fit

DOCUMENTED_KEYS = {
    "config", "model", "mean", "std", "image_size", "cam_grid", "epoch", "optimizer", "scheduler", "scaler",
    "best", "val_metrics", "saliency", "data", "history", "rng", "val_predictions",
}  # fmt: skip


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        data=str(data), arch="cyborg_local_tiny", weights="none", image_size=32, epochs=2, batch_size=8,
        lr=0.02, lr_step=1, lr_gamma=0.5, workers=0, device="cpu", out=str(out), val_fraction=0.25,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def two_epoch_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    fit(tiny_config(tiny_data, out, workers=1), progress=False)  # a persistent worker across both epochs
    return out


def without_timing(history: list[dict]) -> list[dict]:
    """Each epoch's numbers, less the throughput (which depends on the machine's load)."""
    return [{k: v for k, v in row.items() if k != "train_images_per_s" and isinstance(v, (int, float))} for row in history]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_data, two_epoch_run, tmp_path):
    out = tmp_path / "resumed"
    fit(tiny_config(tiny_data, out, epochs=1), progress=False)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    fit(tiny_config(tiny_data, out, epochs=2, workers=1), resume=True, progress=False)  # loader workers change nothing
    straight, resumed = load_checkpoint(two_epoch_run / "last.pt"), load_checkpoint(out / "last.pt")
    assert resumed["epoch"] == 2
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert resumed["scheduler"]["last_epoch"] == straight["scheduler"]["last_epoch"] == 2
    for again, first in zip(without_timing(resumed["history"]), without_timing(straight["history"]), strict=True):
        assert again == pytest.approx(first, rel=1e-6)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_checkpoint_holds_every_documented_key_and_rebuilds_the_model(two_epoch_run):
    last, best = load_checkpoint(two_epoch_run / "last.pt"), load_checkpoint(two_epoch_run / "best.pt")
    assert DOCUMENTED_KEYS <= set(last) and DOCUMENTED_KEYS <= set(best)
    assert last["saliency"] == "human" and last["image_size"] == 32 and last["cam_grid"] == [4, 4]
    assert best["epoch"] == last["best"]["epoch"] and best["val_metrics"]["auc"] == last["best"]["val_auc"]
    assert set(last["val_metrics"]) >= {"auc", "eer", "eer_threshold", "accuracy", "threshold"}
    # the saved validation predictions are those of the saved weights, on the validation split only
    predictions = last["val_predictions"]
    paths = [Path(p) for p in predictions["paths"]]
    assert len(paths) == 6 and all(p.is_file() for p in paths)
    samples = {s.path: s for s in discover(last["data"]["root"])}
    model, config = model_from_checkpoint(last)
    fresh = predict(model, FaceDataset([samples[p] for p in paths], 32, (4, 4)), batch_size=4)
    np.testing.assert_allclose(fresh["scores"], predictions["scores"], atol=1e-5)
    assert fresh["labels"].tolist() == predictions["labels"]
    assert binary_metrics(predictions["labels"], predictions["scores"])["auc"] == last["val_metrics"]["auc"]
    assert last["val_metrics"]["auc_ci"] == list(auc_interval(predictions["labels"], predictions["scores"]))
    rows = [json.loads(line) for line in (two_epoch_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and rows[1]["lr"] == pytest.approx(0.01)
    assert rows[1]["val_auc_ci"] == last["val_metrics"]["auc_ci"]  # each epoch's AUC with its interval
    assert rows[1]["val_auc_ci"][0] <= rows[1]["val_auc"] <= rows[1]["val_auc_ci"][1]


def test_an_existing_run_needs_resume_and_the_same_settings(tiny_data, two_epoch_run):
    with pytest.raises(UserError, match="pass --resume"):
        fit(tiny_config(tiny_data, two_epoch_run), progress=False)
    with pytest.raises(UserError, match="alpha 0.5 -> 0.2"):
        fit(tiny_config(tiny_data, two_epoch_run, epochs=3, alpha=0.2), resume=True, progress=False)
    with pytest.raises(UserError, match="already completed 2 of 2"):
        fit(tiny_config(tiny_data, two_epoch_run), resume=True, progress=False)


def test_a_weight_average_is_validated_and_kept_and_resumes_exactly(tiny_data, tmp_path):
    straight, resumed = tmp_path / "ema-straight", tmp_path / "ema-resumed"
    fit(tiny_config(tiny_data, straight, ema_decay=0.9), progress=False)
    fit(tiny_config(tiny_data, resumed, ema_decay=0.9, epochs=1), progress=False)
    fit(tiny_config(tiny_data, resumed, ema_decay=0.9, epochs=2), resume=True, progress=False)
    last, again = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    for key in ("model", "training_model"):  # the average and the raw weights both continue exactly
        for name, tensor in last[key].items():
            torch.testing.assert_close(again[key][name], tensor, rtol=0, atol=1e-6, msg=f"{key} {name}")
    moved = [name for name, tensor in last["model"].items() if tensor.is_floating_point() and not torch.equal(tensor, last["training_model"][name])]
    assert moved, "the kept weights are the raw weights: no average was taken"
    # the saved scores and the AUC that picks best.pt are the average's; the raw weights' AUC is logged beside
    samples = {s.path: s for s in discover(last["data"]["root"])}
    dataset = FaceDataset([samples[Path(p)] for p in last["val_predictions"]["paths"]], 32, (4, 4))
    average, _ = model_from_checkpoint(last)
    np.testing.assert_allclose(predict(average, dataset, batch_size=4)["scores"], last["val_predictions"]["scores"], atol=1e-5)
    raw, _ = model_from_checkpoint({**last, "model": last["training_model"]})
    raw_scores = predict(raw, dataset, batch_size=4)["scores"]
    assert last["history"][-1]["val_auc_raw"] == pytest.approx(binary_metrics(last["val_predictions"]["labels"], raw_scores)["auc"])
    assert last["history"][-1]["val_auc"] == last["val_metrics"]["auc"]
    with pytest.raises(UserError, match=r"--ema-decay 1.0: must be in \[0, 1\)"):
        fit(tiny_config(tiny_data, tmp_path / "bad", ema_decay=1.0), progress=False)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    real_step, calls = guidance.METHODS["cyborg"], []

    def poisoned(model, batch, config):  # the 5th step (epoch 2, step 2 of 3) goes NaN
        result = real_step(model, batch, config)
        calls.append(1)
        if len(calls) == 5:
            result.loss = result.loss * math.nan
        return result

    monkeypatch.setitem(guidance.METHODS, "cyborg", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2: the loss became NaN.*last.pt keeps epoch 1"):
        fit(tiny_config(tiny_data, out, epochs=3), progress=False)
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    model_from_checkpoint(last)  # still a usable checkpoint


def test_unreadable_images_are_named_before_training_or_skipped(tmp_path):
    data = make_plain_dataset(tmp_path, n_real=6, n_fake=6, size=32)
    truncated = data / "fake" / "fake_004.png"
    truncated.write_bytes(truncated.read_bytes()[:60])  # the header reads, the pixels do not
    with pytest.raises(UserError, match=r"fake_004.png: corrupt or truncated.*--skip-unreadable"):
        fit(tiny_config(data, tmp_path / "run"), progress=False)
    bad = corrupt(data / "fake" / "fake_002.png")  # not even a header
    with pytest.raises(UserError, match="fake_002.png"):
        fit(tiny_config(data, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()
    summary = fit(tiny_config(data, tmp_path / "run", epochs=1, skip_unreadable=True), progress=False)
    counts = load_checkpoint(tmp_path / "run" / "last.pt")["data"]["counts"]
    assert sum(split["fake"] for split in counts.values()) == 4 and summary["best_epoch"] == 1
    assert bad.exists() and truncated.exists()  # nothing is deleted


def test_cli_flags_override_the_config_file_and_record_no_maps(tmp_path, capsys):
    data = make_plain_dataset(tmp_path, n_real=6, n_fake=6, size=32, maps=False)
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps({"epochs": 3, "alpha": 0.3, "batch_size": 4, "lr": 0.01}))
    out = tmp_path / "run"
    argv = ["train", str(data), "--arch", "cyborg_local_tiny", "--weights", "none", "--config", str(config_file),
            "--epochs", "1", "--image-size", "32", "--workers", "0", "--device", "cpu", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("best epoch 1/1, val AUC") and "none maps" in line and str(out / "best.pt") in line
    state = load_checkpoint(out / "best.pt")
    assert (state["config"]["epochs"], state["config"]["alpha"], state["config"]["batch_size"]) == (1, 0.3, 4)
    assert state["saliency"] == "none"
    assert main(["train", str(data), "--arch", "cyborg_local_tiny", "--alpha", "2", "--out", str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------- behaviour: the decoy set

SIZE = 32  # 4x4 CAM grid on cyborg_local_tiny; the annotated region is the bottom-right 2x2 cells


def decoy_image(label: int, rng: np.random.Generator, decoy: str, amplitude: float = 12.0) -> Image.Image:
    """Noise; a faint texture inside the annotated region (checkerboard: fake, stripes: real) is the
    true cue; a solid top-left corner (bright: fake, dark: real) is the decoy, agreeing with the label
    ("agree") or random ("random")."""
    pixels = rng.normal(128.0, 25.0, (SIZE, SIZE, 1)).repeat(3, axis=2)
    half = SIZE // 2
    rows, cols = np.mgrid[0:half, 0:half]
    texture = ((rows + cols) % 2) if label else ((rows // 2) % 2)
    pixels[half:, half:] += amplitude * (2.0 * texture[..., None] - 1.0)
    cue = label if decoy == "agree" else int(rng.integers(0, 2))
    pixels[: SIZE // 4, : SIZE // 4] = 230.0 if cue else 25.0
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_decoy_split(root: Path, split: str, count: int, decoy: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    region = np.zeros((SIZE, SIZE), dtype=np.uint8)
    region[SIZE // 2 :, SIZE // 2 :] = 255
    (root / split / "maps").mkdir(parents=True)
    for label, name in ((0, "real"), (1, "fake")):
        (root / split / name).mkdir()
        for i in range(count):
            file = f"{split}_{name}_{i:03d}.png"
            decoy_image(label, rng, decoy).save(root / split / name / file)
            Image.fromarray(region).save(root / split / "maps" / file)


@pytest.mark.slow
def test_cyborg_looks_inside_the_annotated_region_and_beats_ce_on_the_decoy_free_test(tmp_path):
    data = tmp_path / "decoy"
    write_decoy_split(data, "train", 160, "agree", seed=1)
    write_decoy_split(data, "val", 40, "agree", seed=2)
    write_decoy_split(data, "test", 80, "random", seed=3)
    test_set = FaceDataset([s for s in discover(data) if s.split == "test"], SIZE, (4, 4))
    results = {}
    for method in ("ce", "cyborg"):
        out = tmp_path / method
        config = TrainConfig(
            data=str(data), arch="cyborg_local_tiny", weights="none", image_size=SIZE, guidance=method,
            epochs=6, batch_size=20, lr=0.05, workers=0, device="cpu", out=str(out), seed=0,
        )  # fmt: skip
        summary = fit(config, progress=False)
        assert summary["best_val_auc"] > 0.95  # both learn the training task (the decoy makes it easy)
        # last.pt, not best.pt: the validation split carries the decoy too, so its AUC is 1 from epoch 1
        model, _ = model_from_checkpoint(load_checkpoint(out / "last.pt"))
        scored = predict(model, test_set, batch_size=80, with_cams=True)
        inside = (scored["cams"] * (scored["saliency"] > 0.5)).sum(axis=(1, 2)) / np.maximum(scored["cams"].sum(axis=(1, 2)), 1e-6)
        results[method] = (binary_metrics(scored["labels"], scores=scored["scores"])["auc"], float(inside.mean()))
    (ce_auc, ce_inside), (cyborg_auc, cyborg_inside) = results["ce"], results["cyborg"]
    # measured: CE AUC 0.74-0.81, inside 0.18-0.28; CYBORG AUC 1.0, inside 0.58-0.67 (4 seeds)
    assert cyborg_inside > 0.45 and cyborg_inside > ce_inside + 0.2, results
    assert cyborg_auc > 0.9 and cyborg_auc > ce_auc + 0.1, results


def running_statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BatchNorm's running mean and variance, by buffer name."""
    return {name: buffer.clone() for name, buffer in model.named_buffers() if "running_" in name}


def test_precise_bn_gives_the_saved_network_statistics_of_clean_training_images(tiny_data, tmp_path):
    """--precise-bn N: before each validation every BatchNorm gets statistics measured afresh on N training
    images prepared without augmentation; the saved network holds exactly those, and is validated with them."""
    from torch.optim.swa_utils import update_bn

    from core.images import spread
    from training.trainer import load_data

    config = tiny_config(tiny_data, tmp_path / "precise", epochs=1, augment="everyday", augment_p=1.0, precise_bn=10)
    fit(config, progress=False)
    saved = load_checkpoint(tmp_path / "precise" / "last.pt")
    model, _ = model_from_checkpoint(saved)
    stored = running_statistics(model)
    clean = load_data(config, 32, (4, 4))
    assert len(clean.norm_images) == 10 and not clean.norm_images.train and clean.norm_images.augmenter is None
    assert [s.path for s in clean.norm_images.samples] == [s.path for s in spread(clean.train.samples, 10)]
    loader = torch.utils.data.DataLoader(clean.norm_images, batch_size=config.batch_size)
    update_bn((batch["image"] for batch in loader), model)  # the same measurement, made here
    for name, buffer in running_statistics(model).items():
        torch.testing.assert_close(buffer, stored[name], rtol=1e-4, atol=1e-5, msg=name)
    predictions = saved["val_predictions"]
    samples = {s.path: s for s in discover(saved["data"]["root"])}
    fresh = predict(model, FaceDataset([samples[Path(p)] for p in predictions["paths"]], 32, (4, 4)), batch_size=4)
    np.testing.assert_allclose(fresh["scores"], predictions["scores"], atol=1e-5)  # validated with those statistics
    fit(tiny_config(tiny_data, tmp_path / "running", epochs=1, augment="everyday", augment_p=1.0), progress=False)
    running, _ = model_from_checkpoint(load_checkpoint(tmp_path / "running" / "last.pt"))
    assert any(not torch.allclose(buffer, stored[name], atol=1e-3) for name, buffer in running_statistics(running).items())


def test_precise_bn_changed_measures_statistics_on_a_share_of_changed_images(tiny_data, tmp_path):
    """--precise-bn-changed F: a seeded share F of the --precise-bn images goes through the training
    augmentation first; the saved statistics are those of that mix, not of the clean images."""
    from torch.optim.swa_utils import update_bn

    from core.images import spread
    from training.trainer import load_data

    config = tiny_config(tiny_data, tmp_path / "mix", epochs=1, augment="everyday", augment_p=1.0, precise_bn=10,
                         precise_bn_changed=0.5)  # fmt: skip
    data = load_data(config, 32, (4, 4))
    changed, clean = data.norm_images.datasets
    assert len(changed) == len(clean) == 5 and changed.train and changed.augmenter is not None and not changed.teacher_view
    assert not clean.train and clean.augmenter is None
    assert sorted(str(s.path) for s in [*changed.samples, *clean.samples]) == sorted(str(s.path) for s in spread(data.train.samples, 10))
    again = load_data(config, 32, (4, 4)).norm_images.datasets[0]
    torch.testing.assert_close(again[0]["image"], changed[0]["image"])  # the same changed images at every validation
    assert [s.path for s in again.samples] == [s.path for s in changed.samples]
    fit(config, progress=False)
    model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "mix" / "last.pt"))
    stored = running_statistics(model)
    measured = {}
    for which, images in (("mix", data.norm_images), ("clean", data.train.rebuilt(spread(data.train.samples, 10), train=False))):
        update_bn((batch["image"] for batch in torch.utils.data.DataLoader(images, batch_size=config.batch_size)), model)
        measured[which] = running_statistics(model)
    for name, buffer in stored.items():
        torch.testing.assert_close(measured["mix"][name], buffer, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.allclose(measured["clean"][name], buffer, atol=1e-3) for name, buffer in stored.items())
    assert tiny_config(tiny_data, tmp_path / "clean", precise_bn=10).precise_bn_changed == 0.0  # default: all clean


@pytest.mark.parametrize("overrides, message", [
    (dict(precise_bn=-1), r"--precise-bn -1: a number of training images"),
    (dict(precise_bn=8, freeze_bn=True), r"--precise-bn re-measures BatchNorm statistics that --freeze-bn keeps fixed"),
    (dict(precise_bn=8, augment="everyday", precise_bn_changed=1.5), r"--precise-bn-changed 1.5: a share of the --precise-bn images, in \[0, 1\]"),
    (dict(augment="everyday", precise_bn_changed=0.3), r"--precise-bn-changed sends a share .* it needs --precise-bn N and an --augment"),
    (dict(precise_bn=8, precise_bn_changed=0.3), r"it needs --precise-bn N and an --augment other than none"),
])  # fmt: skip
def test_bad_precise_bn_settings_are_named(tiny_data, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_config(tiny_data, tmp_path / "run", **overrides).validate()
