"""Bootstrap confidence intervals for AUC: how far a figure could move on another draw of such images.

    low, high = auc_interval(labels, scores)                      # one model
    diff, low, high = auc_difference_interval(labels, a, b)       # two models on the same images

With 90 validation faces a side, one face moves an AUC by about 0.005, so a gap between two models,
or to a target, means little without its interval. The bootstrap resamples the real and the fake
images separately (stratified: every resample keeps the data's class counts, so its AUC is always
defined) and reads the interval off the percentiles of the resampled AUCs (`scipy.stats.bootstrap`).
Two models are compared on the *same* resamples (paired), which is far tighter than comparing their
separate intervals. A resample's AUC is the Mann-Whitney U statistic over its real-fake pairs divided
by their number, the figure `roc_auc_score` gives (ties count half). Seeded: one call, one result.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import bootstrap, mannwhitneyu

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
MIN_PER_CLASS = 2  # images of each class a resample needs to vary; fewer: no interval (None)


def _auc(fake_scores: np.ndarray, real_scores: np.ndarray) -> np.ndarray:
    """AUC along the last axis (batched): P(fake scores above real) + half the ties."""
    u = mannwhitneyu(fake_scores, real_scores, axis=-1, method="asymptotic").statistic
    return u / (fake_scores.shape[-1] * real_scores.shape[-1])


def _indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    labels = np.asarray(labels).ravel()
    reals, fakes = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    return (reals, fakes) if reals.size >= MIN_PER_CLASS and fakes.size >= MIN_PER_CLASS else None


def _percentile_interval(groups: tuple[np.ndarray, np.ndarray], statistic, confidence: float, resamples: int,
                         seed: int) -> tuple[float, float]:  # fmt: skip
    result = bootstrap(groups, statistic, n_resamples=resamples, vectorized=True, axis=-1,
                       confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def auc_interval(labels: np.ndarray, scores: np.ndarray, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                 seed: int = SEED) -> tuple[float, float] | None:  # fmt: skip
    """(low, high) of the AUC of `scores` (label 1 = fake), or None with fewer than MIN_PER_CLASS images of a class."""
    groups = _indices(labels)
    if groups is None:
        return None
    scores = np.asarray(scores, dtype=np.float64).ravel()

    def statistic(reals: np.ndarray, fakes: np.ndarray, axis: int = -1) -> np.ndarray:
        return _auc(scores[fakes], scores[reals])

    return _percentile_interval(groups, statistic, confidence, resamples, seed)


def auc_difference_interval(labels: np.ndarray, scores: np.ndarray, reference: np.ndarray, confidence: float = CONFIDENCE,
                            resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float, float] | None:  # fmt: skip
    """(AUC of `scores` minus AUC of `reference`, low, high), both scored on the same images and
    resampled together; None with fewer than MIN_PER_CLASS images of a class. An interval that holds 0
    is no difference."""
    groups = _indices(labels)
    if groups is None:
        return None
    scores = np.asarray(scores, dtype=np.float64).ravel()
    reference = np.asarray(reference, dtype=np.float64).ravel()
    if scores.shape != reference.shape:
        raise ValueError(f"{scores.size} scores against {reference.size} reference scores: not the same images")

    def statistic(reals: np.ndarray, fakes: np.ndarray, axis: int = -1) -> np.ndarray:
        return _auc(scores[fakes], scores[reals]) - _auc(reference[fakes], reference[reals])

    return (float(statistic(*groups)), *_percentile_interval(groups, statistic, confidence, resamples, seed))
