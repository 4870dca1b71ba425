"""Calibration and operating points (core.thresholds): fitted on validation predictions, chosen by name or number."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from core import contract as c
from core.errors import ContractError, UserError
from core.thresholds import (
    IDENTITY,
    Calibration,
    compare_calibrations,
    expected_calibration_error,
    fit_calibration,
    fit_operating_points,
    fit_pooled_operating_points,
    log_loss,
    point_name,
    point_rule,
    reliability_table,
    resolve_operating_point,
)
from tests.test_contract import make_contract


def overconfident(n: int = 2000, seed: int = 0, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores whose logits are 3x too large and shifted towards "fake": a miscalibrated model."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    true_logit = rng.normal(2.0 * labels - 1.0, 1.0)
    return labels, 1.0 / (1.0 + np.exp(-(3.0 * true_logit + shift)))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    fake, real = scores[labels == 1], scores[labels == 0]
    return float((fake[:, None] > real[None]).mean() + 0.5 * (fake[:, None] == real[None]).mean())


@pytest.mark.parametrize("method, shift", [("temperature", 0.0), ("platt", 1.0), ("auto", 1.0)])
def test_calibration_lowers_log_loss_and_ece_and_keeps_the_order(method, shift):
    labels, scores = overconfident(shift=shift)  # temperature scaling cannot remove a shift; Platt's b does
    calibration = fit_calibration(labels, scores, method)
    probabilities = calibration.apply(scores)
    assert calibration.method == ("platt" if method == "auto" else method)
    assert log_loss(labels, probabilities) < log_loss(labels, scores) - 0.01
    assert expected_calibration_error(labels, probabilities) < expected_calibration_error(labels, scores) / 2
    assert auc(labels, probabilities) == pytest.approx(auc(labels, scores))  # monotonic: the ROC is unchanged
    order = np.argsort(scores)
    assert np.all(np.diff(probabilities[order]) >= 0)
    # Held-out predictions from the same model are better calibrated too.
    test_labels, test_scores = overconfident(seed=1, shift=shift)
    assert expected_calibration_error(test_labels, calibration.apply(test_scores)) < expected_calibration_error(test_labels, test_scores)


def test_auto_compares_every_method_and_keeps_the_identity_for_calibrated_scores():
    rng = np.random.default_rng(2)
    probabilities = rng.uniform(0.01, 0.99, 3000)
    labels = (rng.uniform(size=probabilities.size) < probabilities).astype(int)  # calibrated by construction
    table = compare_calibrations(labels, probabilities)
    assert set(table) == {"none", "temperature", "platt"}
    assert table["none"]["ece"] < 0.03
    assert table["platt"]["parameters"]["a"] == pytest.approx(1.0, abs=0.15)
    chosen = fit_calibration(labels, probabilities, "auto")
    assert abs(log_loss(labels, chosen.apply(probabilities)) - table["none"]["log_loss"]) < 0.002


def test_apply_works_on_floats_and_arrays_and_inverts():
    calibration = Calibration("platt", 0.6, -0.4)
    assert isinstance(calibration.apply(0.7), float)
    assert calibration.apply(np.array([0.7]))[0] == pytest.approx(calibration.apply(0.7))
    assert calibration.invert(calibration.apply(0.7)) == pytest.approx(0.7)
    assert calibration.invert(0.0) == 0.0 and calibration.invert(1.0) == 1.0
    assert IDENTITY.apply(0.123) == 0.123  # the identity leaves scores exactly as they are
    for calibration in (IDENTITY, Calibration("temperature", 0.5, 0.0), Calibration("platt", 2.0, 1.0)):
        assert Calibration.from_dict(calibration.to_dict()) == calibration
    assert Calibration.from_dict(None) == IDENTITY
    with pytest.raises(ContractError, match="calibration"):
        Calibration.from_dict({"method": "platt", "a": -1.0, "b": 0.0})


def test_bad_fits_are_refused():
    with pytest.raises(UserError, match="calibration 'isotonic'"):
        fit_calibration([0, 1], [0.2, 0.8], "isotonic")
    with pytest.raises(UserError, match="both classes"):
        fit_calibration([1, 1], [0.2, 0.8])
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        fit_calibration([0, 1], [0.2, np.nan])
    labels = np.repeat([0, 1], 50)
    reversed_scores = np.where(labels == 1, 0.2, 0.8) + np.linspace(0, 0.01, 100)
    assert fit_calibration(labels, reversed_scores, "platt") == IDENTITY  # would reverse the order


def test_reliability_table_and_ece():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([0.1, 0.1, 0.9, 0.7])
    rows = reliability_table(labels, probabilities, bins=10)
    assert len(rows) == 10 and sum(row["count"] for row in rows) == 4
    assert rows[1] == {"low": 0.1, "high": 0.2, "count": 2, "confidence": pytest.approx(0.1), "accuracy": 0.0}
    assert rows[0]["count"] == 0 and rows[0]["confidence"] is None
    assert expected_calibration_error(labels, probabilities, bins=10) == pytest.approx((2 * 0.1 + 0.1 + 0.3) / 4)
    assert reliability_table([1], [1.0], bins=15)[-1]["count"] == 1  # 1.0 falls in the last bin


def test_operating_points_meet_their_false_positive_budget():
    labels, scores = overconfident(n=2000)
    calibration = fit_calibration(labels, scores)
    points, threshold, info = fit_operating_points(labels, scores, calibration)
    assert set(points) == {"eer", "fpr1", "fpr5", "default"} and points["default"] == "fpr1"
    probabilities = calibration.apply(scores)
    reals, fakes = labels == 0, labels == 1
    for name, budget in (("fpr1", 0.01), ("fpr5", 0.05)):
        called = probabilities >= points[name]
        assert called[reals].mean() <= budget and called[reals].mean() > budget - 0.005
        assert info[name]["fpr"] == pytest.approx(called[reals].mean()) and info[name]["tpr"] == pytest.approx(called[fakes].mean())
    called = probabilities >= points["eer"]
    assert abs(called[reals].mean() - (1 - called[fakes].mean())) < 0.01
    # The raw-score threshold calls the same images fake as the default point on the probability.
    assert np.array_equal(scores >= threshold, probabilities >= points["fpr1"])
    assert points["eer"] < points["fpr5"] < points["fpr1"]


def test_other_default_rules():
    labels, scores = overconfident()
    calibration = fit_calibration(labels, scores)
    points, threshold, info = fit_operating_points(labels, scores, calibration, "fpr:0.2")
    assert points["default"] == "fpr20" and info["fpr20"]["fpr"] <= 0.2
    points, threshold, info = fit_operating_points(labels, scores, calibration, "0.7")
    assert points["default"] == "fixed" and points["fixed"] == 0.7
    assert calibration.apply(threshold) == pytest.approx(0.7)
    points, _, _ = fit_operating_points(labels, scores, calibration, "eer")
    assert points["default"] == "eer" and set(points) == {"eer", "fpr1", "fpr5", "default"}
    with pytest.raises(UserError, match="--threshold"):
        fit_operating_points(labels, scores, calibration, "often")
    assert (point_name("fpr:0.01"), point_name("FPR5"), point_rule("fpr1"), point_rule("fpr0.5")) == ("fpr1", "fpr5", "fpr:0.01", "fpr:0.005")


def test_pooled_operating_points_count_the_changed_reals():
    # Clean reals all score below the fakes; under "jpeg" the reals score higher, two above some fakes.
    clean = (np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]))
    jpeg = (np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array([0.3, 0.5, 0.65, 0.75, 0.55, 0.6, 0.9, 0.95]))
    points, threshold, info = fit_operating_points(*clean, IDENTITY, "fpr:0.2")
    assert (points["fpr20"], info["fpr20"]["fpr"], info["fpr20"]["tpr"]) == (0.5, 0.0, 1.0)  # clean only: no real may be called fake
    points, threshold, info = fit_pooled_operating_points({"clean": clean, "jpeg": jpeg}, IDENTITY, "fpr:0.2")
    # Pooled, 1 of 8 reals may be called fake: jpeg's 0.75; the next real (0.65) would make 2 of 8 (0.25).
    assert points["default"] == "fpr20" and threshold == points["fpr20"] == 0.7
    point = info["fpr20"]
    assert (point["fpr"], point["tpr"], point["validation_images"]) == (0.125, 0.5, 16)
    assert (point["clean_fpr"], point["clean_tpr"], point["fitted_under"]) == (0.0, 0.5, ["clean", "jpeg"])
    assert all(set(described) >= {"fitted_under", "clean_fpr", "clean_tpr"} for described in info.values())
    assert set(points) == {"eer", "fpr1", "fpr5", "fpr20", "default"}
    # Thresholds are carried onto the calibrated probability as for one set; a fixed default is described on both.
    platt = Calibration("platt", 2.0, -0.5)
    points, threshold, info = fit_pooled_operating_points({"clean": clean, "jpeg": jpeg}, platt, "fpr:0.2")
    assert threshold == 0.7 and points["fpr20"] == pytest.approx(platt.apply(0.7))
    points, threshold, info = fit_pooled_operating_points({"clean": clean, "jpeg": jpeg}, IDENTITY, "0.62")
    assert (info["fixed"]["fpr"], info["fixed"]["tpr"], info["fixed"]["clean_fpr"], info["fixed"]["clean_tpr"]) == (0.25, 0.5, 0.0, 0.5)
    with pytest.raises(ValueError, match="clean"):
        fit_pooled_operating_points({"jpeg": jpeg}, IDENTITY)


def test_resolve_operating_point():
    calibrated = make_contract(calibration={"method": "platt", "a": 0.7, "b": -0.2},
                               operating_points={"eer": 0.5, "fpr1": 0.9, "fpr5": 0.8, "default": "fpr1"})  # fmt: skip
    assert resolve_operating_point("", calibrated) == resolve_operating_point("default", calibrated)
    assert resolve_operating_point("", calibrated).name == "fpr1"
    assert resolve_operating_point(" FPR5 ", calibrated).threshold == 0.8
    assert resolve_operating_point("fpr:0.01", calibrated).threshold == 0.9
    assert resolve_operating_point("0.9", calibrated) == resolve_operating_point("0.90", calibrated)
    assert resolve_operating_point("0.9", calibrated).name == "0.9"
    assert resolve_operating_point("1", calibrated).threshold == 1.0
    for bad, message in (("bogus", "has eer, fpr1, fpr5"), ("fpr:0.02", "has eer"), ("1.5", r"in \[0, 1\]"),
                         ("nan", r"in \[0, 1\]"), ("-0.1", r"in \[0, 1\]"), ("inf", r"in \[0, 1\]")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            resolve_operating_point(bad, calibrated)
    legacy = make_contract()  # no calibration, no operating points: its threshold is the only point
    assert resolve_operating_point("", legacy) == resolve_operating_point("default", legacy)
    assert resolve_operating_point("", legacy).threshold == legacy.threshold == 0.4
    assert resolve_operating_point("0.7", legacy).threshold == 0.7
    with pytest.raises(UserError, match="no named operating points"):
        resolve_operating_point("fpr1", legacy)
    assert dataclasses.replace(legacy, operating_points=None) == legacy and c.ModelContract is type(legacy)
