"""`cyborg export VERSION_FOLDER --precision int8`: a published fp32 version quantised without its
checkpoint; 7-bit weights and fp32 stems by default (`--int8-weight-bits`, `--int8-stem`)."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from core import contract as c
from core.images import load_images
from tests.datasets import make_face_image
from tests.test_export import SIZE, export, make_checkpoint
from training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from training.data import discover, split_samples
from training.evaluate import binary_metrics
from training.model import fake_probability

PER_CLASS = 8
VAL_FRACTION = 0.5


def write_data(folder, seed: int = 0):
    rng = np.random.default_rng(seed)
    for label, name in enumerate(c.CLASS_NAMES):
        (folder / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            make_face_image(label, 80, rng).save(folder / name / f"{i:02d}.png")
    return folder


def checkpoint_trained_on(data, folder, seed: int = 0):
    """make_checkpoint's network, its record pointing at `data`'s validation split (as `cyborg train` writes it)."""
    import torch

    path = make_checkpoint(folder, seed=seed, out=folder / f"seed{seed}.pt")
    state = load_checkpoint(path)
    state.pop("format")
    val = split_samples(discover(data), VAL_FRACTION, 0)["val"]
    model, _ = model_from_checkpoint(state)
    with torch.no_grad():
        scores = fake_probability(model(torch.from_numpy(load_images([str(s.path) for s in val], SIZE, SIZE))).logits)
    state["config"].update(data=str(data), val_fraction=VAL_FRACTION, seed=0)
    counts = {name: sum(s.label == label for s in val) for label, name in enumerate(c.CLASS_NAMES)}
    state["data"] = {"root": str(data), "counts": {"val": counts}}
    state["val_predictions"] = {"paths": [str(s.path) for s in val], "labels": [s.label for s in val],
                                "scores": scores.tolist(), "sources": [s.source for s in val]}  # fmt: skip
    state["val_metrics"] = binary_metrics(np.array([s.label for s in val]), scores.numpy())  # of this split, as the trainer records
    save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(repository with the fp32 version det/1, its data folder)."""
    folder = tmp_path_factory.mktemp("requantize")
    data = write_data(folder / "data")
    checkpoint = checkpoint_trained_on(data, folder)
    repo = folder / "models"
    assert export(checkpoint, "--repository", repo, "--name", "det", "--version", 1) == 0
    return repo, data


@pytest.fixture(scope="module")
def requantised(published):
    repo, _ = published
    assert export(repo / "det" / "1", "--repository", repo, "--name", "det", "--version", 2, "--precision", "int8",
                  "--calibration-images", 8, "--points-under", "blur1") == 0  # fmt: skip
    return repo / "det" / "2"


def weight_ranges(path) -> list[int]:
    """The largest |value| of each int8 weight tensor of a QDQ graph."""
    graph = onnx.load(str(path)).graph
    return [int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max()) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]


def convolutions_by_weight_type(path) -> tuple[list[str], list[str]]:
    """(Conv nodes whose weights are fp32 initializers, Conv nodes whose weights are dequantised int8)."""
    graph = onnx.load(str(path)).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    return [n.name for n in convs if n.input[1] in floats], [n.name for n in convs if n.input[1] not in floats]


def test_stem_convolutions_are_the_first_of_each_branch():
    from onnx import TensorProto, helper

    from training.quantize import stem_convolutions

    def conv(name, x, out):
        return helper.make_node("Conv", [x, f"w_{name}"], [out], name=name)

    nodes = [helper.make_node("Div", ["images", "s"], ["div"], name="norm"), conv("a1", "div", "a"), helper.make_node("Relu", ["a"], ["ar"]),
             conv("a2", "ar", "b"), conv("b1", "div", "c"), conv("b2", "c", "d"), helper.make_node("Add", ["b", "d"], ["e"]),
             conv("head", "e", "out")]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])  # fmt: skip
    assert stem_convolutions(graph) == ["a1", "b1"]  # two networks side by side, as in an ensemble


