"""`cyborg evaluate`'s calibration report: ECE raw and calibrated (fitted on validation only), reliability.png."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.thresholds import expected_calibration_error, fit_calibration
from training.checkpoint import as_checkpoint
from training.reliability import calibration_report


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    return labels, 1 / (1 + np.exp(-(3 * rng.normal(2.0 * labels - 1.0, 1.0) + 1.0)))


def test_report_fits_on_validation_and_measures_on_the_evaluated_data(tmp_path):
    val_labels, val_scores = overconfident(2000, seed=0)
    labels, scores = overconfident(2000, seed=1)
    state = as_checkpoint({"val_predictions": {"labels": val_labels.tolist(), "scores": val_scores.tolist()}})
    report = calibration_report(state, labels, scores, tmp_path)
    calibration = fit_calibration(val_labels, val_scores)
    assert report["calibration"]["method"] == calibration.method == "platt"
    assert report["raw"]["ece"] == pytest.approx(expected_calibration_error(labels, scores))
    assert report["calibrated"]["ece"] == pytest.approx(expected_calibration_error(labels, calibration.apply(scores)))
    assert report["calibrated"]["ece"] < report["raw"]["ece"] and report["calibrated"]["log_loss"] < report["raw"]["log_loss"]
    assert sum(row["count"] for row in report["raw"]["reliability"]) == 2000 and len(report["raw"]["reliability"]) == report["bins"]
    with Image.open(tmp_path / report["plot"]) as image:
        assert image.format == "PNG" and np.asarray(image.convert("L"), dtype=np.float32).std() > 10

    bare = calibration_report(as_checkpoint({}), labels, scores, tmp_path)  # nothing to fit on: raw only
    assert bare["calibration"] is None and bare["calibrated"] is None and bare["raw"] == report["raw"]


def test_report_fits_the_method_asked_for(tmp_path):
    """`cyborg evaluate --calibrate temperature` reports the calibration `cyborg export --calibrate temperature` writes."""
    val_labels, val_scores = overconfident(2000, seed=0)
    labels, scores = overconfident(2000, seed=1)
    state = as_checkpoint({"val_predictions": {"labels": val_labels.tolist(), "scores": val_scores.tolist()}})
    temperature = calibration_report(state, labels, scores, tmp_path, "temperature")
    expected = fit_calibration(val_labels, val_scores, "temperature")
    assert temperature["calibration"]["method"] == "temperature" and temperature["calibration"] == {**expected.to_dict(), "fitted_on": temperature["calibration"]["fitted_on"]}
    assert temperature["calibrated"]["ece"] == pytest.approx(expected_calibration_error(labels, expected.apply(scores)))
    assert temperature["calibrated"] != calibration_report(state, labels, scores, tmp_path)["calibrated"]  # auto picks Platt here
    assert calibration_report(state, labels, scores, tmp_path, "none")["calibrated"]["ece"] == pytest.approx(temperature["raw"]["ece"])
