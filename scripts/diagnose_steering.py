"""Where the paper's steering weight goes wrong on CoGenesis, per answer and per token.

    python scripts/diagnose_steering.py --run reports/cogenesis-dev150 [--steps 12]

Per answer (from a `costeer eval` run that has `llm` and `costeer` on the same rows):
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
import json
import re
from pathlib import Path

import numpy as np

from costeer.evaluation.datasets import load_dataset

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


def per_answer(run: Path, dataset_spec: str, methods: list[str]) -> None:
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text(encoding="utf-8").splitlines() if line]
    by = {(r["id"], r["method"]): r for r in rows}
    data = {e.id: e for e in load_dataset(dataset_spec).examples}
    ids = [i for i in data if all((i, m) in by for m in methods)]
    print(f"## Per answer ({len(ids)} rows of {run})\n")
    print("| method | 4-gram copy from the context | words | hit the token limit | ROUGE-L |")
    print("|---|---|---|---|---|")
    copies: dict[str, list[float]] = {}
    for m in methods:
        copies[m] = [copy_rate(by[i, m]["text"], data[i].private[-1]["content"], data[i].public[-1]["content"])
                     for i in ids]
        words = [by[i, m]["words"] for i in ids]
        limit = np.mean([by[i, m]["finish_reason"] == "length" for i in ids])
        print(f"| {m} | {np.mean(copies[m]):.3f} | {np.mean(words):.0f} | {limit:.0%} | "
              f"{np.mean([by[i, m]['rougeL'] for i in ids]):.3f} |")
    if "llm" in methods:
        print("\nSpearman's rho over answers, ROUGE-L gain over `llm` against:\n")
        print("| method | its copy rate | its length change |")
        print("|---|---|---|")
        for m in methods:
            if m == "llm":
                continue
            gain = [by[i, m]["rougeL"] - by[i, "llm"]["rougeL"] for i in ids]
            longer = [by[i, m]["words"] - by[i, "llm"]["words"] for i in ids]
            print(f"| {m} | {spearman(gain, copies[m]):+.2f} | {spearman(gain, longer):+.2f} |")


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a costeer eval folder with llm and costeer")
    ap.add_argument("--dataset", default="../shared/data/cogenesis")
    ap.add_argument("--methods", default="llm,costeer,light,llm-context")
    ap.add_argument("--steps", type=int, default=0, help="also decode this many rows, recording every step")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    per_answer(args.run, args.dataset, args.methods.split(","))
    if args.steps:
        per_token(args.dataset, args.steps, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
