"""Exact speculative steering over real HTTP with the seeded NumPy models: the device
sends its guess of the next tokens with each request, the cloud answers with its
distributions along the guess, and the output stays per-token CoSteer's, token for
token, for every method and sampling mode, with and without lookahead."""

from __future__ import annotations

import json

import numpy as np
import pytest

from costeer import CloudConfig, CoSteer, UserError
from costeer.cli import main
from costeer.methods import METHODS, make_policy
from costeer.speculation import SpeculativeGroup, steered_guess
from costeer.transport.server.app import create_app
from support.fake_servers import RequestLog
from support.fakes import NumpyModel
from support.servers import app_in_thread
from support.split_fixtures import CANARY, CONTEXT, PROMPT, device, embedded, served  # noqa: F401  (fixtures)

# methods whose cloud stream is public (llm-context's is refused over a network)
CLOUD_METHODS = [m for m in sorted(METHODS) + ["mix:0.5", "fit:0.5"]
                 if any(s.role == "llm" and s.prompt == "public" for s in make_policy(m, None, "closed", 64).streams)]


def _requests(t: dict) -> int:
    """Requests that appended tokens: all but the open and the looks."""
    return t["round_trips"] - 1 - sum(t.get("escalations", {}).values())


@pytest.mark.parametrize("method", CLOUD_METHODS)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_speculation_gives_the_per_token_tokens(served, embedded, method, k):
    url, _ = served
    per_token = device(url, top_k=4).generate(PROMPT, CONTEXT, method=method, max_new_tokens=32)
    g = device(url, top_k=4, speculate=k).generate(PROMPT, CONTEXT, method=method, max_new_tokens=32)
    assert g.token_ids == per_token.token_ids == embedded.generate(PROMPT, CONTEXT, method=method,
                                                                   max_new_tokens=32).token_ids
    t = g.traffic
    assert t.get("uncertified_steps", 0) == 0
    if "draft_tokens" in t:  # methods that read the device every step draft
        assert 0 <= t["draft_tokens_followed"] <= t["draft_tokens"]
        # each request after the open carries one chosen token, the rest come from draft nodes
        assert _requests(t) + t["lookahead_tokens"] == g.new_tokens - 1 + (g.finish_reason == "eos")
        assert t["lookahead_tokens"] <= t["draft_tokens_followed"]


@pytest.mark.parametrize("sampling", [dict(temperature=0.8, top_k=5), dict(temperature=1.2, top_p=0.8),
                                      dict(temperature=0.9)])
@pytest.mark.parametrize("lookahead", [None, (2, 1, 0.0), (2, 3, 0.0)])
def test_seeded_sampling_is_exact_with_and_without_lookahead(served, embedded, sampling, lookahead):
    url, _ = served
    cs = device(url, top_k=4, speculate=2, lookahead=lookahead)
    for seed in range(3):
        g = cs.generate(PROMPT, CONTEXT, max_new_tokens=20, seed=seed, **sampling)
        assert g.token_ids == embedded.generate(PROMPT, CONTEXT, max_new_tokens=20, seed=seed, **sampling).token_ids
        assert g.traffic["uncertified_steps"] == 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_device_that_guesses_right_moves_k_plus_one_tokens_a_request(served, k):
    """The cloud's own model on the device: its guess (the with-context model's greedy
    token) is exactly mix:1's fused pick, so every draft is followed but where the
    generation ends first, and each request moves K + 1 tokens."""
    url, _ = served
    cs = CoSteer(slm=NumpyModel(1, "numpy-cloud"), cloud=CloudConfig(url, top_k=4, speculate=k))
    g = cs.generate(PROMPT, CONTEXT, method="mix:1", max_new_tokens=40)
    t = g.traffic
    assert t["draft_tokens"] - k <= t["draft_tokens_followed"] <= t["draft_tokens"]
    assert _requests(t) == -(-(g.new_tokens - 1) // (k + 1))


def test_followed_drafts_save_requests(served):
    url, _ = served
    per_token = device(url, top_k=4).generate(PROMPT, CONTEXT, method="mix:1", max_new_tokens=40)
    cs = CoSteer(slm=NumpyModel(1, "numpy-cloud"), cloud=CloudConfig(url, top_k=4, speculate=2))
    g = cs.generate(PROMPT, CONTEXT, method="mix:1", max_new_tokens=40)
    assert _requests(g.traffic) == _requests(per_token.traffic) - g.traffic["lookahead_tokens"] < 20


def test_the_device_sends_its_draft_and_the_chosen_tokens_only(served, tmp_path):
    url, _ = served
    wire = tmp_path / "wire.jsonl"
    g = device(url, speculate=2, wire_log=wire, top_k=4).generate(PROMPT, CONTEXT, max_new_tokens=24)
    sent = [json.loads(line)["body"] for line in wire.read_text().splitlines()]
    sent = [b for b in sent if b and "tokens" in b and b["tokens"]]
    appended = [t for body in sent for t in body["tokens"]]
    assert appended == g.token_ids[: len(appended)] and len(appended) >= g.new_tokens - 3
    assert all(set(b) - {"stream", "draft"} == {"tokens", "top_k"} for b in sent)
    assert all(len(b.get("draft", [])) <= 2 for b in sent) and any(b.get("draft") for b in sent)
    assert all(CANARY not in json.dumps(b) for b in sent)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5])
