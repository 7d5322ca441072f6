"""Where the paper's steering weight goes wrong on CoGenesis, per answer and per token.

    python scripts/diagnose_steering.py --run reports/cogenesis-dev150 [--steps 12]
    python scripts/diagnose_steering.py reports/cogenesis-dev16-levers:llm=llm reports/layout-no-history:costeer

Per answer (one `costeer eval` run's methods, or RUN_DIR:METHOD answers from several runs):
  - copying: the share of an answer's word 4-grams found in the private context but
    not in the public request (text the cloud could only get from the device);
  - length: words, and how often the answer ran to the token limit;
  - how the ROUGE-L gain over `llm` moves with each (Spearman's rho over answers).

Per token (`--steps N`: decode the first N rows again with the paper's `costeer`,
recording every step; greedy, the default models):
  - how often steering changed the cloud's own choice (a flip), by the cloud's
    confidence (its top probability);
  - the size of c*delta at the chosen token: the flips driven by a huge delta.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from costeer.evaluation.datasets import load_dataset
from compare_runs import load, rows_of  # this folder is on sys.path when run as a script

WORD = re.compile(r"\w+", re.UNICODE)


def grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copy_rate(answer: str, private: str, public: str) -> float:
    mine = grams(answer)
    if not mine:
        return 0.0
    return len({g for g in mine if g in grams(private) and g not in grams(public)}) / len(mine)


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def per_answer(answers: list[tuple[str, dict[str, dict]]], dataset_spec: str) -> None:
    """`answers`: (label, {row id: eval row}) per method; compared on the rows all share.
    Copying is measured against `dataset_spec`'s private prompt, so runs on a variant
    of the data (scripts/layout_variants.py) are judged against the original context."""
    data = {e.id: e for e in load_dataset(dataset_spec).examples}
    ids = [i for i in data if all(i in rows for _, rows in answers)]
    if not ids:
        empty = [label for label, rows in answers if not rows.keys() & data.keys()]
        sys.exit(f"diagnose_steering: no row of {dataset_spec} is answered by every method"
                 + (f"; none at all by {', '.join(empty)}" if empty else ""))
    print(f"## Per answer ({len(ids)} rows)\n")
    print("| method | 4-gram copy from the context | words | hit the token limit | ROUGE-L |")
    print("|---|---|---|---|---|")
    copies: dict[str, list[float]] = {}
    for label, rows in answers:
        copies[label] = [copy_rate(rows[i]["text"], data[i].private[-1]["content"], data[i].public[-1]["content"])
                         for i in ids]
        words = [rows[i]["words"] for i in ids]
        limit = np.mean([rows[i]["finish_reason"] == "length" for i in ids])
        print(f"| {label} | {np.mean(copies[label]):.3f} | {np.mean(words):.0f} | {limit:.0%} | "
              f"{np.mean([rows[i]['rougeL'] for i in ids]):.3f} |")
    base = dict(answers).get("llm")
    if base is not None:
        print("\nSpearman's rho over answers, ROUGE-L gain over `llm` against:\n")
        print("| method | its copy rate | its length change |")
        print("|---|---|---|")
        for label, rows in answers:
            if label == "llm":
                continue
            gain = [rows[i]["rougeL"] - base[i]["rougeL"] for i in ids]
            longer = [rows[i]["words"] - base[i]["words"] for i in ids]
            print(f"| {label} | {spearman(gain, copies[label]):+.2f} | {spearman(gain, longer):+.2f} |")


def per_token(dataset_spec: str, n_rows: int, max_new_tokens: int) -> None:
    from costeer import CoSteer
    from costeer.decoding import decode
    from costeer.fusion import SteeringParams, local_delta
    from costeer.methods import CoSteerPolicy
    from costeer.sampling import SamplingConfig, TokenPicker

    steps: list[tuple[float, bool, float]] = []  # cloud's top probability, flipped, c*delta at the pick

    class Recording(CoSteerPolicy):
        def decide(self, dists, sampling):
            decision = super().decide(dists, sampling)
            cloud, with_ctx, without_ctx = dists
            pick = int(np.argmax(decision.scores))
            own = int(np.argmax(cloud.logits))
            c_delta = self.coefficient * float(local_delta(with_ctx.logits, without_ctx.logits)[pick])
            steps.append((float(np.exp(cloud.top_logprob())), pick != own, c_delta))
            return decision

    cs = CoSteer(quiet=True, context_cache=False)
    models = {"llm": cs.model("llm"), "slm": cs.model("slm")}
    for example in load_dataset(dataset_spec).examples[:n_rows]:
        policy = Recording("costeer", SteeringParams())
        prompts = [models["llm"].encode_chat(example.public), models["slm"].encode_chat(example.private),
                   models["slm"].encode_chat(example.public)]
        decode(policy, models, prompts, TokenPicker(SamplingConfig()), max_new_tokens)
    p = np.array([s[0] for s in steps])
    flip = np.array([s[1] for s in steps])
    cd = np.array([s[2] for s in steps])
    print(f"\n## Per token ({len(steps)} steps of `costeer` on {n_rows} rows)\n")
    print("| cloud's top probability | steps | flipped by steering | median c*delta at a flip |")
    print("|---|---|---|---|")
    for lo, hi in ((0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 1.01)):
        sel = (p >= lo) & (p < hi)
        flips = sel & flip
        med = f"{np.median(cd[flips]):+.2f}" if flips.any() else "-"
        print(f"| [{lo}, {min(hi, 1)}) | {sel.sum()} ({sel.mean():.0%}) | {flips.sum()} ({flips.sum() / max(sel.sum(), 1):.0%}) | {med} |")
    print(f"\nFlips: {flip.sum()} of {len(steps)} steps ({flip.mean():.1%}); "
          f"{(flip & (p >= 0.9)).sum()} of them where the cloud was at least 90% sure; "
          f"{(flip & (cd > 3)).sum()} chose a token the context made e^3 = 20x likelier or more.")


def methods_of(run: Path) -> list[str]:
    """A `costeer eval` folder's methods, in the order they first appear in its results."""
    return list(dict.fromkeys(row["method"] for row in rows_of(run)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("answers", nargs="*", help="RUN_DIR:METHOD[=LABEL] (as in compare_runs.py); label `llm` is the baseline")
    ap.add_argument("--run", type=Path, help="a costeer eval folder: its --methods")
    ap.add_argument("--dataset", default="../shared/data/cogenesis")
    ap.add_argument("--methods", help="with --run: which of its methods (default: all, as they first appear)")
    ap.add_argument("--steps", type=int, default=0, help="also decode this many rows, recording every step")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    run_methods = (args.methods.split(",") if args.methods else methods_of(args.run)) if args.run else []
    specs = [*(f"{args.run}:{m}={m}" for m in run_methods), *args.answers]
    if not specs:
        ap.error("give --run or RUN_DIR:METHOD answers")
    per_answer([load(spec) for spec in specs], args.dataset)
    if args.steps:
        per_token(args.dataset, args.steps, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
