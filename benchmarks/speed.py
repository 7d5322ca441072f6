"""Decoding speed of CoSteer against the cloud model alone, measured side by side.

    .venv/bin/python benchmarks/speed.py [--rounds 3] [--max-new-tokens 48] [--prompts 3]

Beside `costeer bench` (the headline figures, one command), this compares the
paper's structure variant by variant. Every round runs each variant once on each prompt (CoGenesis dev tasks, or the
example profile when the data folder is absent), in an order that rotates per
round, so drift and noise on this shared machine hit all variants alike. It prints
median milliseconds per generated token (decode only, after the first token), the
median prefill time, and each variant's speed as a ratio to `llm`.

Variants:
  llm            the cloud model alone (the reference, 1.00x)
  costeer        this package's default: closed form, device streams batched
  costeer-loop   the paper's 20-step FTRL loop instead of the closed form
  paper-style    the authors' structure: three separate forward passes per token
                 (device streams not batched) and the FTRL loop
  light          LightCoSteer (T=1)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from costeer import CoSteer, SteeringParams
from costeer.bench.speed import BenchConfig, decode_ms, load_tasks, rotating
from costeer.bench.contention import warn_if_contended
from costeer.decoding import decode
from costeer.methods import CoSteerPolicy, StreamSpec
from costeer.sampling import SamplingConfig, TokenPicker

# A script, not library code: it may default to the data folder beside the repository root
# (../shared/data/cogenesis, from this file, not from the working directory); --data overrides.
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cogenesis"


class PaperStylePolicy(CoSteerPolicy):
    """CoSteer with each device stream in its own group: one forward pass per stream."""

    streams = (StreamSpec("llm", "public"), StreamSpec("slm", "private"), StreamSpec("slm_again", "public"))  # type: ignore[arg-type]


def run_variant(cs: CoSteer, variant: str, public, private, max_new_tokens: int):
    if variant == "paper-style":
        llm, slm = cs.model("llm"), cs.model("slm")
        policy = PaperStylePolicy("paper-style", SteeringParams(), "loop")
        models = {"llm": llm, "slm": slm, "slm_again": slm}
        prompts = [llm.tokenize(llm.render_chat(public)), slm.tokenize(slm.render_chat(private)),
                   slm.tokenize(slm.render_chat(public))]
        return decode(policy, models, prompts, TokenPicker(SamplingConfig()), max_new_tokens)  # type: ignore[arg-type]
    method, fusion = {"costeer-loop": ("costeer", "loop")}.get(variant, (variant, "closed"))
    return cs.generate_from_messages(public, private, method=method, fusion=fusion, max_new_tokens=max_new_tokens)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--variants", default="llm,costeer,costeer-loop,paper-style,light")
    ap.add_argument("--data", type=Path, default=DATA, help="a CoGenesis folder (default ../shared/data/cogenesis)")
    args = ap.parse_args()
    variants = args.variants.split(",")
    warn_if_contended("benchmarks/speed.py")
    cs = CoSteer(context_cache=False)  # every prefill cold: the prefill column compares variants
    cs.model("llm"), cs.model("slm")
    tasks = load_tasks(BenchConfig(data=args.data))[: args.prompts]
    per_token: dict[str, list[float]] = {v: [] for v in variants}
    prefill: dict[str, list[float]] = {v: [] for v in variants}
    for rnd, order in rotating(variants, args.rounds):
        for public, private in tasks:
            for v in order:
                result = run_variant(cs, v, public, private, args.max_new_tokens)
                if (ms := decode_ms(result)) is not None:
                    per_token[v].append(ms)
                prefill[v].append(result.prefill_s)
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    base = statistics.median(per_token["llm"]) if per_token.get("llm") else None
    print(f"{'variant':<14}{'ms/token':>10}{'tok/s':>8}{'vs llm':>8}{'prefill s':>11}   (medians of {len(per_token[variants[0]])} runs)")
    for v in variants:
        ms = statistics.median(per_token[v])
        ratio = f"{base / ms:.2f}x" if base else "-"
        print(f"{v:<14}{ms:>10.1f}{1000 / ms:>8.1f}{ratio:>8}{statistics.median(prefill[v]):>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
