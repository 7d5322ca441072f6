"""The rule that chooses `--method auto`, written down before any candidate's run on the
tasks it reads (issue 23), and printed by scripts/choose_auto.py.

Tasks: each one or more `costeer eval` folders of one dataset and settings, holding `llm`
and every candidate between them.

| task | data | judged on |
|---|---|---|
| ctx | CoGenesis ctx dev, 150 rows | ROUGE-L, METEOR, semantic similarity |
| paper | CoGenesis paper dev, its first 60 rows or more | ROUGE-L, semantic similarity |
| prefeval | PrefEval multiple choice, the 505 dev items | accuracy |
| concise, verbose, uplifting, creative | the preference tasks, 22 instructions each | words (fewer), words, VADER compound, rare words |

1. Per task and metric, on the rows `llm` and the candidate both have: the standardised
   paired gain d = mean(diff) / sd(diff), diff = candidate - `llm`, its sign flipped
   where lower is better, within +-10 (0 when every diff is 0). Standardising puts
   accuracy points, words and ROUGE on one scale.
2. A task's score is the mean of its metrics' d. Four families count equally: ctx,
   paper, prefeval, and the four preference tasks together (their mean), so that four
   short tasks of one kind do not outvote the rest.
3. A candidate is rejected when it is significantly worse than `llm` (two-sided paired
   bootstrap, p < 0.05) on any metric of any task, or when it copies more of the private
   context than the cloud given it (`llm-context`) does: its mean share of word 4-grams
   taken from the context on ctx (evaluation/diagnose.py's `copy_rate`).
4. `auto` is the candidate with the highest score that is not rejected.

`llm-context` (the private text given to the cloud) is shown for scale, never chosen.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .compare import rows_of
from .datasets import load_dataset
from .diagnose import copy_rate
from .metrics import Metric, quality_metrics
from .report import ACCURACY
from .stats import paired_bootstrap

TASK_METRICS: dict[str, list[Metric]] = {
    "ctx": [m for m in quality_metrics(None) if m.key in ("rougeL", "meteor", "semantic")],
    "paper": [m for m in quality_metrics(None) if m.key in ("rougeL", "semantic")],
    "prefeval": [ACCURACY],
    **{kind: quality_metrics(kind)[:1] for kind in ("concise", "verbose", "uplifting", "creative")},
}
FAMILIES = {"ctx": ["ctx"], "paper": ["paper"], "prefeval": ["prefeval"],
            "preference": ["concise", "verbose", "uplifting", "creative"]}
BASELINE, CEILING = "llm", "llm-context"
COPY_TASK = "ctx"
MAX_GAIN = 10.0


@dataclass
class Gain:
    task: str
    metric: Metric
    n: int
    standardised: float
    mean_diff: float
    p_value: float
    worse: bool  # significantly worse than llm


@dataclass
class Verdict:
    method: str
    score: float
    gains: list[Gain]
    copy: float | None  # mean 4-gram copy share on ctx
    rejected: list[str]


def standardised_gain(diffs: np.ndarray) -> float:
    """mean / sd of the paired differences, within +-MAX_GAIN (a difference that never
    varies would otherwise be infinite and outweigh every other task)."""
    mean = float(diffs.mean())
    sd = float(diffs.std(ddof=1)) if diffs.size > 1 else 0.0
    if abs(mean) <= 1e-12:
        return 0.0
    return max(-MAX_GAIN, min(MAX_GAIN, mean / sd)) if sd > 0 else math.copysign(MAX_GAIN, mean)


Runs = dict[str, list[Path]]  # task -> its folders


def task_rows(folders: list[Path]) -> list[dict]:
    """The rows of a task's folders; an (example, method) in several is taken from the first."""
    seen: dict[tuple[str, str], dict] = {}
    for folder in folders:
        for row in rows_of(folder):
            seen.setdefault((row["id"], row["method"]), row)
    return list(seen.values())


