"""training.intervals: bootstrap intervals of an AUC and of a paired AUC difference."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from training.evaluate import auc_intervals
from training.intervals import auc_difference_interval, auc_interval


def scores_with_gap(n_real: int, n_fake: int, gap: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normal scores, fakes shifted by `gap` standard deviations: true AUC = Phi(gap / sqrt(2))."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_real, dtype=int), np.ones(n_fake, dtype=int)]
    return labels, np.r_[rng.normal(0, 1, n_real), rng.normal(gap, 1, n_fake)]


def test_interval_brackets_the_auc_and_narrows_with_more_images():
    small = scores_with_gap(30, 30, 1.5, seed=0)
    large = scores_with_gap(600, 600, 1.5, seed=0)
    (low_s, high_s), (low_l, high_l) = auc_interval(*small), auc_interval(*large)
    assert low_s <= roc_auc_score(*small) <= high_s and low_l <= roc_auc_score(*large) <= high_l
    assert 0.0 <= low_s < high_s <= 1.0
    assert (high_l - low_l) < 0.5 * (high_s - low_s)  # about 1/sqrt(20) as wide


def test_covers_the_true_auc_about_as_often_as_it_claims():
    gap = 1.2
    truth = norm.cdf(gap / np.sqrt(2))
    covered = []
    for seed in range(60):
        low, high = auc_interval(*scores_with_gap(40, 40, gap, seed), resamples=400, seed=seed)
        covered.append(low <= truth <= high)
    assert 0.83 <= np.mean(covered) <= 1.0  # 95 % nominal; a percentile bootstrap runs a little under


def test_perfect_separation_a_missing_class_and_ties():
    assert auc_interval([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 1.0)
    assert auc_interval([0, 0, 0], [0.1, 0.2, 0.3]) is None
    assert auc_interval([0, 0, 1], [0.1, 0.2, 0.3]) is None  # one fake: nothing to resample
    assert auc_difference_interval([0, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]) is None
    assert auc_interval([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == (0.5, 0.5)  # ties count half, as roc_auc_score


def test_seeded_results_repeat_and_seeds_differ():
    labels, scores = scores_with_gap(50, 50, 1.0, seed=3)
    assert auc_interval(labels, scores, seed=1) == auc_interval(labels, scores, seed=1)
    assert auc_interval(labels, scores, seed=1) != auc_interval(labels, scores, seed=2)


def test_paired_difference_is_exact_and_tighter_than_separate_intervals():
    labels, reference = scores_with_gap(80, 80, 1.5, seed=4)
    better = reference + np.where(labels == 1, 0.3, 0.0)  # the same images, fakes pushed up a little
    difference, low, high = auc_difference_interval(labels, better, reference)
    assert difference == pytest.approx(roc_auc_score(labels, better) - roc_auc_score(labels, reference))
    assert 0.0 < low <= difference <= high  # a consistent gain: the interval excludes 0
    separate = [auc_interval(labels, s) for s in (better, reference)]
    assert separate[0][0] < separate[1][1]  # the separate intervals overlap, yet the paired one does not hold 0
    assert auc_difference_interval(labels, reference, reference) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="not the same images"):
        auc_difference_interval(labels, better[:-1], reference)


def test_per_source_intervals_use_each_sources_pairs():
    labels, scores = scores_with_gap(60, 60, 2.0, seed=5)
    sources = np.array(["ffhq"] * 60 + ["stylegan"] * 30 + ["sd"] * 30)
    scores[90:] -= 2.0  # "sd" fakes look real
    table = auc_intervals(labels, scores, sources)
    assert set(table) == {"all", "ffhq", "stylegan", "sd"}
    sd = (sources == "sd") | (labels == 0)
    low, high = table["sd"]
    assert low <= roc_auc_score(labels[sd], scores[sd]) <= high and high < table["stylegan"][0]
    paired = auc_intervals(labels, scores, sources, reference=scores)
    assert all(row == [0.0, 0.0, 0.0] for row in paired.values())
