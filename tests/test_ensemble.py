"""`cyborg ensemble`: checkpoints averaged into one model that validates, evaluates and exports as one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cyborg.cli import main
from core import contract as c
from tests.test_export import SIZE, make_checkpoint
from training.checkpoint import load_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint
from training.model import EnsembleCamClassifier, fake_probability


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("members")
    return [make_checkpoint(folder, seed=seed, out=folder / f"seed{seed}.pt") for seed in (0, 1, 2)]


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "ensemble.pt"
    assert main(["ensemble", *map(str, members[:2]), "--out", str(out), "--device", "cpu"]) == 0
    return out


def margins(scores) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    return np.log(scores) - np.log1p(-scores)


def test_ensemble_averages_the_members_logits_and_maps(members, ensemble):
    model, _ = model_from_checkpoint(read_checkpoint(ensemble))
    assert isinstance(model, EnsembleCamClassifier) and len(model.members) == 2
    singles = [model_from_checkpoint(read_checkpoint(path))[0] for path in members[:2]]
    images = torch.randint(0, 256, (5, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        out, parts = model(images), [single(images) for single in singles]
    torch.testing.assert_close(out.logits, (parts[0].logits + parts[1].logits) / 2)
    torch.testing.assert_close(out.class_maps, (parts[0].class_maps + parts[1].class_maps) / 2)
    # the decision is still made from the CAM: logits = mean over the grid + the members' mean bias
    bias = torch.stack([single.classifier.bias for single in singles]).mean(0)
    torch.testing.assert_close(out.logits, out.class_maps.mean(dim=(2, 3)) + bias)


def test_ensemble_is_validated_on_the_members_images(members, ensemble):
    state = read_checkpoint(ensemble)
    first, second = (read_checkpoint(path) for path in members[:2])
    order = [first.val_predictions.paths.index(p) for p in state.val_predictions.paths]
    expected = (margins(first.val_predictions.scores) + margins(second.val_predictions.scores))[order] / 2
    np.testing.assert_allclose(margins(state.val_predictions.scores), expected, atol=1e-4)
    labels = np.asarray(state.val_predictions.labels)
    assert state.val_metrics["auc"] == pytest.approx(roc_auc_score(labels, state.val_predictions.scores))
    assert state.best["val_auc"] == state.val_metrics["auc"]
    assert [m["seed"] for m in state.ensemble] == [0, 1]
    assert state.ensemble[1]["checkpoint_sha256"] == c.sha256_file(members[1])
    assert state.architecture == "ensemble of 2: test_resnet + test_resnet"


def test_exported_ensemble_runs_as_one_graph(ensemble, tmp_path):
    import onnxruntime as ort

    repo = tmp_path / "repo"
    assert main(["export", str(ensemble), "--repository", str(repo), "--name", "ens", "--version", "1"]) == 0
    folder = repo / "ens" / "1"
    contract = c.read_contract(folder, verify=True)
    assert contract.architecture == "ensemble of 2: test_resnet + test_resnet"
    assert len(contract.training["ensemble"]) == 2
    images = np.random.default_rng(3).integers(0, 256, (3, 3, SIZE, SIZE), dtype=np.uint8)
    session = ort.InferenceSession(str(folder / c.ONNX_FILE), providers=["CPUExecutionProvider"])
    score, logits, cam = session.run(list(c.OUTPUT_NAMES), {c.INPUT_NAME: images})
    model, _ = model_from_checkpoint(read_checkpoint(ensemble))
    with torch.no_grad():
        expected = fake_probability(model(torch.from_numpy(images)).logits).numpy()
    np.testing.assert_allclose(score, expected, atol=1e-4)
    assert cam.shape == (3, contract.cam_height, contract.cam_width)


def rewrite(path: Path, out: Path, **changes) -> Path:
    state = load_checkpoint(path)
    state.update(changes)
    save_checkpoint(state, out)
    return out


@pytest.mark.parametrize("case, message", [
    ("one", "at least two checkpoints"),
    ("size", "input size 32"),
    ("other-validation", "validated on other images"),
    ("nested", "already an ensemble"),
    ("missing-image", "are missing here"),
])  # fmt: skip
def test_bad_members_are_refused(members, ensemble, tmp_path, capsys, case, message):
    first, second = members[:2]
    if case == "one":
        inputs = [first]
    elif case == "size":
        inputs = [first, rewrite(second, tmp_path / "small.pt", image_size=32)]
    elif case == "other-validation":
        predictions = load_checkpoint(second)["val_predictions"]
        predictions["paths"] = [p.replace("07.png", "other.png") for p in predictions["paths"]]
        inputs = [first, rewrite(second, tmp_path / "other.pt", val_predictions=predictions)]
    elif case == "nested":
        inputs = [ensemble, first]
    else:
        predictions = load_checkpoint(first)["val_predictions"]
        predictions["paths"] = [str(tmp_path / "gone.png")] + predictions["paths"][1:]
        changed = load_checkpoint(second)["val_predictions"] | {"paths": predictions["paths"]}
        inputs = [rewrite(first, tmp_path / "a.pt", val_predictions=predictions), rewrite(second, tmp_path / "b.pt", val_predictions=changed)]
    assert main(["ensemble", *map(str, inputs), "--out", str(tmp_path / "out.pt")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_an_ensemble_is_not_accepted_as_initial_weights(ensemble):
    from core.errors import UserError
    from training.weights import read_state_dict

    with pytest.raises(UserError, match="an ensemble of 2 networks"):
        read_state_dict(ensemble)


def test_three_members(members, tmp_path):
    out = tmp_path / "three.pt"
    assert main(["ensemble", *map(str, members), "--out", str(out)]) == 0
    model, _ = model_from_checkpoint(read_checkpoint(out))
    assert len(model.members) == 3
