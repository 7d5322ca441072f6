"""The report's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import Metric  # noqa: E402
from .stats import Estimate  # noqa: E402


def _yerr(estimates: Sequence[Estimate]) -> np.ndarray:
    """Asymmetric error bars (2 x n) from confidence intervals."""
    return np.array([[e.mean - e.low for e in estimates], [e.high - e.mean for e in estimates]])


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def quality_bars(path: Path, methods: list[str], metrics: list[Metric], table: dict[str, dict[str, Estimate]]) -> Path:
    """Grouped bars: one group per method, one bar per metric, 95% CI error bars."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(methods) + 2), 4.2))
    width = 0.8 / len(metrics)
    x = np.arange(len(methods))
    for i, metric in enumerate(metrics):
        estimates = [table[m][metric.key] for m in methods]
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, [e.mean for e in estimates], width,
               yerr=_yerr(estimates), capsize=3, label=metric.label)
    ax.set_xticks(x, methods, rotation=30, ha="right")
    ax.set_ylabel("mean score (95% bootstrap CI)")
    ax.legend(fontsize="small")
    ax.set_title("Quality by method")
    return _save(fig, path)


def quality_vs_speed(path: Path, methods: list[str], speed: dict[str, Estimate], quality: dict[str, Estimate], metric: Metric) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m, marker in zip(methods, "os^Dv<>pPX*h" * len(methods)):  # a legend: labels next to points overlap
        s, q = speed[m], quality[m]
        ax.errorbar([s.mean], [q.mean], xerr=_yerr([s]), yerr=_yerr([q]), fmt=marker, capsize=3, label=m)
    ax.legend(fontsize="small")
    ax.set_xlabel("decoding speed, tokens/s (mean, 95% CI)")
    ax.set_ylabel(f"{metric.label} (mean, 95% CI)")
    ax.set_title("Quality vs speed")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def weight_curve(
    path: Path,
    sweep: list[tuple[float, str, Estimate]],
    marked: list[tuple[float, str, Estimate]],
    paper_c: float,
    metric: Metric,
) -> Path:
    """Quality of log_softmax(B + w*delta) against w: the sweep as a line (llm is w = 0),
    CoSteer-style methods as marked points at their c, the paper's c as a dashed line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sweep = sorted(sweep)
    if sweep:
        ax.errorbar([w for w, _, _ in sweep], [e.mean for _, _, e in sweep], yerr=_yerr([e for _, _, e in sweep]),
                    fmt="-o", capsize=3, label="B + w*delta (llm at w = 0)")
    for (w, name, e), marker in zip(marked, itertools.cycle("*Dsv^")):
        ax.errorbar([w], [e.mean], yerr=_yerr([e]), fmt=marker, markersize=11, capsize=3, label=f"{name} (c = {w:.3f})")
    ax.axvline(paper_c, linestyle="--", color="grey", label=f"paper's setting, c = {paper_c:.3f}")
    ax.set_xlabel("steering weight w")
    ax.set_ylabel(f"{metric.label} (mean, 95% CI)")
    ax.set_title("Quality vs steering weight")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)
