"""`cyborg norm-statistics`: a finished network's BatchNorm statistics measured again, a share of its images changed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import UserError
from cyborg.cli import main
from tests.datasets import make_plain_dataset
from tests.test_trainer import running_statistics, tiny_config
from training.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from training.data import FaceDataset, discover
from training.ensemble import build_ensemble
from training.evaluate import predict
from training.export import training_provenance
from training.norm_statistics import set_norm_statistics
from training.trainer import fit, load_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A tiny network trained one epoch under heavy augmentation (running statistics of changed images)."""
    out = tmp_path_factory.mktemp("runs") / "augmented"
    fit(tiny_config(tiny_data, out, epochs=1, augment="everyday", augment_p=1.0), progress=False)
    return out / "last.pt"


@pytest.fixture(scope="module")
def unaugmented(tiny_data, tmp_path_factory) -> Path:
    """A tiny network trained one epoch without augmentation (its checkpoint records --augment none)."""
    out = tmp_path_factory.mktemp("runs") / "plain"
    fit(tiny_config(tiny_data, out, epochs=1), progress=False)
    return out / "last.pt"


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def test_statistics_are_those_precise_bn_would_measure_and_the_network_is_validated_again(tiny_data, trained, tmp_path, capsys):
    """The new checkpoint's statistics are exactly those `cyborg train --precise-bn 10 --precise-bn-changed 0.5`
    measures (the same images, the same changes), its weights are unchanged, its validation scores are
    made with the new statistics, and what was done is recorded (and reaches model.json)."""
    from torch.optim.swa_utils import update_bn

    out = tmp_path / "mixed.pt"
    assert main(["norm-statistics", str(trained), "--out", str(out), "--images", "10", "--changed", "0.5",
                 "--augment", "everyday", "--augment-p", "1", "--device", "cpu"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "statistics of 10 training images (5 changed)" in printed and "(before " in printed
    before, after = read_checkpoint(trained), read_checkpoint(out)
    old_model, config = model_from_checkpoint(before)
    new_model, _ = model_from_checkpoint(after)
    old_weights = weights(old_model)
    for name, parameter in weights(new_model).items():
        torch.testing.assert_close(parameter, old_weights[name], rtol=0, atol=0, msg=name)  # statistics only
    as_trained = dataclasses.replace(config, augment="everyday", augment_p=1.0, precise_bn=10, precise_bn_changed=0.5)
    images = load_data(as_trained, 32, (4, 4)).norm_images  # what --precise-bn 10 --precise-bn-changed 0.5 measures on
    update_bn((batch["image"] for batch in torch.utils.data.DataLoader(images, batch_size=32)), old_model)  # as the command batches
    stored = running_statistics(new_model)
    for name, buffer in running_statistics(old_model).items():
        torch.testing.assert_close(stored[name], buffer, rtol=1e-4, atol=1e-5, msg=name)
    samples = {s.path: s for s in discover(str(tiny_data))}
    fresh = predict(new_model, FaceDataset([samples[Path(p)] for p in after.val_predictions.paths], 32, (4, 4)), batch_size=4)
    np.testing.assert_allclose(after.val_predictions.scores, fresh["scores"], atol=1e-5)
    assert not np.allclose(after.val_predictions.scores, before.val_predictions.scores, atol=1e-4)
    assert after.best["val_auc"] == after.val_metrics["auc"] and after.optimizer is None and after.training_model is None
    record = after.norm_statistics
    assert (record["images"], record["changed"], record["share_changed"], record["seed"]) == (10, 5, 0.5, config.seed)
    assert record["augmentation"]["augment"] == "everyday" and record["augmentation"]["augment_p"] == 1.0
    assert record["val_auc_before"] == before.val_metrics["auc"] and record["checkpoint"] == str(trained)
    assert record["data"] == [str(tiny_data)]  # the one folder the run was given, by name
    assert training_provenance(after, after.config, out)["norm_statistics"] == record
    assert "norm_statistics" not in training_provenance(before, before.config, trained)


def test_clean_statistics_by_default_and_another_seed_changes_other_images(trained):
    """--changed 0 (the default) measures on clean images only; the seed decides which images are changed."""
    clean = set_norm_statistics(trained, images=10, device="cpu")
    assert clean.norm_statistics["changed"] == 0 and clean.norm_statistics["augmentation"] is None
    first, second = (set_norm_statistics(trained, images=10, changed=0.5, seed=seed, augmentation=dict(augment="everyday", augment_p=1.0))
                     for seed in (0, 1))  # fmt: skip
    assert first.norm_statistics["seed"] == 0 and second.norm_statistics["seed"] == 1
    assert any(not torch.allclose(first.model[name], second.model[name], atol=1e-4)
               for name in first.model if "running_mean" in name)  # fmt: skip


def test_an_ensemble_gets_every_members_statistics_measured(tiny_data, trained, tmp_path):
    """On a `cyborg ensemble` checkpoint every member's BatchNorm is measured on the same images."""
    second = tmp_path / "second"
    fit(tiny_config(tiny_data, second, epochs=1, augment="everyday", augment_p=1.0, lr=0.05), progress=False)  # same split
    path = tmp_path / "ensemble.pt"
    save_checkpoint(build_ensemble([trained, second / "last.pt"]), path)
    measured = set_norm_statistics(path, images=10, device="cpu")
    for index, member in enumerate([trained, second / "last.pt"]):
        alone = set_norm_statistics(member, images=10, seed=measured.config.seed)
        statistics = [name for name in alone.model if "running_" in name]
        for name in statistics:
            torch.testing.assert_close(measured.model[f"members.{index}.{name}"], alone.model[name], rtol=1e-4, atol=1e-5)
        original = read_checkpoint(member).model
        assert any(not torch.allclose(original[name], alone.model[name], atol=1e-4) for name in statistics)
    assert measured.ensemble and measured.norm_statistics["images"] == 10


def test_keep_first_leaves_the_first_batchnorms_as_they_were(trained):
    """--keep-first N: each network's first N BatchNorms keep their statistics, the others get exactly
    what a full measurement gives them."""
    from training.norm_statistics import batch_norms

    full = set_norm_statistics(trained, images=10, changed=0.5, augmentation=dict(augment="everyday", augment_p=1.0))
    partial = set_norm_statistics(trained, images=10, changed=0.5, augmentation=dict(augment="everyday", augment_p=1.0), keep_first=2)
    original = read_checkpoint(trained)
    model = model_from_checkpoint(original)[0]
    norms = {id(norm) for norm in batch_norms(model)[0]}
    names = [name for name, module in model.named_modules() if id(module) in norms]  # module order, as batch_norms lists them
    assert len(names) > 2 and partial.norm_statistics["kept_first"] == 2
    for index, name in enumerate(names):
        source = original if index < 2 else full
        for buffer in ("running_mean", "running_var"):
            torch.testing.assert_close(partial.model[f"{name}.{buffer}"], source.model[f"{name}.{buffer}"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(original.model[f"{names[0]}.running_mean"], full.model[f"{names[0]}.running_mean"], atol=1e-4)


@pytest.mark.parametrize("options, message", [
    (dict(images=0), r"--images 0: at least 1 training image"),
    (dict(changed=1.5), r"--changed 1.5: a share of the images, in \[0, 1\]"),
    (dict(changed=0.3), r"--changed 0.3 sends a share .* augmentation is 'none'; pass --augment"),
    (dict(changed=0.3, augmentation=dict(augment="everyday", augment_p=2.0)), r"--augment-p 2.0: must be in \[0, 1\]"),
    (dict(keep_first=999), r"--keep-first 999: between 0 and the \d+ BatchNorms of each network"),
])  # fmt: skip
def test_bad_settings_are_named(unaugmented, options, message):
    with pytest.raises(UserError, match=message):
        set_norm_statistics(unaugmented, **options)


def test_other_folders_than_the_checkpoints_are_refused(trained, tmp_path):
    """Folders whose validation split is not the checkpoint's: its validation images could be measured on."""
    other = make_plain_dataset(tmp_path / "other", n_real=12, n_fake=12, size=32)
    with pytest.raises(UserError, match=r"is not the checkpoint's \(6 images, 0 in common\); give the folders it was trained on"):
        set_norm_statistics(trained, data=[str(other)], images=10)
