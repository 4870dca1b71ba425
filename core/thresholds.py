"""Operating points: how the threshold in model.json is chosen, one definition for training and serving.

A score is the fake probability; an image is called fake when its score is at or above the
threshold (`core.contract.called_fake`). Labels are the contract's class indices (1 = fake). The
ROC here is scikit-learn's `roc_curve(..., drop_intermediate=False)` in plain numpy, so the rules
run wherever the contract is read (tests/test_thresholds.py compares the two).

Rules (`cyborg export --threshold`): "eer" (false-positive rate = false-negative rate on the
validation predictions), "fpr:RATE" (the most fakes caught with at most RATE of the reals called
fake), or a fixed number in [0, 1].

Calibration (`fit_calibration`) turns a score into a calibrated fake probability,
sigmoid(a * logit(score) + b), fitted on the validation predictions by minimising log-loss:
temperature scaling (b = 0) or Platt scaling (a and b); "auto" keeps whichever of none, temperature
and Platt has the lowest cross-validated log-loss. Both keep the scores' order, so AUC and every
ROC point are unchanged. Operating points (`fit_operating_points`) are the rules' thresholds carried
onto the calibrated probability under names ("eer", "fpr1", "fpr5"), fitted on the validation
predictions or on several sets of them pooled (`fit_pooled_operating_points`: clean and changed
copies of the same images, `cyborg export --points-under`); `resolve_operating_point`
turns a caller's choice (a name, "fpr:0.01", or a number in [0, 1]) into the threshold to apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dataclasses
import math

import numpy as np

from core.contract import (
    CALIBRATION_PARAMETERS,
    DEFAULT_POINT_KEY,
    FAKE_INDEX,
    ModelContract,
    calibration_problems,
    called_fake,
)
from core.errors import ContractError, UserError

FALLBACK_THRESHOLD = 0.5  # only when no threshold is given and the EER is undefined (one class)


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest threshold (+inf: nothing called fake) first."""
    positive = np.asarray(labels) == FAKE_INDEX
    scores = np.asarray(scores)
    order = np.argsort(scores, kind="stable")[::-1]
    scores, positive = scores[order], positive[order]
    last_of_each_value = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tps = np.cumsum(positive, dtype=np.float64)[last_of_each_value]
    fps = 1 + last_of_each_value.astype(np.float64) - tps
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    thresholds = np.r_[np.inf, scores[last_of_each_value].astype(np.float64)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return fps / fps[-1], tps / tps[-1], thresholds


def equal_error_rate(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) where the false-positive and false-negative rates are closest (both classes needed)."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    index = int(np.argmin(np.abs(fnr - fpr)))
    threshold = float(thresholds[index])
    if not np.isfinite(threshold):  # the first point (nothing called fake) sits at +inf
        threshold = float(np.nextafter(np.max(scores), np.inf))
    return float((fpr[index] + fnr[index]) / 2.0), threshold


def fixed_threshold(rule: str) -> float | None:
    """The number a rule names, or None when the rule is "eer" / "fpr:RATE"; UserError for anything else."""
    rule = rule.strip().lower()
    try:
        value = float(rule)
    except ValueError:
        if rule != "eer" and not rule.startswith("fpr:"):
            raise UserError(f"--threshold {rule!r}: use eer, fpr1, fpr5, fpr:RATE (e.g. fpr:0.05) or a number in [0, 1]") from None
        return None
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--threshold {rule}: a fixed threshold must be in [0, 1]")
    return value


def operating_point(rule: str, labels: np.ndarray, scores: np.ndarray) -> tuple[float, dict[str, Any]]:
    """(threshold, description) for an "eer" or "fpr:RATE" rule on validation labels and scores."""
    rule = rule.strip().lower()
    if rule == "eer":
        eer, threshold = equal_error_rate(labels, scores)
        fake = called_fake(scores, threshold)
        info = {"rule": "eer", "eer": eer, "fpr": float(fake[labels != FAKE_INDEX].mean()),
                "tpr": float(fake[labels == FAKE_INDEX].mean()), "validation_images": int(len(labels))}  # fmt: skip
        return min(max(threshold, 0.0), 1.0), info
    try:
        target = float(rule.split(":", 1)[1])
    except ValueError:
        raise UserError(f"--threshold {rule!r}: fpr:RATE needs a number, e.g. fpr:0.05") from None
    if not 0.0 < target < 1.0:
        raise UserError(f"--threshold {rule}: the false positive rate must be in (0, 1)")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    index = int(np.nonzero(fpr <= target)[0][-1])  # the most fakes caught within the FPR budget
    info = {"rule": f"fpr:{target:g}"}
    info.update(fpr=float(fpr[index]), tpr=float(tpr[index]), validation_images=int(len(labels)))
    return float(min(max(thresholds[index], 0.0), 1.0)), info


def evaluation_threshold(given: float | None, validation_eer_threshold: float | None) -> tuple[float, str]:
    """(threshold, where it came from) for evaluating a checkpoint: the given one, else the EER threshold
    chosen on its validation split, else FALLBACK_THRESHOLD; never one fitted to the evaluated data."""
    if given is not None:
        return float(given), "--threshold"
    if validation_eer_threshold is not None:
        return float(validation_eer_threshold), "checkpoint val_metrics.eer_threshold (chosen on validation)"
    return FALLBACK_THRESHOLD, "default (the checkpoint has no validation EER threshold)"


# ---------------------------------------------------------------------------------------------
# Calibration: score -> calibrated fake probability

SCORE_EPSILON = 1e-7  # scores are clipped to [eps, 1 - eps] before the logit (float32 scores reach 0 and 1)
CALIBRATION_CHOICES = ("auto", *CALIBRATION_PARAMETERS)
CV_FOLDS = 5  # folds of the cross-validated log-loss that "auto" compares


def logit(scores) -> np.ndarray:
    scores = np.clip(np.asarray(scores, dtype=np.float64), SCORE_EPSILON, 1.0 - SCORE_EPSILON)
    return np.log(scores) - np.log1p(-scores)


def sigmoid(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


@dataclasses.dataclass(frozen=True)
class Calibration:
    """probability = sigmoid(a * logit(score) + b); method "none" returns the score itself."""

    method: str = "none"
    a: float = 1.0
    b: float = 0.0

    @property
    def parameters(self) -> dict[str, float]:
        if self.method == "temperature":
            return {"temperature": 1.0 / self.a}
        return {"a": self.a, "b": self.b} if self.method == "platt" else {}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.parameters}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Calibration:
        """The calibration a model.json `calibration` object describes (None: identity)."""
        if data is None:
            return IDENTITY
        problems = calibration_problems(data)
        if problems:
            raise ContractError("invalid calibration: " + "; ".join(problems))
        if data["method"] == "temperature":
            return cls("temperature", 1.0 / float(data["temperature"]), 0.0)
        return cls("platt", float(data["a"]), float(data["b"])) if data["method"] == "platt" else IDENTITY

    @classmethod
    def of(cls, contract: ModelContract) -> Calibration:
        return cls.from_dict(contract.calibration)

    def apply(self, scores):
        """Calibrated fake probabilities: a float for a float, an array for an array (unchanged by "none")."""
        if self.method == "none":
            return scores
        probabilities = sigmoid(self.a * logit(scores) + self.b)
        return float(probabilities) if np.ndim(scores) == 0 else probabilities

    def invert(self, probability: float) -> float:
        """The score whose calibrated probability is `probability` (0 and 1 map to themselves)."""
        if self.method == "none" or probability <= 0.0 or probability >= 1.0:
            return float(probability)
        z = math.log(probability) - math.log1p(-probability)
        return float(sigmoid((z - self.b) / self.a))


IDENTITY = Calibration()


def _checked(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape or labels.size == 0:
        raise UserError(f"calibration needs one score per label ({labels.size} labels, {scores.size} scores)")
    if not np.isfinite(scores).all() or scores.min() < 0.0 or scores.max() > 1.0:
        raise UserError("calibration needs scores in [0, 1]")
    return labels, scores


def log_loss(labels, probabilities) -> float:
    """Mean negative log-likelihood of the labels (1 = fake) under fake probabilities."""
    labels, probabilities = _checked(labels, probabilities)
    z = logit(probabilities)
    return float(np.mean(np.where(labels == FAKE_INDEX, np.logaddexp(0.0, -z), np.logaddexp(0.0, z))))


def _fit_logistic(z: np.ndarray, targets: np.ndarray, intercept: bool) -> tuple[float, float]:
    """(a, b) minimising the cross-entropy of sigmoid(a z + b) against `targets` (b = 0 without
    `intercept`): Newton's method with a backtracking line search; the problem is convex."""
    design = np.stack([z, np.ones_like(z)]) if intercept else z[None]
    weights = np.r_[1.0, 0.0][: len(design)]

    def loss(w: np.ndarray) -> float:
        u = w @ design
        return float(np.mean(targets * np.logaddexp(0.0, -u) + (1 - targets) * np.logaddexp(0.0, u)))

    current = loss(weights)
    for _ in range(100):
        p = sigmoid(weights @ design)
        gradient = design @ (p - targets) / z.size
        hessian = (design * (p * (1 - p))) @ design.T / z.size + 1e-12 * np.eye(len(design))
        step = np.linalg.solve(hessian, gradient)
        size = 1.0
        while size > 1e-10 and loss(weights - size * step) > current - 1e-4 * size * float(gradient @ step):
            size /= 2
        weights = weights - size * step
        previous, current = current, loss(weights)
        if previous - current < 1e-14:
            break
    return float(weights[0]), float(weights[1]) if intercept else 0.0


def _fit(method: str, labels: np.ndarray, scores: np.ndarray) -> Calibration | None:
    """`method` fitted to (labels, scores); None when it would reverse the scores' order."""
    if method == "none":
        return IDENTITY
    fakes = labels == FAKE_INDEX
    n_fake, n_real = int(fakes.sum()), int((~fakes).sum())
    targets = np.where(fakes, (n_fake + 1) / (n_fake + 2), 1 / (n_real + 2))  # Platt's targets: no infinite fit
    a, b = _fit_logistic(logit(scores), targets, intercept=method == "platt")
    return Calibration(method, a, b) if a > 0 else None


def _folds(labels: np.ndarray, folds: int) -> np.ndarray:
    """A fold number per sample, each class spread evenly over the folds (seeded)."""
    rng = np.random.default_rng(0)
    fold = np.empty(labels.size, dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = np.arange(members.size) % folds
    return fold


def compare_calibrations(labels, scores, bins: int = 15, folds: int = CV_FOLDS) -> dict[str, dict[str, Any]]:
    """Each method fitted to (labels, scores): its parameters, log-loss and ECE on these predictions,
    and its cross-validated log-loss ("cv_log_loss": fitted on the other folds; None when a class has
    fewer than 2 samples). A method that would reverse the scores' order is left out."""
    labels, scores = _checked(labels, scores)
    folds = min(folds, *(int((labels == label).sum()) for label in (0, 1)))
    fold = _folds(labels, folds) if folds >= 2 else None
    table = {}
    for method in CALIBRATION_PARAMETERS:
        fitted = _fit(method, labels, scores)
        if fitted is None:
            continue
        probabilities = fitted.apply(scores)
        cv = None
        if fold is not None:
            held_out = np.empty_like(scores)
            for k in range(folds):
                part = _fit(method, labels[fold != k], scores[fold != k]) or IDENTITY
                held_out[fold == k] = part.apply(scores[fold == k])
            cv = log_loss(labels, held_out)
        table[method] = {"parameters": fitted.parameters, "log_loss": log_loss(labels, probabilities), "cv_log_loss": cv,
                         "ece": expected_calibration_error(labels, probabilities, bins)}  # fmt: skip
    return table


def fit_calibration(labels, scores, method: str = "auto") -> Calibration:
    """A calibration fitted on validation (labels, scores) by minimising log-loss.

    "temperature" or "platt" fits that method; "none" is the identity; "auto" keeps the method with
    the lowest cross-validated log-loss (`compare_calibrations`; in-sample log-loss when a class is
    too small to cross-validate). A fit that would reverse the scores' order falls back to "none".
    """
    if method not in CALIBRATION_CHOICES:
        raise UserError(f"calibration {method!r}: one of {', '.join(CALIBRATION_CHOICES)}")
    labels, scores = _checked(labels, scores)
    if len(np.unique(labels)) < 2:
        raise UserError("calibration needs validation predictions of both classes")
    if method != "auto":
        return _fit(method, labels, scores) or IDENTITY
    table = compare_calibrations(labels, scores)
    key = "cv_log_loss" if all(row["cv_log_loss"] is not None for row in table.values()) else "log_loss"
    best = min(table, key=lambda name: table[name][key])
    return _fit(best, labels, scores) or IDENTITY


def reliability_table(labels, probabilities, bins: int = 15) -> list[dict[str, Any]]:
    """Per equal-width bin of the fake probability: its range, "count", "confidence" (the mean fake
    probability) and "accuracy" (the fraction of its images that are fake); empty bins included."""
    labels, probabilities = _checked(labels, probabilities)
    if bins < 1:
        raise UserError(f"bins {bins}: at least 1")
    index = np.minimum((probabilities * bins).astype(np.int64), bins - 1)
    rows = []
    for k in range(bins):
        mine = index == k
        count = int(mine.sum())
        rows.append({"low": k / bins, "high": (k + 1) / bins, "count": count,
                     "confidence": float(probabilities[mine].mean()) if count else None,
                     "accuracy": float((labels[mine] == FAKE_INDEX).mean()) if count else None})  # fmt: skip
    return rows


def expected_calibration_error(labels, probabilities, bins: int = 15) -> float:
    """ECE of the fake probability: the count-weighted mean |fraction fake - mean probability| over
    `bins` equal-width bins (`reliability_table`)."""
    rows = reliability_table(labels, probabilities, bins)
    total = sum(row["count"] for row in rows)
    return float(sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in rows if row["count"]) / total)


# ---------------------------------------------------------------------------------------------
# Named operating points: thresholds on the calibrated probability

NAMED_POINTS = {"eer": "eer", "fpr1": "fpr:0.01", "fpr5": "fpr:0.05"}  # name -> rule; every export records these
DEFAULT_OPERATING_POINT = "fpr1"  # at most 1 % of validation reals called fake (docs/export.md says why)
LEGACY_POINT = "default"  # the name of a model's only threshold when its model.json has no operating points
FIXED_POINT = "fixed"  # the name export gives a fixed number chosen as the default


def point_name(rule: str) -> str:
    """The operating-point name of a rule: "fpr:0.01" -> "fpr1", "fpr:0.2" -> "fpr20"; names as they are."""
    rule = rule.strip().lower()
    if rule.startswith("fpr:"):
        try:
            return f"fpr{float(rule[4:]) * 100:g}"
        except ValueError:
            return rule
    return rule


def point_rule(name: str) -> str:
    """The rule of an operating-point name: "fpr1" -> "fpr:0.01", "eer" -> "eer"; anything else as it is."""
    name = name.strip().lower()
    if name in NAMED_POINTS:
        return NAMED_POINTS[name]
    if name.startswith("fpr") and not name.startswith("fpr:"):
        try:
            return f"fpr:{float(name[3:]) / 100:g}"
        except ValueError:
            pass
    return name


def fit_operating_points(labels, scores, calibration: Calibration, default: str = DEFAULT_OPERATING_POINT) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """(model.json operating_points, model.json threshold, description of each point) on validation
    (labels, raw scores).

    Every point of NAMED_POINTS, plus `default` when it is another rule ("fpr:RATE", "fprN") or a fixed
    number (named "fixed", a threshold on the calibrated probability). Each rule runs on the raw
    scores (`operating_point`) and its threshold is carried onto the probability by `calibration`, so
    `score >= threshold` and `probability >= operating_points[name]` call the same images fake; the
    returned threshold is the default point's on the raw score.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    fixed = fixed_threshold(point_rule(default))
    rules = dict(NAMED_POINTS)
    default_name = FIXED_POINT if fixed is not None else point_name(point_rule(default))
    if fixed is None:
        rules.setdefault(default_name, point_rule(default))
    points: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for name, rule in rules.items():
        raw, described = operating_point(rule, labels, scores)
        points[name] = float(calibration.apply(raw))
        info[name] = {**described, "threshold": points[name], "score_threshold": raw}
    if fixed is not None:
        raw = calibration.invert(fixed)
        fake = called_fake(scores, raw)
        points[FIXED_POINT] = fixed
        info[FIXED_POINT] = {"rule": "fixed", "threshold": fixed, "score_threshold": raw, "fpr": float(fake[labels != FAKE_INDEX].mean()),
                             "tpr": float(fake[labels == FAKE_INDEX].mean()), "validation_images": int(len(labels))}  # fmt: skip
    points[DEFAULT_POINT_KEY] = default_name
    return points, float(info[default_name]["score_threshold"]), info


def fit_pooled_operating_points(groups: Mapping[str, tuple[Any, Any]], calibration: Calibration, default: str = DEFAULT_OPERATING_POINT,
                                reference: str = "clean") -> tuple[dict[str, Any], float, dict[str, Any]]:  # fmt: skip
    """`fit_operating_points` on the labels and raw scores of every group pooled, e.g. the validation
    images clean and under each everyday change: "fpr1" then calls at most 1 % of all those reals fake.

    `groups` maps a name to (labels, scores), `reference` (in `groups`) is the one the calibration was
    fitted on. Each point's description gains "fitted_under" (the group names, in order) and its FPR and
    TPR on the reference group alone ("clean_fpr", "clean_tpr"); "validation_images" is the pooled count.
    """
    if reference not in groups:
        raise ValueError(f"the groups {', '.join(groups)} lack the reference group {reference!r}")
    labels = np.concatenate([np.asarray(group[0]).astype(np.int64).ravel() for group in groups.values()])
    scores = np.concatenate([np.asarray(group[1], dtype=np.float64).ravel() for group in groups.values()])
    points, threshold, info = fit_operating_points(labels, scores, calibration, default)
    clean_labels = np.asarray(groups[reference][0]).astype(np.int64).ravel()
    clean_scores = np.asarray(groups[reference][1], dtype=np.float64).ravel()
    for described in info.values():
        fake = called_fake(clean_scores, described["score_threshold"])
        described.update(fitted_under=list(groups), clean_fpr=float(fake[clean_labels != FAKE_INDEX].mean()),
                         clean_tpr=float(fake[clean_labels == FAKE_INDEX].mean()))  # fmt: skip
    return points, threshold, info


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """The threshold a request is decided with: `name` as the caller or the model named it, and the
    threshold on the calibrated probability (`probability >= threshold` is called fake)."""

    name: str
    threshold: float


def resolve_operating_point(choice: str, contract: ModelContract) -> OperatingPoint:
    """A caller's operating point for `contract`: "" or "default" (the model's default), a name the
    model records ("eer", "fpr1", "fpr5", or "fpr:0.01" for "fpr1"), or a number in [0, 1] (a
    threshold on the calibrated probability). UserError names what the model offers otherwise."""
    text = (choice or "").strip().lower()
    points = dict(contract.operating_points or {})
    default = points.pop(DEFAULT_POINT_KEY, LEGACY_POINT)
    if not points:  # a model.json written before operating points: its threshold is on the score = probability
        points = {LEGACY_POINT: float(contract.threshold)}
    if text in ("", LEGACY_POINT):
        return OperatingPoint(default, float(points[default]))
    try:
        value = float(text)
    except ValueError:
        name = point_name(text)
        if name not in points:
            offered = ", ".join(sorted(set(points) - {LEGACY_POINT})) or "no named operating points"
            raise UserError(f"operating point {choice!r}: {contract.name} v{contract.version} has {offered}; "
                            "or give a threshold in [0, 1]") from None  # fmt: skip
        return OperatingPoint(name, float(points[name]))
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise UserError(f"operating point {choice!r}: a threshold must be a number in [0, 1]")
    return OperatingPoint(f"{value:g}", value)
