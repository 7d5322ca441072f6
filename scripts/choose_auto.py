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

from costeer.errors import UserError
from costeer.evaluation.compare import auto_report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="RUN_DIR:llm")
    ap.add_argument("--reference", help="RUN_DIR:llm-context, shown for comparison (never chosen)")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    try:
        print(auto_report(args.baseline, args.runs, args.reference))
    except UserError as exc:
        sys.exit(f"choose_auto: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
