"""The first top-k a split session learns from its own escalations: the rule itself over any
sequence of steps, and over real HTTP with the seeded NumPy models, the same tokens as a
fixed k with fewer round trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costeer.cli import build_parser
from costeer.transport.client.first_k import ADAPTIVE_MAX_K, ADAPTIVE_PATIENCE, FirstTopK
from support.fuzz import examples
from support.split_fixtures import CONTEXT, PROMPT, device, embedded, served  # noqa: F401  (fixtures)

# a step: the k of each widening it needed (None: the full vector); [] settled at once
steps = st.lists(st.lists(st.one_of(st.none(), st.integers(1, 1 << 20)), max_size=3), max_size=60)


@settings(max_examples=examples(400, 2000), deadline=None)
@given(base=st.integers(1, 4096), history=steps, adaptive=st.booleans())
def test_k_stays_within_its_bounds_and_follows_the_last_steps(base, history, adaptive):
    first = FirstTopK(base, adaptive)
    calm = 0
    for widenings in history:
        before = first.k
        for k in widenings:
            first.widened(k)
        k = first.stepped()
        assert k == first.k and base <= k <= max(base, ADAPTIVE_MAX_K)
        if not adaptive:
            assert k == base
        elif widenings:  # it had to widen: the next step asks for what it needed, within the ceiling
            needed = max(ADAPTIVE_MAX_K if w is None else w for w in widenings)
            assert k == min(max(before, needed), max(base, ADAPTIVE_MAX_K))
            calm = 0
        else:
            calm += 1
            assert k == (max(base, before // 2) if calm == ADAPTIVE_PATIENCE else before)
            calm %= ADAPTIVE_PATIENCE


def test_k_halves_back_to_the_base_after_calm_runs():
    first = FirstTopK(64)
    first.widened(1024)
    assert first.stepped() == 1024
    seen = [first.stepped() for _ in range(4 * ADAPTIVE_PATIENCE)]
    assert seen[ADAPTIVE_PATIENCE - 1] == 512 and seen[-1] == 64 and min(seen) == 64


def _step_ks(wire) -> list[int | None]:
    records = [json.loads(line) for line in wire.read_text().splitlines()]
    return [r["body"]["top_k"] for r in records
            if r["direction"] == "device->cloud" and r["path"].endswith("/step") and r["body"].get("tokens")]


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.9, top_k=20, seed=7)])
def test_adaptive_k_gives_the_fixed_k_tokens_with_fewer_round_trips(served, embedded, sampling, tmp_path):
    url, _ = served
    runs = {}
    for adaptive in (False, True):
        wire = tmp_path / f"wire-{adaptive}.jsonl"
        cs = device(url, top_k=1, adaptive_top_k=adaptive, wire_log=wire)  # k = 1 forces escalations
        runs[adaptive] = (cs.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=30, **sampling), _step_ks(wire))
        cs.close()
    (fixed, fixed_ks), (learned, learned_ks) = runs[False], runs[True]
    local = embedded.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=30, **sampling)
    assert fixed.token_ids == learned.token_ids == local.token_ids and learned.new_tokens > 5
    assert set(fixed_ks) == {1} and max(learned_ks) > 1  # steps carried the larger k up front
    assert learned.traffic["round_trips"] < fixed.traffic["round_trips"]
    assert learned.traffic["certified_first_fraction"] > fixed.traffic["certified_first_fraction"]


def test_the_cli_can_fix_the_first_k():
    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt", "x"]).fixed_top_k is False
    assert parser.parse_args(["generate", "--prompt", "x", "--fixed-top-k"]).fixed_top_k is True
