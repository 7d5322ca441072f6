"""Speed of steering across tokenizers against the same-tokenizer pair, side by side.

    .venv/bin/python benchmarks/cross_tokenizer.py [--rounds 3] [--prompts 3] [--max-new-tokens 64]

The cloud model is the default Qwen2.5-Coder-1.5B in every variant:
  llm              the cloud model alone (the reference, 1.00x)
  costeer          steered by Qwen2.5-Coder-0.5B, the same tokenizer (fusion index by index)
  costeer-gemma    steered by Gemma 3 270M, another tokenizer (fusion on the map, text alignment)

Each round runs every variant on each prompt (CoGenesis dev tasks), in an order that
rotates per round. It prints median ms per generated token after the first, the
ratio to `llm` and to `costeer`, and for the Gemma device how many cloud tokens fell
outside the shared vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from costeer import CoSteer
from costeer.bench.speed import BenchConfig, decode_ms, load_tasks, rotating

# A script, not library code: it may default to the data folder beside the repository root
# (../shared/data/cogenesis, from this file, not from the working directory); --data overrides.
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cogenesis"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--data", type=Path, default=DATA, help="a CoGenesis folder (default ../shared/data/cogenesis)")
    args = ap.parse_args()
    same = CoSteer(quiet=True, context_cache=False)
    cloud = same.model("llm")
    same.model("slm")
    cross = CoSteer(llm=cloud, slm="gemma3-270m", quiet=True, context_cache=False)
    cross.model("slm")
    runs = {"llm": (same, "llm"), "costeer": (same, "costeer"), "costeer-gemma": (cross, "costeer")}
    tasks = load_tasks(BenchConfig(data=args.data))[: args.prompts]
    per_token: dict[str, list[float]] = {v: [] for v in runs}
    steps = outside = 0
    for rnd, order in rotating(list(runs), args.rounds):
        for public, private in tasks:
            for v in order:
                cs, method = runs[v]
                g = cs.generate_from_messages(public, private, method=method, max_new_tokens=args.max_new_tokens)
                if (ms := decode_ms(g)) is not None:
                    per_token[v].append(ms)
                if g.alignment:
                    steps += g.alignment["steps"]
                    outside += g.alignment["retokenized_steps"] + g.alignment["deferred_steps"]
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    med = {v: statistics.median(xs) for v, xs in per_token.items()}
    print(f"{'variant':<15}{'ms/token':>10}{'tok/s':>8}{'vs llm':>8}{'vs costeer':>12}   (medians of {len(per_token['llm'])} runs)")
    for v, ms in med.items():
        print(f"{v:<15}{ms:>10.1f}{1000 / ms:>8.1f}{med['llm'] / ms:>7.2f}x{med['costeer'] / ms:>11.2f}x")
    print(f"Gemma device: {outside} of {steps} cloud tokens ({outside / max(steps, 1):.1%}) outside the shared vocabulary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
