"""The model.json contract: validation, round trip, checksums."""

import dataclasses
import json

import pytest

from core import contract as c


def make_contract(**changes) -> c.ModelContract:
    values = dict(
        name="tiny",
        version=1,
        architecture="test_resnet",
        input_height=64,
        input_width=64,
        cam_height=2,
        cam_width=2,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        threshold=0.4,
        training={"saliency": "proxy", "alpha": 0.5},
    )
    values.update(changes)
    return c.ModelContract(**values)


def test_round_trip_and_checksums(tmp_path):
    (tmp_path / c.ONNX_FILE).write_bytes(b"onnx bytes")
    contract = make_contract(files={c.ONNX_FILE: c.sha256_file(tmp_path / c.ONNX_FILE)})
    c.write_contract(tmp_path, contract)
    assert c.read_contract(tmp_path) == contract
    assert contract.label(0.4) == "fake" and contract.label(0.39) == "real"

    (tmp_path / c.ONNX_FILE).write_bytes(b"tampered")
    with pytest.raises(c.ContractError, match="sha256"):
        c.read_contract(tmp_path)
    (tmp_path / c.ONNX_FILE).unlink()
    with pytest.raises(c.ContractError, match="missing"):
        c.read_contract(tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"version": 0}, "version"),
        ({"threshold": 1.5}, "threshold"),
        ({"std": (0.5, 0.0, 0.5)}, "mean/std"),
        ({"output_names": ("score", "logits")}, "tensor names"),
        ({"training": {"saliency": "guessed"}}, "training.saliency"),
        ({"name": "a/b"}, "name"),
        ({"calibration": {"method": "isotonic"}}, "calibration"),
        ({"calibration": {"method": "platt", "a": 1.0}}, "takes a, b"),
        ({"calibration": {"method": "temperature", "temperature": 0.0}}, "above 0"),
        ({"calibration": {"method": "platt", "a": 1.0, "b": float("nan")}}, "calibration b"),
        ({"operating_points": {"eer": 0.5, "default": "fpr1"}}, "operating_points.default"),
        ({"operating_points": {"eer": 1.5, "default": "eer"}}, "operating point 'eer'"),
        ({"operating_points": {"0.5": 0.5, "default": "0.5"}}, "read as a threshold"),
        ({"precision": "fp16"}, r"precision 'fp16' \(one of fp32, int8\)"),
    ],
)
def test_validation_names_the_problem(changes, message):
    with pytest.raises(c.ContractError, match=message):
        make_contract(**changes).validate()


def test_unknown_keys_and_bad_json_are_refused(tmp_path):
    data = dataclasses.asdict(make_contract())
    data["surprise"] = 1
    (tmp_path / c.CONTRACT_FILE).write_text(json.dumps(data))
    with pytest.raises(c.ContractError, match="surprise"):
        c.read_contract(tmp_path, verify=False)
    (tmp_path / c.CONTRACT_FILE).write_text("{not json")
    with pytest.raises(c.ContractError, match="unreadable"):
        c.read_contract(tmp_path, verify=False)
    with pytest.raises(c.ContractError, match="no model.json"):
        c.read_contract(tmp_path / "absent")


def test_precision_is_fp32_unless_written(tmp_path):
    data = dataclasses.asdict(make_contract())
    del data["precision"]  # a model.json from before the field
    (tmp_path / c.CONTRACT_FILE).write_text(json.dumps(data))
    assert c.read_contract(tmp_path, verify=False).precision == "fp32"
    c.write_contract(tmp_path, make_contract(precision="int8"))
    assert c.read_contract(tmp_path, verify=False).precision == "int8"


def test_calibration_and_operating_points_are_optional_and_round_trip(tmp_path):
    (tmp_path / c.ONNX_FILE).write_bytes(b"onnx bytes")
    legacy = make_contract(files={c.ONNX_FILE: c.sha256_file(tmp_path / c.ONNX_FILE)})
    data = legacy.to_dict()
    del data["calibration"], data["operating_points"]  # a model.json written before the fields existed
    (tmp_path / c.CONTRACT_FILE).write_text(json.dumps(data))
    assert c.read_contract(tmp_path) == legacy and legacy.calibration is None and legacy.operating_points is None

    calibrated = dataclasses.replace(legacy, calibration={"method": "platt", "a": 0.7, "b": -0.2},
                                     operating_points={"eer": 0.5, "fpr1": 0.9, "fpr5": 0.8, "default": "fpr1"})  # fmt: skip
    c.write_contract(tmp_path, calibrated)
    assert c.read_contract(tmp_path) == calibrated
