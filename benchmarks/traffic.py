"""Cloud traffic of certified top-k CoSteer, for several first k, on CoGenesis prompts.

    .venv/bin/python benchmarks/traffic.py [--prompts 5] [--max-new-tokens 64] [--ks 16,64,256,1024,4096]

Runs exact (full-vocabulary) greedy CoSteer with the default models in one
process and, at every step, replays the device/cloud protocol of `costeer serve`
for each first k: the step's top-k reply, then escalations (x16, ..., the full
vector) until the certificate holds. Bytes are the JSON bodies exactly as the
protocol encodes them (HTTP headers excluded). Because the chosen token does not
depend on k (the certificate makes top-k exact), one generation serves every k.
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

from costeer import CoSteer
from costeer.certified import CertificationStats, fuse_with_partial_cloud
from costeer.distribution import LocalNextToken, NextToken
from costeer.methods import DEFAULT_TOP_K, PLAUSIBLE_K, CoSteerPolicy, PlausibleCoSteer
from costeer.transport.protocol import FLOATS, IDS, Distribution, Step, encode_array

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cogenesis"


def reply_bytes(logits: np.ndarray, k: int | None) -> int:
    view = LocalNextToken(logits)
    if k is None or k >= logits.shape[-1]:
        full, lse = view.full()
        body = Distribution(position=0, lse=lse, full_logits_b64=encode_array(full, FLOATS))
    else:
        ids, vals, lse = view.top(k)
        body = Distribution(position=0, lse=lse, top_ids_b64=encode_array(ids, IDS), top_logits_b64=encode_array(vals, FLOATS))
    return len(body.model_dump_json(exclude_none=False))


def request_bytes(tokens: list[int], k: int | None) -> int:
    return len(json.dumps(Step(tokens=tokens, top_k=k).model_dump()))


class Replay(NextToken):
    """A local distribution that records which k the certifier asks for."""

    local = False
    max_k = None

    def __init__(self, logits: np.ndarray) -> None:
        self._local = LocalNextToken(logits)
        self.vocab_size = self._local.vocab_size
        self.asked: list[int | None] = []

    def top(self, k: int):
        self.asked.append(k)
        return self._local.top(k)

    def full(self):
        self.asked.append(None)
        return self._local.full()


class MeasuringCoSteer(CoSteerPolicy):
    def __init__(self, ks: list[int]) -> None:
        from costeer import SteeringParams

        super().__init__("costeer", SteeringParams())
        self.ks = ks
        self.stats = {k: CertificationStats() for k in ks}
        self.step_bytes: dict[int, list[int]] = {k: [] for k in ks}
        self.plausible = PlausibleCoSteer("costeer-plausible", self.params)
        self.plausible_agree: list[bool] = []
        self.plausible_bytes: list[int] = []
        self._last_token = 0

    def scores(self, dists, greedy):
        cloud, with_ctx, without_ctx = dists
        exact = super().scores(dists, greedy)  # local cloud: the full-vocabulary closed form
        choice = int(np.argmax(exact))
        logits = cloud.logits
        steer = self.steering(with_ctx.logits, without_ctx.logits)
        for k in self.ks:
            replay = Replay(logits)
            scores = fuse_with_partial_cloud(replay, steer, k, True, self.stats[k])
            assert int(np.argmax(scores)) == choice, "certified top-k must equal full-vocabulary CoSteer"
            total = request_bytes([self._last_token], k) + reply_bytes(logits, k)
            for asked in replay.asked[1:]:  # escalations: same position, more tokens
                total += request_bytes([], asked if asked and asked < len(logits) else None)
                total += reply_bytes(logits, asked)
            self.step_bytes[k].append(total)
        plausible_choice = int(np.argmax(self.plausible.scores(dists, greedy)))
        self.plausible_agree.append(plausible_choice == choice)
        self.plausible_bytes.append(request_bytes([self._last_token], PLAUSIBLE_K) + reply_bytes(logits, PLAUSIBLE_K))
        self._last_token = choice
        return exact


def load_pairs(n: int):
    with_ctx = json.loads((DATA / "ctx_dev.json").read_text())
    without = json.loads((DATA / "ctx_dev_wo.json").read_text())
    system = {"role": "system", "content": "You are a helpful assistant."}
    return [([system, {"role": "user", "content": wo["conversations"][0]["value"]}],
             [system, {"role": "user", "content": w["conversations"][0]["value"]}])
            for w, wo in list(zip(with_ctx, without))[:n]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--ks", default="16,64,256,1024,4096")
    ap.add_argument("--check-server", action="store_true")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    cs = CoSteer()
    policy = MeasuringCoSteer(ks)
    from costeer.decoding import decode
    from costeer.sampling import SamplingConfig, TokenPicker

    llm, slm = cs.model("llm"), cs.model("slm")
    models = {"llm": llm, "slm": slm}
    exact_runs = []
    for i, (public, private) in enumerate(load_pairs(args.prompts)):
        prompts = [llm.encode_chat(public), slm.encode_chat(private), slm.encode_chat(public)]
        result = decode(policy, models, prompts, TokenPicker(SamplingConfig()), args.max_new_tokens)
        exact_runs.append((public, private, result.token_ids))
        print(f"prompt {i + 1}/{args.prompts}: {len(result.token_ids)} tokens", file=sys.stderr)
    steps = len(policy.step_bytes[ks[0]])
    print(f"{steps} greedy steps on {args.prompts} CoGenesis dev prompts, default models, c = {policy.coefficient:.6f}\n")
    print("| first k | certified at first k | median bytes/token | mean bytes/token | escalations (requests by size) |")
    print("|---|---|---|---|---|")
    for k in ks:
        s = policy.stats[k]
        esc = ", ".join(f"{size}: {n}" for size, n in s.as_dict()["escalations"].items()) or "none"
        print(f"| {k} | {s.certified_first / s.steps:.1%} | {statistics.median(policy.step_bytes[k]):,.0f} | "
              f"{statistics.mean(policy.step_bytes[k]):,.0f} | {esc} |")
    full = reply_bytes(np.zeros(llm.vocab_size, dtype=np.float32), None) + request_bytes([0], None)
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
    from servers import costeer_serve, free_port

    with costeer_serve(port=free_port()) as url:
        remote = CoSteer(cloud=url, quiet=True)
        remote.model("slm")
        measured, same = 0, True
        for public, private, tokens in runs:
            g = remote.generate_from_messages(public, private, max_new_tokens=max_new_tokens)
            same &= g.token_ids == tokens
            measured += g.traffic["bytes_from_cloud"] + g.traffic["bytes_to_cloud"]
        remote.close()
    replayed = sum(policy.step_bytes[DEFAULT_TOP_K])
    print(f"\nreal `costeer serve` at k={DEFAULT_TOP_K}: same tokens as embedded: {same}; "
          f"measured {measured:,} body bytes (incl. session open/close), replayed {replayed:,}")


if __name__ == "__main__":
    sys.exit(main())
