"""Cloud traffic of certified top-k CoSteer, for several first k, on CoGenesis prompts.

    .venv/bin/python benchmarks/traffic.py [--prompts 5] [--max-new-tokens 64] [--ks 16,64,256,1024,4096] [--weight W]

Runs exact (full-vocabulary) greedy CoSteer with the default models in one
process and, at every step, replays the device/cloud protocol of `costeer serve`
for each first k: the step's top-k reply, then escalations (x16, ..., the full
vector) until the certificate holds. Bytes are the JSON bodies exactly as the
protocol encodes them (HTTP headers excluded). Because the chosen token does not
depend on k (the certificate makes top-k exact), one generation serves every k,
fixed and adaptive alike (each first k also as the base of the adaptive rule of
transport/client/first_k.py, which a session applies by default). Round trips count
each step and each escalation (a session's open and close excluded).
`--weight W` steers with mix:W instead of the paper's c.
It also scores `costeer-plausible` on the same trajectory: how often its choice
equals exact CoSteer's, and its fixed top-20 traffic.

`--check-server` also runs the default k through a real `costeer serve` on
loopback and prints the measured bytes next to the replayed ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from costeer import CloudConfig, CoSteer, SteeringParams
from costeer.certified import AskFor, CertificationStats, certify
from costeer.distribution import NextToken
from costeer.evaluation.datasets import load_cogenesis
from costeer.methods import DEFAULT_TOP_K, PLAUSIBLE_K, CoSteerPolicy, PlausibleCoSteer
from costeer.sampling import SamplingConfig
from costeer.transport.client.first_k import FirstTopK
from costeer.transport.protocol import Step, encode_distribution

# A script, not library code: it may default to the data folder beside the repository root
# (../shared/data/cogenesis, from this file, not from the working directory); --data overrides.
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cogenesis"
GREEDY = SamplingConfig()


def reply_bytes(view: NextToken, k: int | None) -> int:
    return len(encode_distribution(view, 0, k).model_dump_json(exclude_none=False))


def request_bytes(tokens: list[int], k: int | None) -> int:
    return len(json.dumps(Step(tokens=tokens, top_k=k).model_dump()))  # as the device's WireClient encodes it


def cloud_view(full: NextToken, k: int | None) -> NextToken:
    """What `costeer serve` sends when asked for k values (None: all)."""
    if k is None or k >= full.vocab_size:
        return full
    ids, logits = full.top(k)
    return NextToken(logits, full.lse, full.vocab_size, ids=ids, can_widen=True)


class MeasuringCoSteer(CoSteerPolicy):
    """Exact CoSteer that, at every step, replays the certified protocol for each first k."""

    def __init__(self, ks: list[int], weight: float | None = None) -> None:
        super().__init__("costeer", SteeringParams(), coefficient=weight)
        self.ks = ks
        self.variants = [(k, adaptive) for k in ks for adaptive in (False, True)]
        self.stats = {v: CertificationStats() for v in self.variants}
        self.step_bytes: dict[tuple[int, bool], list[int]] = {v: [] for v in self.variants}
        self.first = {v: FirstTopK(v[0], v[1]) for v in self.variants}
        self.plausible = PlausibleCoSteer("costeer-plausible", self.params)
        self.plausible_agree: list[bool] = []
        self.plausible_bytes: list[int] = []
        self._last_token = 0

    def decide(self, dists, sampling):
        cloud, with_ctx, without_ctx = dists
        exact = super().decide(dists, sampling)  # local cloud: the full-vocabulary closed form
        choice = int(np.argmax(exact.scores))
        steer = self.steering(with_ctx.logits, without_ctx.logits)
        for variant in self.variants:
            first = self.first[variant]
            k = first.k  # what this step's request asked for (the open's, at the first step)
            asked: list[int | None] = []
            total = request_bytes([self._last_token], k) + reply_bytes(cloud, k)
            decision = certify(cloud_view(cloud, k), steer, GREEDY)
            while isinstance(decision, AskFor):  # escalations: same position, more values
                asked.append(decision.k)
                first.widened(decision.k)
                total += request_bytes([], decision.k) + reply_bytes(cloud, decision.k)
                decision = certify(cloud_view(cloud, decision.k), steer, GREEDY)
            if int(np.argmax(decision.scores)) != choice:
                raise SystemExit(f"certified top-k (first k {variant}) chose differently from full-vocabulary CoSteer")
            first.stepped()
            self.stats[variant].record(decision, asked)
            self.step_bytes[variant].append(total)
        plausible = self.plausible.decide([cloud_view(cloud, PLAUSIBLE_K), with_ctx, without_ctx], sampling)
        self.plausible_agree.append(int(np.argmax(plausible.scores)) == choice)
        self.plausible_bytes.append(request_bytes([self._last_token], PLAUSIBLE_K) + reply_bytes(cloud, PLAUSIBLE_K))
        self._last_token = choice
        return exact

    def started(self, prompt_lengths: list[int]) -> None:
        self.first = {v: FirstTopK(v[0], v[1]) for v in self.variants}  # one session per prompt


def load_pairs(data: Path, n: int) -> list[tuple[list, list]]:
    return [(e.public, e.private) for e in load_cogenesis(data).examples[:n]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--ks", default="16,64,256,1024,4096")
    ap.add_argument("--check-server", action="store_true")
    ap.add_argument("--weight", type=float, default=None, help="steer with mix:W (default: the paper's c)")
    ap.add_argument("--data", type=Path, default=DATA, help="a CoGenesis folder (default ../shared/data/cogenesis)")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    cs = CoSteer()
    policy = MeasuringCoSteer(ks, args.weight)
    from costeer.decoding import decode
    from costeer.sampling import SamplingConfig, TokenPicker

    llm, slm = cs.model("llm"), cs.model("slm")
    models = {"llm": llm, "slm": slm}
    exact_runs = []
    for i, (public, private) in enumerate(load_pairs(args.data, args.prompts)):
        prompts = [llm.encode_chat(public), slm.encode_chat(private), slm.encode_chat(public)]
        result = decode(policy, models, prompts, TokenPicker(SamplingConfig()), args.max_new_tokens)
        exact_runs.append((public, private, result.token_ids))
        print(f"prompt {i + 1}/{args.prompts}: {len(result.token_ids)} tokens", file=sys.stderr)
    steps = len(policy.step_bytes[policy.variants[0]])
    print(f"{steps} greedy steps on {args.prompts} CoGenesis dev prompts, default models, c = {policy.coefficient:.6f}\n")
    print("| first k | adaptive | certified at first k | round trips/token | median bytes/token | mean bytes/token "
          "| escalations (requests by size) |")
    print("|---|---|---|---|---|---|---|")
    for variant in policy.variants:
        s, sizes = policy.stats[variant], policy.step_bytes[variant]
        esc = ", ".join(f"{size}: {n}" for size, n in s.as_dict()["escalations"].items()) or "none"
        trips = (s.steps + sum(s.requests_by_k.values())) / s.steps
        print(f"| {variant[0]} | {'yes' if variant[1] else 'no'} | {s.certified_first / s.steps:.1%} | {trips:.2f} | "
              f"{statistics.median(sizes):,.0f} | {statistics.mean(sizes):,.0f} | {esc} |")
    full = reply_bytes(NextToken.local(np.zeros(llm.vocab_size, dtype=np.float32)), None) + request_bytes([0], None)
    print(f"| full vector every step | 100% | {full:,} | {full:,} | - |")
    agree = np.mean(policy.plausible_agree)
    pb = statistics.mean(policy.plausible_bytes)
    print(f"\ncosteer-plausible (top-{PLAUSIBLE_K}, p >= 0.1 p_max): same choice as exact CoSteer at {agree:.1%} of "
          f"steps (on CoSteer's trajectory); {pb:,.0f} bytes/token, no escalation")
    if args.check_server:
        check_server(cs, exact_runs, args.max_new_tokens, policy)
    return 0


def check_server(cs, runs, max_new_tokens, policy) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.servers import costeer_serve, free_port

    with costeer_serve(port=free_port()) as url:
        remote = CoSteer(cloud=CloudConfig(url), quiet=True)
        remote.model("slm")
        measured, same = 0, True
        for public, private, tokens in runs:
            g = remote.generate_from_messages(public, private, max_new_tokens=max_new_tokens)
            same &= g.token_ids == tokens
            measured += g.traffic["bytes_from_cloud"] + g.traffic["bytes_to_cloud"]
        remote.close()
    replayed = sum(policy.step_bytes[(DEFAULT_TOP_K, True)])
    print(f"\nreal `costeer serve` at k={DEFAULT_TOP_K}: same tokens as embedded: {same}; "
          f"measured {measured:,} body bytes (incl. session open/close), replayed {replayed:,}")


if __name__ == "__main__":
    sys.exit(main())