def test_a_published_version_becomes_an_int8_version_of_the_same_network(published, requantised):
    from training.onnx_export import ort_session, run_onnx

    repo, data = published
    source, contract = c.read_contract(repo / "det" / "1"), c.read_contract(requantised, verify=True)
    assert (contract.precision, contract.version, contract.int8_weight_bits) == ("int8", 2, 7)
    assert contract.training["quantised_from"] == {"name": "det", "version": 1, "model.onnx": source.files[c.ONNX_FILE]}
    assert contract.metrics["int8"]["fp32_sha256"] == source.files[c.ONNX_FILE] == contract.fp32_source
    for field in ("input_height", "scale", "mean", "std", "cam_height", "architecture"):
        assert getattr(contract, field) == getattr(source, field)
    # measured on the source's validation split, re-drawn from the recorded data folder
    val = split_samples(discover(data), VAL_FRACTION, 0)["val"]
    assert contract.metrics["int8"]["evaluation_images"] == len(val)
    point = contract.metrics["operating_points"][contract.operating_points["default"]]
    assert point["fitted_under"] == ["clean", "blur1"] and point["validation_images"] == 2 * len(val)
    images = load_images([str(s.path) for s in val], SIZE, SIZE)
    fp32 = run_onnx(ort_session(repo / "det" / "1" / c.ONNX_FILE), images)[c.SCORE_OUTPUT]
    int8 = run_onnx(ort_session(requantised / c.ONNX_FILE), images)[c.SCORE_OUTPUT]
    assert np.abs(int8 - fp32).max() < 0.05 and np.abs(int8 - fp32).max() > 0  # quantised, and close
    assert max(weight_ranges(requantised / c.ONNX_FILE)) <= 64  # 7-bit weights: no u8 x s8 pair sum saturates
    fp32_convs, int8_convs = convolutions_by_weight_type(requantised / c.ONNX_FILE)
    record = contract.metrics["int8"]
    assert record["stem"] == "fp32" and len(fp32_convs) == 1 and record["fp32_convolutions"] == fp32_convs  # the stem, by default
    assert len(int8_convs) > 1 and "stem convolutions in fp32" in record["quantisation"]


def test_eight_bit_weights_and_an_int8_stem_are_recorded_and_written(published, tmp_path):
    repo, _ = published
    out = tmp_path / "models"
    assert export(repo / "det" / "1", "--repository", out, "--name", "det", "--version", 3, "--precision", "int8",
                  "--calibration-images", 4, "--int8-weight-bits", "8", "--int8-stem", "int8") == 0  # fmt: skip
    contract = c.read_contract(out / "det" / "3")
    assert contract.int8_weight_bits == 8 and "in 8 bits" in contract.metrics["int8"]["quantisation"]
    assert max(weight_ranges(out / "det" / "3" / c.ONNX_FILE)) > 64
    assert contract.metrics["int8"]["stem"] == "int8" and contract.metrics["int8"]["fp32_convolutions"] == []
    assert convolutions_by_weight_type(out / "det" / "3" / c.ONNX_FILE)[0] == []  # every convolution quantised


def test_moved_data_is_found_with_data_and_other_data_is_refused(published, tmp_path, capsys):
    repo, data = published
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert export(repo / "det" / "1", "--repository", tmp_path / "a", "--name", "det", "--version", 2, "--precision", "int8",
                  "--calibration-images", 4, "--data", moved) == 0  # fmt: skip
    assert c.read_contract(tmp_path / "a" / "det" / "2").metrics["int8"]["evaluation_images"] == PER_CLASS
    other = write_data(tmp_path / "other", seed=1)
    for name in ("00.png", "01.png"):
        (other / "fake" / name).unlink()  # two images fewer: a different split
    assert export(repo / "det" / "1", "--repository", tmp_path / "b", "--name", "det", "--version", 2, "--precision", "int8",
                  "--data", other) == 2  # fmt: skip
    assert "but det v1 was validated on 4 real and 4 fake: not the data it was trained on" in capsys.readouterr().err
    assert not (tmp_path / "b" / "det" / "2").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--precision", "fp32"], "a published version is re-exported as an int8 version only (--precision int8)"),
        (["--precision", "int8", "--int8-weight-bits", "6"], "--int8-weight-bits 6: one of 7, 8"),
        (["--precision", "int8", "--int8-stem", "fp16"], "--int8-stem 'fp16': one of fp32, int8"),
        (["--precision", "int8", "--data", "nowhere"], "not found here: nowhere (pass --data FOLDER... where they are now)"),
    ],
)
def test_bad_requests_are_refused(published, tmp_path, capsys, flags, message):
    repo, _ = published
    assert export(repo / "det" / "1", "--repository", tmp_path / "m", "--name", "det", "--version", 2, *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_an_int8_source_and_data_for_a_checkpoint_are_refused(published, requantised, tmp_path, capsys):
    repo, data = published
    assert export(requantised, "--repository", tmp_path / "m", "--name", "det", "--version", 3, "--precision", "int8") == 2
    assert "(det v2, int8): only an fp32 version can be quantised" in capsys.readouterr().err
    checkpoint = make_checkpoint(tmp_path)
    assert export(checkpoint, "--repository", tmp_path / "m", "--name", "det", "--version", 3, "--precision", "int8", "--data", data) == 2
    assert "--data: only for a published version folder as the source" in capsys.readouterr().err


def test_a_source_without_a_data_record_is_refused(published, tmp_path, capsys):
    repo, _ = published
    copy = tmp_path / "det" / "1"
    shutil.copytree(repo / "det" / "1", copy)
    meta = json.loads((copy / c.CONTRACT_FILE).read_text())
    meta["training"].pop("data")
    (copy / c.CONTRACT_FILE).write_text(json.dumps(meta))
    assert export(copy, "--repository", tmp_path / "m", "--name", "det", "--version", 2, "--precision", "int8") == 2
    assert "model.json records no training data folders" in capsys.readouterr().err
