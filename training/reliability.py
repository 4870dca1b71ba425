"""Calibration in `cyborg evaluate`: ECE of the raw scores and of the calibration fitted on the
checkpoint's validation predictions (the one `cyborg export` would write), and reliability.png.

The calibration is fitted on the validation split only (never on the evaluated data) and measured
on the evaluated data; the math is `core.thresholds`'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core.thresholds import expected_calibration_error, fit_calibration, log_loss, reliability_table
from training.checkpoint import Checkpoint

RELIABILITY_PLOT = "reliability.png"
BINS = 15


def calibration_report(state: Checkpoint, labels: np.ndarray, scores: np.ndarray, out: Path, method: str = "auto") -> dict[str, Any]:
    """results.json's "calibration": ECE, log-loss and reliability table of the raw scores and, when the
    checkpoint has validation predictions of both classes, of the calibrated probabilities; writes
    OUT/reliability.png."""
    report: dict[str, Any] = {"bins": BINS, "raw": summary(labels, scores), "calibration": None, "calibrated": None}
    val_labels, val_scores = state.val_predictions.labelled_scores()
    curves = {"raw score": scores}
    if val_labels is not None and len(np.unique(val_labels)) == 2:
        calibration = fit_calibration(val_labels, val_scores, method)
        report["calibration"] = {**calibration.to_dict(), "fitted_on": f"checkpoint validation predictions ({val_labels.size})"}
        report["calibrated"] = summary(labels, calibration.apply(scores))
        curves[f"calibrated ({calibration.method})"] = calibration.apply(scores)
    plot_reliability(labels, curves, out / RELIABILITY_PLOT)
    report["plot"] = RELIABILITY_PLOT
    return report


def summary(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    return {"ece": expected_calibration_error(labels, probabilities, BINS), "log_loss": log_loss(labels, probabilities),
            "reliability": reliability_table(labels, probabilities, BINS)}  # fmt: skip


def plot_reliability(labels: np.ndarray, curves: dict[str, np.ndarray], path: str | Path) -> None:
    """A reliability diagram: fraction of fakes against mean fake probability per bin, one line per
    curve (marker area ~ images in the bin), the diagonal for perfect calibration; counts below."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 6.4), layout="constrained")
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    edges = np.linspace(0, 1, BINS + 1)
    for name, probabilities in curves.items():
        rows = [row for row in reliability_table(labels, probabilities, BINS) if row["count"]]
        ece = expected_calibration_error(labels, probabilities, BINS)
        sizes = [12 + 200 * row["count"] / len(labels) for row in rows]
        line = top.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="", linewidth=1.5, label=f"{name} (ECE {ece:.3f})")
        top.scatter([r["confidence"] for r in rows], [r["accuracy"] for r in rows], s=sizes, color=line[0].get_color(), zorder=3)
        bottom.hist(probabilities, bins=edges, histtype="step", linewidth=1.5, color=line[0].get_color())
    top.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="fraction fake in the bin")
    top.set_title(f"Reliability: {int((labels == 0).sum())} real, {int((labels == 1).sum())} fake, {BINS} bins", fontsize=10)
    top.legend(loc="upper left", fontsize="small")
    bottom.set(xlabel="predicted fake probability", ylabel="images")
    figure.savefig(path, dpi=110)