def test_a_draft_is_never_longer_than_what_is_left_to_pick(served, embedded, tmp_path, max_new_tokens):
    """The device's streams hold room for max_new_tokens: near the end the guess shortens."""
    url, _ = served
    wire = tmp_path / "wire.jsonl"
    g = device(url, speculate=4, wire_log=wire, top_k=4).generate(PROMPT, CONTEXT, max_new_tokens=max_new_tokens)
    assert g.token_ids == embedded.generate(PROMPT, CONTEXT, max_new_tokens=max_new_tokens).token_ids
    sent = [json.loads(line)["body"] for line in wire.read_text().splitlines()]
    chosen = 0
    for body in (b for b in sent if b and b.get("tokens")):
        chosen += len(body["tokens"])
        assert len(body.get("draft", [])) <= max_new_tokens - chosen


def test_drafts_are_refused_clearly(served, capsys):
    url, log = served
    import httpx
    opened = httpx.post(f"{url}/v1/sessions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_new_tokens": 8, "speculate": 2}).json()
    step = f"{url}/v1/sessions/{opened['session_id']}/step"
    too_long = httpx.post(step, json={"tokens": [1], "draft": [1, 2, 3]})
    assert too_long.status_code == 422 and too_long.json()["error"] == "draft_too_long"
    no_tokens = httpx.post(step, json={"tokens": [], "draft": [1]})
    assert no_tokens.status_code == 422
    full_vector = httpx.post(step, json={"tokens": [1], "draft": [1], "top_k": None})
    assert full_vector.status_code == 422
    outside = httpx.post(step, json={"tokens": [1], "draft": [10**6]})
    assert outside.status_code == 422 and outside.json()["error"] == "token_out_of_range"
    ok = httpx.post(step, json={"tokens": [1], "draft": [2, 3], "top_k": 3}).json()
    assert [n["path"] for n in ok["tree"]] == [[2], [2, 3]]
    plain = httpx.post(f"{url}/v1/sessions", json={"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 8}).json()
    refused = httpx.post(f"{url}/v1/sessions/{plain['session_id']}/step", json={"tokens": [1], "draft": [2]})
    assert refused.status_code == 422 and refused.json()["error"] == "draft_too_long"

    assert main(["generate", "--cloud", url, "--speculate", "9", "--prompt", PROMPT]) == 2
    assert "0..8" in capsys.readouterr().err
    with pytest.raises(UserError, match="0 to 8"):
        CloudConfig(url, speculate=-1)
    with pytest.raises(UserError, match="remote cloud"):
        CloudConfig("", speculate=2)
    assert main(["generate", "--speculate", "2", "--prompt", PROMPT]) == 2
    assert "remote cloud" in capsys.readouterr().err
    with pytest.raises(UserError, match="costeer serve"):
        device("openai+" + url, speculate=2).generate(PROMPT, CONTEXT, max_new_tokens=2)

    class NoTrees(NumpyModel):
        supports_lookahead = False

    with app_in_thread(create_app(NoTrees(1))) as other:
        with pytest.raises(UserError, match="does not take drafts"):
            device(other, speculate=2).generate(PROMPT, CONTEXT, max_new_tokens=4)


def test_a_rewound_group_computes_as_if_the_draft_was_never_fed():
    model = NumpyModel(2, "numpy-device")
    rng = np.random.default_rng(0)
    for _ in range(20):
        prompts = [[1, 2, 3], [4, 5]]
        plain = model.open_streams(prompts, 64)
        spec = SpeculativeGroup(model.open_streams(prompts, 64), steered_guess(0, 1, weight=float(rng.uniform(0, 3))))
        for _ in range(12):
            if rng.random() < 0.5:
                spec.draft(int(rng.integers(1, 5)))
            assert np.array_equal(spec.logits(), plain.logits())
            guess = spec._guess[0] if spec._guess and rng.random() < 0.7 else int(rng.integers(0, model.vocab_size))
            spec.advance(guess)
            plain.advance(guess)
        assert np.array_equal(spec.logits(), plain.logits())
        assert 0 <= spec.followed <= spec.drafted
