"""`cyborg export`: ONNX parity, dynamic batch, model.json, Triton config, int8, atomicity, refusals."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cyborg.cli import main
from core import contract as c
from tests.datasets import make_face_image
from training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from training.config import TrainConfig
from core.thresholds import Calibration, equal_error_rate, expected_calibration_error
from training.evaluate import binary_metrics
from training.model import cam_grid, create_classifier, fake_probability

SIZE = 64
N_VAL = 12


def make_checkpoint(folder: Path, arch: str = "test_resnet", seed: int = 0, out: Path | None = None) -> Path:
    """A checkpoint with the trainer's keys: batch norms re-estimated, validation images on disk (written
    once per architecture and folder, so checkpoints of several seeds share their validation images)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = create_classifier(arch)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: exact statistics of the passes below
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 256, (8, 3, SIZE, SIZE), dtype=torch.uint8))
    model.eval()
    val_dir = folder / f"val-{arch}"
    val_dir.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for i in range(N_VAL):
        label = i % 2
        path = val_dir / f"{i:02d}.png"
        if not path.exists():
            make_face_image(label, 80, rng).save(path)  # not 64 px: export must resize as serving does
        paths.append(str(path))
        labels.append(label)
    from core.images import load_images

    with torch.no_grad():
        scores = fake_probability(model(torch.from_numpy(load_images(paths, SIZE, SIZE))).logits).tolist()
    config = TrainConfig(arch=arch, weights="none", image_size=SIZE, epochs=2, alpha=0.5, seed=seed, data=str(val_dir))
    state = {
        "config": config.to_dict(),
        "model": model.state_dict(),
        "mean": list(model.pixel_mean.flatten().div(255).tolist()),
        "std": list(model.pixel_std.flatten().div(255).tolist()),
        "image_size": SIZE,
        "cam_grid": list(cam_grid(model, SIZE)),
        "epoch": 2,
        "best": {"epoch": 2, "val_auc": 0.5},
        "val_metrics": binary_metrics(np.array(labels), np.array(scores)),
        "saliency": "proxy",
        "data": {"root": str(val_dir), "counts": {"val": N_VAL}},
        "history": [],
        "val_predictions": {"paths": paths, "labels": labels, "scores": scores, "sources": ["synthetic"] * N_VAL},
    }
    path = out or folder / f"{arch}.pt"
    save_checkpoint(state, path)
    return path


def export(*args: str) -> int:
    return main(["export", *map(str, args)])


