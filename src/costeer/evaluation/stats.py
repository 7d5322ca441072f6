"""Bootstrap confidence intervals and paired comparisons (numpy only, seeded)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
SIGNIFICANCE = 0.05
_TIE = 1e-12


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class PairedComparison:
    """A method against a baseline on the same examples; diff = method - baseline."""

    n: int
    mean_diff: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    p_value: float  # NaN when n < 2: no test possible

    @property
    def win_rate(self) -> float:
        """Wins over all pairs, ties counting half."""
        return (self.wins + 0.5 * self.ties) / self.n if self.n else math.nan

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE  # False for NaN


def _resample_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    idx = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    return values[idx].mean(axis=1)


def _percentiles(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_mean(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Estimate:
    """The mean and its percentile-bootstrap confidence interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    low, high = _percentiles(_resample_means(x, resamples, seed), level)
    return Estimate(float(x.mean()), low, high, int(x.size))


def paired_bootstrap(
    method: Sequence[float],
    baseline: Sequence[float],
    higher_is_better: bool = True,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> PairedComparison:
    """Mean difference with its CI, wins/ties/losses, and a two-sided paired bootstrap p-value.

    The p-value resamples the per-example differences after shifting them to mean 0
    (the null hypothesis): the share of resampled means at least as far from 0 as the
    observed one, with the +1 correction so it is never exactly 0.
    """
    a, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in size: {a.size} vs {b.size}")
    d = a - b
    n = int(d.size)
    if n == 0:
        return PairedComparison(0, math.nan, math.nan, math.nan, 0, 0, 0, math.nan)
    better = d > _TIE if higher_is_better else d < -_TIE
    ties = int(np.sum(np.abs(d) <= _TIE))
    wins = int(np.sum(better))
    observed = float(d.mean())
    low, high = _percentiles(_resample_means(d, resamples, seed), level)
    if n < 2:
        p = math.nan
    elif abs(observed) <= _TIE:
        p = 1.0
    else:
        null = _resample_means(d - observed, resamples, seed + 1)
        p = (1 + int(np.sum(np.abs(null) >= abs(observed) - _TIE))) / (resamples + 1)
    return PairedComparison(n, observed, low, high, wins, ties, n - wins - ties, p)