def judge(method: str, runs: Runs, copy_ceiling: float | None) -> Verdict:
    gains: list[Gain] = []
    for task, metrics in TASK_METRICS.items():
        rows = task_rows(runs[task])
        base = {r["id"]: r for r in rows if r["method"] == BASELINE}
        mine = {r["id"]: r for r in rows if r["method"] == method}
        ids = [i for i in base if i in mine]
        if not ids:
            raise UserError(f"task {task} has no rows where both {BASELINE} and {method} answered")
        for metric in metrics:
            a = np.array([mine[i][metric.key] for i in ids], dtype=float)
            b = np.array([base[i][metric.key] for i in ids], dtype=float)
            sign = 1.0 if metric.higher_is_better else -1.0
            test = paired_bootstrap(a, b, metric.higher_is_better)
            gains.append(Gain(task, metric, len(ids), standardised_gain(sign * (a - b)), test.mean_diff,
                              test.p_value, test.significant and sign * test.mean_diff < 0))
    task_scores = {t: float(np.mean([g.standardised for g in gains if g.task == t])) for t in TASK_METRICS}
    score = float(np.mean([np.mean([task_scores[t] for t in tasks]) for tasks in FAMILIES.values()]))
    copy = copy_share(runs[COPY_TASK], method)
    rejected = [f"worse than {BASELINE} on {g.task} {g.metric.label}" for g in gains if g.worse]
    if copy is not None and copy_ceiling is not None and copy > copy_ceiling:
        rejected.append(f"copies more of the context than {CEILING} ({copy:.1%} > {copy_ceiling:.1%})")
    return Verdict(method, score, gains, copy, rejected)


def copy_share(folders: list[Path], method: str) -> float | None:
    """Mean share of the method's word 4-grams on the task taken from the private context."""
    rows = [r for r in task_rows(folders) if r["method"] == method and "text" in r]
    if not rows:
        return None
    config = json.loads((folders[0] / "run.json").read_text(encoding="utf-8"))["config"]
    data = {e.id: e for e in load_dataset(config["dataset"]).examples}
    return float(np.mean([copy_rate(r["text"], data[r["id"]].private[-1]["content"],
                                    data[r["id"]].public[-1]["content"]) for r in rows]))


def choose(runs: Runs, candidates: list[str]) -> list[Verdict]:
    """Every candidate judged by the rule, the pick first (then the others by score); the
    ceiling (`llm-context`), where the runs hold it, last and never picked."""
    missing = [t for t in TASK_METRICS if t not in runs]
    if missing:
        raise UserError(f"the rule reads every task: give {', '.join(missing)}")
    if not candidates or BASELINE in candidates or CEILING in candidates:
        raise UserError(f"candidates exclude {BASELINE} (the baseline) and {CEILING} (never chosen)")
    ceiling_copy = copy_share(runs[COPY_TASK], CEILING)
    verdicts = [judge(m, runs, ceiling_copy) for m in candidates]
    verdicts.sort(key=lambda v: (bool(v.rejected), -v.score))
    if all(any(r["method"] == CEILING for r in task_rows(runs[t])) for t in TASK_METRICS):
        verdicts.append(judge(CEILING, runs, None))
    return verdicts


def choice_report(runs: Runs, candidates: list[str]) -> str:
    verdicts = choose(runs, candidates)
    keys = [(t, m) for t, ms in TASK_METRICS.items() for m in ms]
    lines = ["| rank | method | score | " + " | ".join(f"{t} {m.label}" for t, m in keys)
             + " | ctx 4-gram copy | rejected because |",
             "|---|---|---|" + "---|" * len(keys) + "---|---|"]
    for rank, v in enumerate(verdicts, 1):
        cells = [f"{g.standardised:+.2f} ({g.mean_diff:+.3f}, p={g.p_value:.3f})" for g in v.gains]
        label = "-" if v.method == CEILING else ("-" if v.rejected else str(rank))
        copy = "n/a" if v.copy is None else f"{v.copy:.1%}"
        lines.append(f"| {label} | `{v.method}` | {v.score:+.3f} | " + " | ".join(cells)
                     + f" | {copy} | {'; '.join(v.rejected) or '-'} |")
    pick = next((v.method for v in verdicts if not v.rejected and v.method != CEILING), None)
    lines += ["", f"Each cell: standardised paired gain over `{BASELINE}` (mean difference, paired-bootstrap p).",
              f"Pick: `{pick}`." if pick else "Pick: none; every candidate was rejected."]
    return "\n".join(lines)
