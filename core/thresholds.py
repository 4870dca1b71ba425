"""Operating points: how the threshold in model.json is chosen, one definition for training and serving.

A score is the fake probability; an image is called fake when its score is at or above the
threshold (`core.contract.called_fake`). Labels are the contract's class indices (1 = fake). The
ROC here is scikit-learn's `roc_curve(..., drop_intermediate=False)` in plain numpy, so the rules
run wherever the contract is read (tests/test_thresholds.py compares the two).

Rules (`cyborg export --threshold`): "eer" (false-positive rate = false-negative rate on the
validation predictions), "fpr:RATE" (the most fakes caught with at most RATE of the reals called
fake), or a fixed number in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from core.contract import FAKE_INDEX, called_fake
from core.errors import UserError

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
            raise UserError(f"--threshold {rule!r}: use eer, fpr:RATE (e.g. fpr:0.05) or a number in [0, 1]") from None
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