def hidden_entries(repo: Path) -> list[Path]:
    return [p for p in repo.rglob(".*")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One fp32 + int8 export of a test_resnet checkpoint through the CLI: (repository, checkpoint)."""
    folder = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(folder)
    repo = folder / "models"
    assert export(checkpoint, "--repository", repo, "--name", "det", "--version", 1, "--int8", "--calibration-images", 8) == 0
    return repo, checkpoint


def test_layout_contract_and_checksums(exported, tmp_path):
    repo, checkpoint = exported
    version = repo / "det" / "1"
    state = load_checkpoint(checkpoint)
    contract = c.read_contract(version, verify=True)
    assert sorted(p.name for p in version.iterdir()) == sorted(
        [c.ONNX_FILE, c.INT8_ONNX_FILE, c.CONTRACT_FILE, c.TRITON_CONFIG_FILE]
    )
    assert (repo / "det" / c.TRITON_CONFIG_FILE).read_text() == (version / c.TRITON_CONFIG_FILE).read_text()
    assert hidden_entries(repo) == []  # no staging folder left behind
    assert set(contract.files) == {c.ONNX_FILE, c.INT8_ONNX_FILE, c.TRITON_CONFIG_FILE}
    for name, digest in contract.files.items():
        assert c.sha256_file(version / name) == digest

    assert (contract.name, contract.version, contract.architecture) == ("det", 1, "test_resnet")
    assert contract.input_shape == (3, SIZE, SIZE)
    assert list(contract.cam_shape) == state["cam_grid"]
    assert contract.mean == pytest.approx(state["mean"]) and contract.std == pytest.approx(state["std"])
    labels, scores = np.array(state["val_predictions"]["labels"]), np.array(state["val_predictions"]["scores"])
    # Calibrated on the validation predictions; the default operating point is fpr1 on the calibrated probability.
    calibration = Calibration.from_dict(contract.calibration)
    points = contract.operating_points
    assert set(points) == {"eer", "fpr1", "fpr5", "default"} and points["default"] == "fpr1"
    probabilities = calibration.apply(scores)
    assert (probabilities[labels == 0] >= points["fpr1"]).mean() <= 0.01
    assert np.array_equal(scores >= contract.threshold, probabilities >= points["fpr1"])
    assert points["eer"] == pytest.approx(calibration.apply(equal_error_rate(labels, scores)[1]))
    report = contract.metrics["calibration"]
    assert report["method"] == contract.calibration["method"] and set(report["compared"]) <= {"none", "temperature", "platt"}
    assert report["ece_after"] == pytest.approx(expected_calibration_error(labels, probabilities))
    assert report["log_loss_after"] <= report["log_loss_before"] + 1e-9 or report["method"] == "none"
    assert contract.metrics["threshold"]["rule"] == "fpr:0.01" and contract.metrics["operating_points"]["fpr5"]["fpr"] <= 0.05
    assert contract.metrics["validation"]["auc"] == pytest.approx(state["val_metrics"]["auc"])
    assert contract.metrics["export"]["exporter"] == "dynamo"
    training = contract.training
    assert (training["saliency"], training["alpha"], training["guidance"], training["epochs"], training["seed"]) == (
        "proxy", 0.5, "cyborg", 2, 0
    )
    assert training["data"]["counts"] == {"val": N_VAL}
    assert training["checkpoint_sha256"] == c.sha256_file(checkpoint)
    assert contract.created

    copy = tmp_path / "copy"
    shutil.copytree(version, copy)
    onnx_bytes = bytearray((copy / c.ONNX_FILE).read_bytes())
    onnx_bytes[-1] ^= 0xFF
    (copy / c.ONNX_FILE).write_bytes(bytes(onnx_bytes))
    with pytest.raises(c.ContractError, match="sha256"):
        c.read_contract(copy)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_torch_with_dynamic_batch(exported, batch):
    from core.images import load_images
    from training.checkpoint import validation_images
    from training.onnx_export import ExportModule, compare, ort_session, run_onnx, run_torch

    repo, checkpoint = exported
    state = load_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(state)
    paths, _ = validation_images(state)
    images = load_images(paths[:batch], SIZE, SIZE)
    session = ort_session(repo / "det" / "1" / c.ONNX_FILE)
    assert [i.name for i in session.get_inputs()] == [c.INPUT_NAME]
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert session.get_inputs()[0].shape[1:] == [3, SIZE, SIZE] and isinstance(session.get_inputs()[0].shape[0], str)
    assert [o.name for o in session.get_outputs()] == list(c.OUTPUT_NAMES)
    onnx_out, torch_out = run_onnx(session, images), run_torch(ExportModule(model), images)
    grid = tuple(state["cam_grid"])
    assert onnx_out[c.SCORE_OUTPUT].shape == (batch,)
    assert onnx_out[c.LOGITS_OUTPUT].shape == (batch, 2)
    assert onnx_out[c.CAM_OUTPUT].shape == (batch, *grid)
    cams = onnx_out[c.CAM_OUTPUT]
    assert cams.min() >= 0.0 and cams.max() <= 1.0 + 1e-6
    assert (cams.reshape(batch, -1).max(1) == pytest.approx(1.0, abs=1e-5))  # non-degenerate: re-estimated BN
    diffs = compare(torch_out, onnx_out)
    assert diffs[c.SCORE_OUTPUT] <= 1e-4 and diffs[c.LOGITS_OUTPUT] <= 1e-4 and diffs[c.CAM_OUTPUT] <= 5e-4
    assert diffs["class_agreement"] == 1.0
    softmax = torch.from_numpy(onnx_out[c.LOGITS_OUTPUT]).softmax(1)[:, c.FAKE_INDEX].numpy()
    np.testing.assert_allclose(onnx_out[c.SCORE_OUTPUT], softmax, atol=1e-6)


def test_parity_check_refuses_a_mismatch(exported):
    from training.onnx_export import ExportError, ExportModule, check_parity

    repo, checkpoint = exported
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    with torch.no_grad():
        model.classifier.bias[c.FAKE_INDEX] += 0.01  # torch now differs from the exported graph
    images = np.random.default_rng(1).integers(0, 256, (2, 3, SIZE, SIZE), dtype=np.uint8)
    with pytest.raises(ExportError, match="logits differs"):
        check_parity(ExportModule(model), repo / "det" / "1" / c.ONNX_FILE, images)


def test_triton_config_parses_as_model_config(exported):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo, _ = exported
    contract = c.read_contract(repo / "det" / "1")
    for path in (repo / "det" / c.TRITON_CONFIG_FILE, repo / "det" / "1" / c.TRITON_CONFIG_FILE):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == "det" and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == contract.batching.max_batch_size
        (image,) = config.input
        assert (image.name, list(image.dims)) == (c.INPUT_NAME, [3, SIZE, SIZE])
        assert image.data_type == model_config_pb2.TYPE_UINT8
        outputs = {o.name: o for o in config.output}
        assert list(outputs) == list(c.OUTPUT_NAMES)
        assert list(outputs[c.LOGITS_OUTPUT].dims) == [2]
        assert list(outputs[c.CAM_OUTPUT].dims) == list(contract.cam_shape)
        assert list(outputs[c.SCORE_OUTPUT].reshape.shape) == []  # [B] in the graph
        assert all(o.data_type == model_config_pb2.TYPE_FP32 for o in config.output)
        assert config.dynamic_batching.max_queue_delay_microseconds == round(contract.batching.max_queue_delay_ms * 1000)
        assert config.version_policy.latest.num_versions == 1


def test_int8_model_runs_and_stays_close(exported):
    import onnx

    from training.onnx_export import ort_session, run_onnx

    from core.images import load_images
    from training.checkpoint import validation_images

    repo, checkpoint = exported
    version = repo / "det" / "1"
    graph = onnx.load(str(version / c.INT8_ONNX_FILE)).graph
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) > 0
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    images = load_images(validation_images(load_checkpoint(checkpoint))[0][:2], SIZE, SIZE)  # calibrated on these
    fp32 = run_onnx(ort_session(version / c.ONNX_FILE), images)
    int8 = run_onnx(ort_session(version / c.INT8_ONNX_FILE), images)
    assert int8[c.CAM_OUTPUT].shape == fp32[c.CAM_OUTPUT].shape
    assert np.abs(int8[c.SCORE_OUTPUT] - fp32[c.SCORE_OUTPUT]).max() < 0.05
    info = c.read_contract(version).metrics["int8"]
    assert info["file"] == c.INT8_ONNX_FILE and info["calibration_images"] == 8
    assert info["evaluation_images"] == N_VAL
    assert abs(info["auc_change"]) <= 0.5 and "cam_note" in info


def test_existing_version_is_refused_without_force(exported, capsys):
    repo, checkpoint = exported
    before = c.read_contract(repo / "det" / "1")
    assert export(checkpoint, "--repository", repo, "--name", "det", "--version", 1) == 2
    assert "--force" in capsys.readouterr().err
    assert c.read_contract(repo / "det" / "1") == before


def test_failure_mid_export_leaves_nothing(exported, tmp_path, monkeypatch):
    import training.onnx_export
    import training.triton

    fixture_repo, checkpoint = exported

    def reuse_export(module, path, *args):  # the fixture's graph of the same checkpoint: skips 10 s of export
        shutil.copyfile(fixture_repo / "det" / "1" / c.ONNX_FILE, path)
        return "dynamo"

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure after the ONNX export and parity check")

    monkeypatch.setattr(training.onnx_export, "export_onnx", reuse_export)
    monkeypatch.setattr(training.triton, "triton_config", broken)
    repo = tmp_path / "models"
    with pytest.raises(RuntimeError, match="injected"):
        export(checkpoint, "--repository", repo, "--name", "det", "--version", 1, "--int8", "--calibration-images", 4)
    assert list(repo.iterdir()) == []


def test_failed_force_keeps_the_old_version(exported, tmp_path, monkeypatch):
    import training.onnx_export

    repo = tmp_path / "models"
    shutil.copytree(exported[0], repo)
    before = c.read_contract(repo / "det" / "1")

    def broken(module, path, *args):
        Path(path).write_bytes(b"half a model")
        raise RuntimeError("injected failure while writing model.onnx")

    monkeypatch.setattr(training.onnx_export, "export_onnx", broken)
    with pytest.raises(RuntimeError, match="injected"):
        export(exported[1], "--repository", repo, "--name", "det", "--version", 1, "--force")
    assert c.read_contract(repo / "det" / "1") == before
    assert hidden_entries(repo) == []


def test_force_replaces_a_version_with_another_architecture(exported, tmp_path):
    from core.images import load_images
    from training.checkpoint import validation_images
    from training.onnx_export import ExportModule, compare, ort_session, run_onnx, run_torch

    repo = tmp_path / "models"
    shutil.copytree(exported[0], repo)
    checkpoint = make_checkpoint(tmp_path, arch="test_efficientnet", seed=1)
    assert export(checkpoint, "--repository", repo, "--name", "det", "--version", 1, "--force",
                  "--threshold", "fpr:0.2") == 0
    contract = c.read_contract(repo / "det" / "1")
    assert contract.architecture == "test_efficientnet" and set(contract.files) == {c.ONNX_FILE, c.TRITON_CONFIG_FILE}
    assert contract.metrics["threshold"]["rule"] == "fpr:0.2" and contract.metrics["threshold"]["fpr"] <= 0.2
    assert hidden_entries(repo) == []
    state = load_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(state)
    images = load_images(validation_images(state)[0][:3], SIZE, SIZE)
    diffs = compare(run_torch(ExportModule(model), images), run_onnx(ort_session(repo / "det" / "1" / c.ONNX_FILE), images))
    assert diffs[c.LOGITS_OUTPUT] <= 1e-4 and diffs[c.CAM_OUTPUT] <= 5e-4


@pytest.mark.parametrize("damage, message", [
    ("missing", "no such checkpoint"),
    ("garbage", "corrupt or truncated"),
    ("truncated", "corrupt or truncated"),
    ("unknown_arch", "no_such_net"),
])
def test_bad_checkpoints_are_refused(exported, tmp_path, capsys, damage, message):
    source = exported[1]
    bad = tmp_path / "bad.pt"
    if damage == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        data = source.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "unknown_arch":
        state = load_checkpoint(source)
        state.pop("format")
        state["config"]["arch"] = "no_such_net"
        save_checkpoint(state, bad)
    repo = tmp_path / "models"
    assert export(bad, "--repository", repo, "--name", "det", "--version", 1) == 2
    assert message in capsys.readouterr().err
    assert not repo.exists() or list(repo.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--name", "det", "--version", "1", "--threshold", "often"], "--threshold"),
    (["--name", "det", "--version", "1", "--threshold", "fpr:2"], "false positive rate"),
    (["--name", "det", "--version", "1", "--threshold", "1.5"], "in [0, 1]"),
    (["--name", "det", "--version", "0"], "--version"),
    (["--name", "a/b", "--version", "1"], "--name"),
    (["--name", "det", "--version", "1", "--bench"], "--bench compares fp32 and int8: add --int8 or --precision int8"),
    (["--name", "det", "--version", "1", "--precision", "int8", "--int8"], "--precision int8 makes model.onnx the int8 graph: pass one"),
    (["--name", "det", "--version", "1", "--precision", "int8", "--tensorrt"], "--tensorrt builds its engine from the fp32 graph"),
    (["--name", "det", "--version", "1", "--calibration-data", "x"], "--calibration-data only applies with --int8 or --precision int8"),
    (["--name", "det", "--version", "1", "--precision", "fp16"], "--precision 'fp16': one of fp32, int8"),
    (["--name", "det", "--version", "1", "--calibrate", "isotonic"], "--calibrate"),
    (["--name", "det", "--version", "1", "--points-under", "jpeg30,jpeg10"],
     "--points-under 'jpeg30,jpeg10': unknown perturbation(s) jpeg10; choose from clean, jpeg90, jpeg70"),
    (["--name", "det", "--version", "1", "--points-under", "all", "--device", "tpu"], "--device 'tpu'"),
])
def test_bad_flags_are_refused(exported, tmp_path, capsys, flags, message):
    assert export(exported[1], "--repository", tmp_path / "models", *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_threshold_rules_use_validation_predictions():
    from training.export import choose_threshold

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    state = {"val_predictions": {"labels": labels.tolist(), "scores": scores.tolist()}}
    threshold, info = choose_threshold("eer", state)
    assert threshold == pytest.approx(equal_error_rate(labels, scores)[1])
    assert abs(info["fpr"] - (1 - info["tpr"])) < 0.02
    threshold, info = choose_threshold("fpr:0.05", state)
    called_fake = scores >= threshold
    assert called_fake[labels == 0].mean() <= 0.05 == pytest.approx(info["fpr"], abs=0.05)
    lower = scores[(labels == 0) & (scores < threshold)].max()  # the next real image called fake breaks the budget
    assert (scores[labels == 0] >= lower).mean() > 0.05
    assert choose_threshold("0.3", state) == (0.3, {"rule": "fixed", "value": 0.3})
    with pytest.raises(Exception, match="both classes"):
        choose_threshold("fpr:0.1", {"val_predictions": {"labels": [1, 1], "scores": [0.2, 0.9]}})


def test_scoring_calibrates_and_records_every_operating_point():
    from training.export import choose_scoring

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 300)
    scores = 1 / (1 + np.exp(-(3 * rng.normal(2.0 * labels - 1.0, 1.0) + 1.0)))  # overconfident, biased to fake
    state = {"val_predictions": {"labels": labels.tolist(), "scores": scores.tolist()}}
    scoring = choose_scoring("fpr1", "auto", state)
    assert scoring.calibration["method"] == "platt" and scoring.operating_points["default"] == "fpr1"
    report = scoring.metrics["calibration"]
    assert report["ece_after"] < report["ece_before"] and report["log_loss_after"] < report["log_loss_before"]
    assert report["compared"]["platt"]["cv_log_loss"] < report["compared"]["temperature"]["cv_log_loss"]
    assert scoring.threshold_info["fpr"] <= 0.01
    for method in ("temperature", "none"):
        assert choose_scoring("eer", method, state).calibration["method"] == method
    fixed = choose_scoring("0.8", "platt", state)
    assert fixed.operating_points["default"] == "fixed" and fixed.operating_points["fixed"] == 0.8
    # A checkpoint without validation predictions: the threshold alone (no calibration to fit).
    bare = choose_scoring("fpr1", "auto", {"val_metrics": {"eer_threshold": 0.4}})
    assert (bare.threshold, bare.calibration, bare.operating_points) == (0.4, None, None)
    with pytest.raises(Exception, match="--calibrate platt"):
        choose_scoring("fpr1", "platt", {"val_metrics": {"eer_threshold": 0.4}})


# ---------------------------------------------------------------------------------------------
# --points-under: operating points fitted on the validation images clean and under everyday changes

POINT_SECTIONS = ("threshold", "calibration", "operating_points")


@pytest.fixture
def reused_graph(exported, monkeypatch):
    """export_onnx copies the fixture's graph (the same network): skips 10 s of export per test."""
    import training.onnx_export

    def reuse_export(module, path, *args):
        shutil.copyfile(exported[0] / "det" / "1" / c.ONNX_FILE, path)
        return "dynamo"

    monkeypatch.setattr(training.onnx_export, "export_onnx", reuse_export)


def test_points_under_clean_changes_nothing(exported, tmp_path, reused_graph):
    repo, checkpoint = exported
    assert export(checkpoint, "--repository", tmp_path, "--name", "det", "--version", 1, "--points-under", "clean") == 0
    before, after = (json.loads((folder / "det" / "1" / c.CONTRACT_FILE).read_text()) for folder in (repo, tmp_path))
    for key in POINT_SECTIONS:  # the same bytes as the export without the flag, in model.json and its metrics
        assert json.dumps(after[key]) == json.dumps(before[key]) and json.dumps(after["metrics"][key]) == json.dumps(before["metrics"][key])
    assert "fitted_under" not in json.dumps(after) and "clean_fpr" not in json.dumps(after)


def test_points_under_changes_pools_the_changed_reals(exported, tmp_path, reused_graph, caplog):
    from core.thresholds import fit_calibration, operating_point
    from training.checkpoint import read_checkpoint
    from training.data import FaceDataset
    from training.evaluate import PerturbedDataset, predict
    from training.perturb import PERTURBATIONS

    # The validation images under jpeg30 and blur2, scored here through training.evaluate's predict.
    original = read_checkpoint(exported[1])
    model, _ = model_from_checkpoint(original)
    dataset = FaceDataset(original.val_predictions.samples("test"), SIZE, tuple(original.cam_grid), scale=original.input_scale)
    changed = [predict(model, PerturbedDataset(dataset, PERTURBATIONS[name])) for name in ("jpeg30", "blur2")]
    labels = np.array(original.val_predictions.labels)
    changed_reals = np.concatenate([found["scores"][found["labels"] == 0] for found in changed])
    top_real = float(changed_reals.max())
    # Stored clean scores: every real (0.05-0.3) below every fake; half the fakes at 0.6-0.8, half above
    # the highest changed real. Fitted on clean, fpr1 calls all fakes; pooled, only those above every real.
    fakes = np.r_[np.linspace(0.6, 0.8, N_VAL // 4), top_real + (1 - top_real) * np.linspace(0.2, 0.8, N_VAL // 4)]
    clean = np.zeros(N_VAL)
    clean[labels == 0], clean[labels == 1] = np.linspace(0.05, 0.3, N_VAL // 2), fakes
    state = load_checkpoint(exported[1])
    state.pop("format")
    state["val_predictions"]["scores"] = clean.tolist()
    checkpoint = tmp_path / "low.pt"
    save_checkpoint(state, checkpoint)
    caplog.set_level(logging.INFO, logger="training.export")
    repo = tmp_path / "models"
    assert export(checkpoint, "--repository", repo, "--name", "det", "--version", 1, "--points-under", "jpeg30,blur2", "--device", "cpu") == 0
    contract = c.read_contract(repo / "det" / "1")

    pooled_labels = np.concatenate([labels] + [found["labels"] for found in changed])
    pooled_scores = np.concatenate([clean] + [found["scores"] for found in changed])
    assert top_real > 0.8 and pooled_labels.size == 3 * N_VAL  # the situation the flag is for: changed reals above clean fakes
    # 18 reals: 1 % allows none, so the threshold is the lowest fake score above every real.
    expected = pooled_scores[(pooled_labels == 1) & (pooled_scores > top_real)].min()
    assert expected < 1.0 and operating_point("fpr:0.01", pooled_labels, pooled_scores)[0] == pytest.approx(expected)
    assert contract.threshold == pytest.approx(expected, abs=1e-6)
    assert contract.threshold > operating_point("fpr:0.01", labels, clean)[0] == pytest.approx(0.6)

    point = contract.metrics["operating_points"]["fpr1"]
    assert point["fitted_under"] == ["clean", "jpeg30", "blur2"] and point["validation_images"] == 3 * N_VAL
    called = pooled_scores >= contract.threshold
    assert point["fpr"] == 0.0 and point["tpr"] == pytest.approx(called[pooled_labels == 1].mean())
    assert (point["clean_fpr"], point["clean_tpr"]) == (0.0, 0.5)
    assert contract.metrics["threshold"] == point and set(contract.metrics["operating_points"]) == {"eer", "fpr1", "fpr5"}
    assert all(p["fitted_under"] == point["fitted_under"] for p in contract.metrics["operating_points"].values())
    # The calibration is still fitted on the clean predictions alone.
    assert contract.calibration == fit_calibration(labels, clean).to_dict()
    assert contract.metrics["calibration"]["validation_images"] == N_VAL
    logged = [record.getMessage() for record in caplog.records if "fitted under clean, jpeg30, blur2 (36 validation images)" in record.getMessage()]
    assert len(logged) == 1 and f"FPR 0.000, TPR {point['tpr']:.3f}; clean FPR 0.000, TPR 0.500" in logged[0]


def test_points_under_needs_validation_images_of_both_classes(tmp_path):
    from core.errors import UserError
    from training.checkpoint import as_checkpoint
    from training.export import validation_under_changes
    from training.perturb import parse_perturbations

    changes = parse_perturbations("jpeg30,blur2")
    one_class = as_checkpoint({"val_predictions": {"paths": ["a.png", "b.png"], "labels": [1, 1], "scores": [0.2, 0.9]}})
    with pytest.raises(UserError, match="--points-under clean,jpeg30,blur2: the checkpoint has no validation predictions with both classes"):
        validation_under_changes(one_class, None, changes)
    gone = [str(tmp_path / "gone-real.png"), str(tmp_path / "gone-fake.png")]
    missing = as_checkpoint({"val_predictions": {"paths": gone, "labels": [0, 1], "scores": [0.2, 0.9]}})
    with pytest.raises(UserError, match=r"--points-under clean,jpeg30,blur2 scores .* 2 of 2 of them are missing here \(first: .*gone-real"):
        validation_under_changes(missing, None, changes)


# ---------------------------------------------------------------------------------------------
# --precision int8: model.onnx is the int8 graph, scored on its own


@pytest.fixture(scope="module")
def exported_int8(exported, tmp_path_factory):
    """The `exported` checkpoint through `--precision int8`, points fitted under blur1: (version folder, checkpoint)."""
    repo = tmp_path_factory.mktemp("int8") / "models"
    assert export(exported[1], "--repository", repo, "--name", "det", "--version", 2, "--precision", "int8",
                  "--calibration-images", 8, "--points-under", "blur1") == 0  # fmt: skip
    return repo / "det" / "2", exported[1]


def test_precision_int8_makes_model_onnx_the_int8_graph(exported, exported_int8):
    import onnx

    version, _ = exported_int8
    contract = c.read_contract(version, verify=True)
    assert sorted(p.name for p in version.iterdir()) == sorted([c.ONNX_FILE, c.CONTRACT_FILE, c.TRITON_CONFIG_FILE])
    assert contract.precision == "int8" and c.read_contract(exported[0] / "det" / "1").precision == "fp32"
    graph = onnx.load(str(version / c.ONNX_FILE)).graph
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) > 0
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    info = contract.metrics["int8"]
    assert info["file"] == c.ONNX_FILE and info["calibration_images"] == 8 and info["evaluation_images"] == N_VAL
    assert len(info["fp32_sha256"]) == 64 and info["fp32_sha256"] != contract.files[c.ONNX_FILE]


def test_precision_int8_fits_scoring_on_its_own_scores(exported_int8):
    from core.images import read_image, to_model_input
    from core.thresholds import log_loss
    from training.onnx_export import ort_session, run_onnx
    from training.perturb import PERTURBATIONS

    version, checkpoint = exported_int8
    contract = c.read_contract(version)
    predictions = load_checkpoint(checkpoint)["val_predictions"]
    labels = np.array(predictions["labels"])
    session = ort_session(version / c.ONNX_FILE)

    def scores(change: str) -> np.ndarray:
        images = np.stack([to_model_input(PERTURBATIONS[change](read_image(p)), SIZE, SIZE) for p in predictions["paths"]])
        return run_onnx(session, images)[c.SCORE_OUTPUT].astype(np.float64)

    clean, blurred = scores("clean"), scores("blur1")
    assert np.abs(clean - np.array(predictions["scores"])).max() > 1e-6  # not the fp32 graph's scores
    report = contract.metrics["calibration"]
    assert report["validation_images"] == N_VAL and report["log_loss_before"] == pytest.approx(log_loss(labels, clean), abs=1e-7)
    point = contract.metrics["operating_points"][contract.operating_points["default"]]
    assert point["fitted_under"] == ["clean", "blur1"] and point["validation_images"] == 2 * N_VAL
    pooled_labels, pooled = np.r_[labels, labels], np.r_[clean, blurred]
    called = pooled >= contract.threshold - 1e-6
    assert point["fpr"] == pytest.approx(called[pooled_labels == 0].mean()) and point["tpr"] == pytest.approx(called[pooled_labels == 1].mean())


def test_server_serves_the_int8_version_and_says_so(exported_int8):
    from core.images import read_image, to_model_input
    from serving.client import DetectorClient
    from training.onnx_export import ort_session, run_onnx
    from tests.serving_fixtures import RunningServer

    version, checkpoint = exported_int8
    path = load_checkpoint(checkpoint)["val_predictions"]["paths"][0]
    expected = run_onnx(ort_session(version / c.ONNX_FILE), to_model_input(read_image(path), SIZE, SIZE)[None])[c.SCORE_OUTPUT][0]
    with RunningServer(version.parent.parent) as server, DetectorClient(server.address, timeout=30) as client:
        info = client.get_model("det")
        assert (info["precision"], info["version"], info["contract"]["precision"]) == ("int8", 2, "int8")
        assert client.detect(path).score == pytest.approx(float(expected), abs=1e-5)


def test_precision_int8_needs_the_validation_images(exported, tmp_path, capsys):
    state = load_checkpoint(exported[1])
    state.pop("format")
    state["val_predictions"]["paths"] = [str(tmp_path / f"gone-{i}.png") for i in range(N_VAL)]
    checkpoint = tmp_path / "moved.pt"
    save_checkpoint(state, checkpoint)
    assert export(checkpoint, "--repository", tmp_path / "models", "--name", "det", "--version", 1, "--precision", "int8") == 2
    assert "--precision int8 fits the calibration and operating points on the int8 graph's own scores" in capsys.readouterr().err
    assert not (tmp_path / "models" / "det" / "1").exists()
