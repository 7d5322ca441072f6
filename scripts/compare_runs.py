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

from costeer.errors import UserError
from costeer.evaluation.compare import compare_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="RUN_DIR:METHOD[=LABEL]; the first against each other")
    parser.add_argument("--exclude", metavar="RUN_DIR:METHOD", action="append", default=[],
                        help="leave out the examples this method answered (say, the rows a choice was made on)")
    args = parser.parse_args(argv)
    try:
        print(compare_report(args.runs, args.exclude))
    except UserError as exc:
        sys.exit(f"compare_runs: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
