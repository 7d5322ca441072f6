"""Paired comparison of methods across `costeer eval` runs, on the examples they share.

One run compares its own methods (report.md); this compares across runs, for example
CoSteer with a Gemma device model in one run against CoSteer with the Qwen device
model in another, on the same CoGenesis rows:

    python scripts/compare_runs.py reports/cogenesis-dev40-gemma-device:costeer \\
        reports/cogenesis-dev150:costeer reports/cogenesis-dev150:llm

Each argument is RUN_DIR:METHOD (give a label with RUN_DIR:METHOD=LABEL). The first is
compared with every other: mean difference per metric, its 95% paired-bootstrap CI,
and the p-value, as in the reports. `--exclude RUN_DIR:METHOD` leaves out the examples
that method answered: the rows a choice was made on, to judge it on the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from costeer.evaluation.metrics import REFERENCE_METRICS
from costeer.evaluation.stats import bootstrap_mean, paired_bootstrap
from costeer.evaluation.store import read_rows


def rows_of(run: Path) -> list[dict]:
    """A `costeer eval` folder's rows, read as the eval itself reads them (a torn last line dropped)."""
    path = run / "results.jsonl"
    if not path.is_file():
        sys.exit(f"no {path}: expected a `costeer eval` folder")
    return read_rows(path)[0]


def load(spec: str) -> tuple[str, dict[str, dict]]:
    where, _, label = spec.partition("=")
    run, _, method = where.partition(":")  # methods may hold a colon (mix:1), paths here do not
    path = Path(run) / "results.jsonl"
    if not run or not method or not path.is_file():
        sys.exit(f"compare_runs: expected RUN_DIR:METHOD with RUN_DIR/results.jsonl, got {spec!r}")
    rows = rows_of(Path(run))
    return label or f"{Path(run).name}:{method}", {r["id"]: r for r in rows if r["method"] == method}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="RUN_DIR:METHOD[=LABEL]; the first against each other")
    parser.add_argument("--exclude", metavar="RUN_DIR:METHOD", action="append", default=[],
                        help="leave out the examples this method answered (say, the rows a choice was made on)")
    args = parser.parse_args(argv)
    runs = [load(spec) for spec in args.runs]
    left_out = set().union(*(set(load(spec)[1]) for spec in args.exclude))
    ids = sorted(set.intersection(*(set(rows) for _, rows in runs)) - left_out)
    if not ids:
        sys.exit("compare_runs: the runs share no examples")
    metrics = [m.key for m in REFERENCE_METRICS]
    print(f"{len(ids)} examples in common" + (f", {len(left_out)} left out" if left_out else "") + "\n")
    print("| run | " + " | ".join(metrics) + " | tok/s |")
    print("|---|" + "---|" * (len(metrics) + 1))
    for label, rows in runs:
        cells = []
        for key in [*metrics, "tokens_per_second"]:
            e = bootstrap_mean([rows[i][key] for i in ids])
            cells.append(f"{e.mean:.3f} [{e.low:.3f}, {e.high:.3f}]")
        print(f"| {label} | " + " | ".join(cells) + " |")
    first_label, first = runs[0]
    print(f"\n{first_label} minus each (95% paired-bootstrap CI, p):\n")
    print("| against | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for label, rows in runs[1:]:
        cells = []
        for key in metrics:
            c = paired_bootstrap([first[i][key] for i in ids], [rows[i][key] for i in ids])
            cells.append(f"{c.mean_diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}] p={c.p_value:.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
