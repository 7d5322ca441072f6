"""Rank candidate methods for `--method auto` by the rule fixed before the numbers were
looked at: the mean, over ROUGE-L, METEOR and semantic similarity, of each metric's
mean paired difference against `llm`, on the dev examples every run shares.

    python scripts/choose_auto.py --baseline reports/cogenesis-dev25-levers:llm \\
        reports/cogenesis-dev25-levers reports/cogenesis-dev150:costeer reports/cogenesis-dev150:light

A RUN_DIR alone means every method in it but `llm` and `llm-context` (the privacy-violating
bound is reported, never chosen); RUN_DIR:METHOD picks one. Prints a Markdown table,
best first, with each metric's paired difference and 95% CI; the first row is the pick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compare_runs import load, rows_of  # this folder is on sys.path when run as a script
from costeer.evaluation.stats import paired_bootstrap

RULE_METRICS = ("rougeL", "meteor", "semantic")
NOT_CANDIDATES = {"llm", "llm-context"}


def method_of(spec: str) -> str:
    return spec.partition("=")[0].partition(":")[2]


def candidates(spec: str) -> dict[str, dict[str, dict]]:
    if not Path(spec).is_dir():
        return {method_of(spec): load(spec)[1]}
    rows = rows_of(Path(spec))
    methods = sorted({r["method"] for r in rows} - NOT_CANDIDATES)
    return {m: {r["id"]: r for r in rows if r["method"] == m} for m in methods}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="RUN_DIR:llm")
    ap.add_argument("--reference", help="RUN_DIR:llm-context, shown for comparison (never chosen)")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    _, base = load(args.baseline)
    pool: dict[str, dict[str, dict]] = {}
    for spec in args.runs:
        pool.update(candidates(spec))
    shown = dict(pool)
    if args.reference:
        shown[f"({method_of(args.reference)})"] = load(args.reference)[1]
    ids = sorted(set(base).intersection(*(set(v) for v in shown.values())))
    if not ids:
        sys.exit("choose_auto: the runs share no examples with the baseline")
    table = []
    for name, rows in shown.items():
        diffs = [paired_bootstrap([rows[i][k] for i in ids], [base[i][k] for i in ids]) for k in RULE_METRICS]
        table.append((sum(d.mean_diff for d in diffs) / len(diffs), name, diffs))
    table.sort(key=lambda t: (t[1].startswith("("), -t[0]))
    print(f"{len(ids)} dev examples shared by every run; rule: mean of the paired differences against llm in "
          f"{', '.join(RULE_METRICS)}\n")
    print("| rank | method | rule score | " + " | ".join(f"{k} vs llm [95% CI]" for k in RULE_METRICS) + " |")
    print("|---|---|---|" + "---|" * len(RULE_METRICS))
    for rank, (score, name, diffs) in enumerate(table, 1):
        cells = [f"{d.mean_diff:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" for d in diffs]
        label = "-" if name.startswith("(") else str(rank)
        print(f"| {label} | `{name}` | {score:+.4f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
