"""Choose `--method auto` by the rule in costeer/evaluation/choose.py, fixed before the
candidates ran: standardised paired gains over `llm` averaged over four task families
(CoGenesis ctx, CoGenesis paper, PrefEval multiple choice, the preference tasks), with
any candidate significantly worse than `llm` anywhere, or copying more of the context
than `llm-context` on ctx, rejected.

    python scripts/choose_auto.py --candidates mix:1,costeer,fit,fit:0.5 \\
        --task ctx=reports/cogenesis-dev16-levers,reports/cogenesis-dev150 \\
        --task paper=reports/paper-dev60 --task prefeval=reports/prefeval-dev \\
        --task concise=reports/preference-concise --task verbose=reports/preference-verbose-256 \\
        --task uplifting=reports/preference-uplifting --task creative=reports/preference-creative

The candidates: `mix:1` (`auto` until now), `costeer` (the paper's), `fit` and `fit:0.5`
(strong on a short context, gentle on a long one). `fit:0.5` joined before any ctx or
paper run of `fit`: `mix:1`, which `fit` equals on long profiles, was known to copy more
of the CoGenesis profiles than `llm-context` (16 dev rows), which the rule rejects.

Prints a Markdown table, the pick first, with every task metric's standardised gain.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from costeer.errors import UserError
from costeer.evaluation.choose import choice_report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", required=True, help="comma-separated methods")
    ap.add_argument("--task", action="append", default=[], metavar="NAME=DIR[,DIR...]",
                    help="a task's `costeer eval` folders (repeatable; every task of the rule is needed)")
    args = ap.parse_args()
    try:
        runs = {}
        for spec in args.task:
            name, sep, folders = spec.partition("=")
            if not sep or not folders:
                raise UserError(f"expected NAME=DIR[,DIR...], got {spec!r}")
            runs[name] = [Path(f) for f in folders.split(",")]
        print(choice_report(runs, [m.strip() for m in args.candidates.split(",") if m.strip()]))
    except UserError as exc:
        sys.exit(f"choose_auto: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
