"""Where the paper's steering weight goes wrong on CoGenesis, per answer and per token.

    python scripts/diagnose_steering.py --run reports/cogenesis-dev150 [--steps 12]
    python scripts/diagnose_steering.py reports/cogenesis-dev16-levers:llm=llm reports/layout-no-history:costeer

Per answer (one `costeer eval` run's methods, or RUN_DIR:METHOD answers from several runs):
  - copying: the share of an answer's word 4-grams found in the private context but
    not in the public request (text the cloud could only get from the device);
  - length: words, and how often the answer ran to the token limit;
  - how the ROUGE-L gain over `llm` moves with each (Spearman's rho over answers).

Per token (`--steps N`: decode the first N rows again with the paper's `costeer`, or
the method `--steps-method` names, recording every step; greedy, the default models):
  - how often steering changed the cloud's own choice (a flip), by the cloud's
    confidence (its top probability);
  - the size of the steering term (c*delta for `costeer`) at the chosen token: the
    flips driven by a huge delta.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from costeer.errors import UserError
from costeer.evaluation.compare import load_answers, methods_of
from costeer.evaluation.diagnose import per_answer, per_token


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("answers", nargs="*", help="RUN_DIR:METHOD[=LABEL] (as in compare_runs.py); label `llm` is the baseline")
    ap.add_argument("--run", type=Path, help="a costeer eval folder: its --methods")
    ap.add_argument("--dataset", default="../shared/data/cogenesis")  # a script: relative to where it is run
    ap.add_argument("--methods", help="with --run: which of its methods (default: all, as they first appear)")
    ap.add_argument("--steps", type=int, default=0, help="also decode this many rows, recording every step")
    ap.add_argument("--steps-method", default="costeer", help="the method --steps decodes with (default: costeer)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    try:
        run_methods = (args.methods.split(",") if args.methods else methods_of(args.run)) if args.run else []
        specs = [*(f"{args.run}:{m}={m}" for m in run_methods), *args.answers]
        if not specs:
            ap.error("give --run or RUN_DIR:METHOD answers")
        print(per_answer([load_answers(spec) for spec in specs], args.dataset))
        if args.steps:
            print(per_token(args.dataset, args.steps, args.max_new_tokens, method=args.steps_method))
    except UserError as exc:
        sys.exit(f"diagnose_steering: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
