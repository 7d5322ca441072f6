"""Decoding speed of CoSteer against the cloud model alone, measured side by side.

    .venv/bin/python benchmarks/speed.py [--rounds 3] [--max-new-tokens 48] [--prompts 3]

Every round runs each variant once on each prompt (CoGenesis dev tasks, or the
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
from costeer.decoding import decode
from costeer.evaluation.datasets import load_cogenesis
from costeer.methods import CoSteerPolicy, StreamSpec
from costeer.prompts import build_prompts
from costeer.sampling import SamplingConfig, TokenPicker

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cogenesis"
EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "costeer" / "examples" / "profile.md"


class PaperStylePolicy(CoSteerPolicy):
    """CoSteer with each device stream in its own group: one forward pass per stream."""

    streams = (StreamSpec("llm", "public"), StreamSpec("slm", "private"), StreamSpec("slm_again", "public"))  # type: ignore[arg-type]


def load_tasks(n: int) -> list[tuple[list, list]]:
    """(public messages, private messages) pairs."""
    if (DATA / "ctx_dev.json").is_file():
        return [(e.public, e.private) for e in load_cogenesis(DATA).examples[:n]]
    pair = build_prompts("Write a two-sentence invitation to my birthday party.", EXAMPLE.read_text())
    return [(pair.public, pair.private)] * n


def run_variant(cs: CoSteer, variant: str, public, private, max_new_tokens: int):
    if variant == "paper-style":
        llm, slm = cs.model("llm"), cs.model("slm")
        policy = PaperStylePolicy("paper-style", SteeringParams(), "loop")
        models = {"llm": llm, "slm": slm, "slm_again": slm}
        prompts = [llm.tokenize(llm.render_chat(public)), slm.tokenize(slm.render_chat(private)),
                   slm.tokenize(slm.render_chat(public))]
        r = decode(policy, models, prompts, TokenPicker(SamplingConfig()), max_new_tokens)  # type: ignore[arg-type]
        return len(r.token_ids), r.elapsed_s, r.time_to_first_token_s, r.prefill_s
    method, fusion = {"costeer-loop": ("costeer", "loop")}.get(variant, (variant, "closed"))
    g = cs.generate_from_messages(public, private, method=method, fusion=fusion, max_new_tokens=max_new_tokens)
    return g.new_tokens, g.elapsed_s, g.time_to_first_token_s, g.prefill_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--variants", default="llm,costeer,costeer-loop,paper-style,light")
    args = ap.parse_args()
    variants = args.variants.split(",")
    cs = CoSteer(context_cache=False)  # every prefill cold: the prefill column compares variants
    cs.model("llm"), cs.model("slm")
    tasks = load_tasks(args.prompts)
    per_token: dict[str, list[float]] = {v: [] for v in variants}
    prefill: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(args.rounds):
        order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
        for public, private in tasks:
            for v in order:
                n, elapsed, ttft, pre = run_variant(cs, v, public, private, args.max_new_tokens)
                if n > 1:
                    per_token[v].append((elapsed - ttft) / (n - 1) * 1000)
                prefill[v].append(pre)
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
