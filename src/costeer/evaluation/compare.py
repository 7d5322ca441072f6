"""Comparing `costeer eval` runs on the examples they share (what scripts/compare_runs.py
prints; scripts/diagnose_steering.py and the `auto` rule, choose.py, read runs through it too).

A run's answers are named RUN_DIR:METHOD, optionally RUN_DIR:METHOD=LABEL. The reports
are Markdown text, returned for the caller to print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import UserError
from .metrics import REFERENCE_METRICS, backfill
from .stats import bootstrap_mean, paired_bootstrap
from .store import read_rows

Answers = dict[str, dict]  # row id -> one method's eval row


def rows_of(run: Path) -> list[dict]:
    """A `costeer eval` folder's rows, read as the eval itself reads them (a torn last line dropped,
    a metric added since a row was written computed from its text)."""
    path = run / "results.jsonl"
    if not path.is_file():
        raise UserError(f"no {path}: expected a `costeer eval` folder")
    return backfill(read_rows(path)[0])


def load_answers(spec: str) -> tuple[str, Answers]:
    """RUN_DIR:METHOD[=LABEL] -> (its label, default RUN_NAME:METHOD; its answers by row id)."""
    where, _, label = spec.partition("=")
    run, _, method = where.partition(":")  # methods may hold a colon (mix:1), paths here do not
    path = Path(run) / "results.jsonl"
    if not run or not method or not path.is_file():
        raise UserError(f"expected RUN_DIR:METHOD with RUN_DIR/results.jsonl, got {spec!r}")
    rows = rows_of(Path(run))
    return label or f"{Path(run).name}:{method}", {r["id"]: r for r in rows if r["method"] == method}


def methods_of(run: Path) -> list[str]:
    """A `costeer eval` folder's methods, in the order they first appear in its results."""
    return list(dict.fromkeys(row["method"] for row in rows_of(run)))


def compare_report(specs: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """The first RUN_DIR:METHOD against each other on the rows they share: each one's mean
    per metric with its 95% bootstrap CI, then the first minus each, paired, with p.
    `exclude`: leave out the rows these answered (the rows a choice was made on)."""
    runs = [load_answers(spec) for spec in specs]
    left_out = set().union(*(set(load_answers(spec)[1]) for spec in exclude))
    ids = sorted(set.intersection(*(set(rows) for _, rows in runs)) - left_out)
    if not ids:
        raise UserError("the runs share no examples")
    metrics = [m.key for m in REFERENCE_METRICS]
    lines = [f"{len(ids)} examples in common" + (f", {len(left_out)} left out" if left_out else "") + "\n",
             "| run | " + " | ".join(metrics) + " | tok/s |",
             "|---|" + "---|" * (len(metrics) + 1)]
    for label, rows in runs:
        cells = []
        for key in [*metrics, "tokens_per_second"]:
            e = bootstrap_mean([rows[i][key] for i in ids if rows[i].get(key) is not None])  # copies have no timing
            cells.append(f"{e.mean:.3f} [{e.low:.3f}, {e.high:.3f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    first_label, first = runs[0]
    lines += [f"\n{first_label} minus each (95% paired-bootstrap CI, p):\n",
              "| against | " + " | ".join(metrics) + " |",
              "|---|" + "---|" * len(metrics)]
    for label, rows in runs[1:]:
        cells = []
        for key in metrics:
            c = paired_bootstrap([first[i][key] for i in ids], [rows[i][key] for i in ids])
            cells.append(f"{c.mean_diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}] p={c.p_value:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
