"""Bootstrap intervals and paired comparisons on small inputs with known answers."""

import math

import numpy as np

from costeer.evaluation.stats import bootstrap_mean, paired_bootstrap


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 0.1, 10), rng.normal(0.3, 0.1, 1000)
    a, b = bootstrap_mean(small), bootstrap_mean(large)
    assert a.low < a.mean < a.high and a.n == 10
    assert b.low < 0.3 < b.high  # covers the true mean
    assert (b.high - b.low) < (a.high - a.low) / 5  # ~1/sqrt(100) as wide


def test_bootstrap_is_deterministic_and_handles_degenerate_samples():
    assert bootstrap_mean([1.0, 2.0, 4.0]) == bootstrap_mean([1.0, 2.0, 4.0])
    one = bootstrap_mean([0.7])
    assert one.mean == one.low == one.high == 0.7
    empty = bootstrap_mean([])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_identical_methods_tie_everywhere_and_are_not_significant():
    scores = [0.1, 0.5, 0.3, 0.9]
    c = paired_bootstrap(scores, scores)
    assert (c.wins, c.ties, c.losses) == (0, 4, 0) and c.win_rate == 0.5
    assert c.mean_diff == 0 and c.p_value == 1.0 and not c.significant


def test_a_consistent_improvement_is_significant():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 40)
    better = base + 0.1 + rng.normal(0, 0.02, 40)
    c = paired_bootstrap(better, base)
    assert c.wins == 40 and c.win_rate == 1.0
    assert c.significant and c.p_value < 0.001
    assert c.low < 0.1 < c.high


def test_noise_around_zero_is_not_significant():
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, 30)
    noisy = base + rng.normal(0, 0.1, 30)
    noisy += -np.mean(noisy - base) + 0.001  # mean difference ~0
    c = paired_bootstrap(noisy, base)
    assert c.p_value > 0.5 and not c.significant
    assert 0.2 < c.win_rate < 0.8


def test_lower_is_better_metrics_count_decreases_as_wins():
    c = paired_bootstrap([5, 6, 7], [10, 10, 10], higher_is_better=False)
    assert (c.wins, c.losses) == (3, 0) and c.mean_diff < 0


def test_one_pair_gives_no_p_value():
    c = paired_bootstrap([1.0], [0.0])
    assert c.n == 1 and math.isnan(c.p_value) and not c.significant
