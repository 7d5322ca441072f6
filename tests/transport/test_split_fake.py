"""Split mode without real models: `costeer serve`'s app and a fake OpenAI-compatible
server on loopback (real HTTP, in a thread), the seeded NumPy models on both sides.
Exactness, traffic, the privacy rule for every method, and misbehaving servers."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from costeer import CloudConfig, CoSteer, UserError
from costeer.cli import main
from costeer.errors import PrivacyError
from costeer.methods import METHODS
from costeer.prompts import INLINE_TEXT_WARNING
from costeer.transport.server.app import create_app
from support.fake_servers import (VLLM_DEFAULT, VLLM_UNCAPPED, OpenAIQuirks, RequestLog, llama_server_app, openai_app,
                          short_changing)
from support.fakes import NumpyModel
from support.servers import app_in_thread
from support.split_fixtures import CANARY, CONTEXT, PROMPT, device, embedded, served  # noqa: F401  (fixtures)

ALL_METHODS = sorted(METHODS) + ["mix:0.5", "cos:2", "unsure:3", "bounded:1.5", "ada:0.6"]
PRIVATE_IN_CLOUD = {"llm-context"}


def test_the_fake_models_cache_like_real_ones():
    model = NumpyModel(1)
    prompt = model.encode_chat([{"role": "user", "content": "hello"}])
    with model.open_streams([prompt], 8) as group:
        for token in (104, 105, 257):
            group.advance(token)
        assert np.array_equal(group.logits()[0], model.logits_after([*prompt, 104, 105, 257]))


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m not in PRIVATE_IN_CLOUD])
def test_remote_greedy_equals_embedded_token_for_token(served, embedded, method, tmp_path):
    url, _ = served
    wire = tmp_path / "wire.jsonl"
    cs = device(url, wire_log=wire, top_k=4)
    remote = cs.generate(PROMPT, CONTEXT, method=method, max_new_tokens=24)
    local = embedded.generate(PROMPT, CONTEXT, method=method, max_new_tokens=24)
    assert remote.token_ids == local.token_ids and remote.new_tokens > 0
    records = [json.loads(line) for line in wire.read_text().splitlines()] if wire.exists() else []
    to_cloud = [r for r in records if r["direction"] == "device->cloud"]
    assert all(CANARY not in json.dumps(r) and "Ingrid" not in json.dumps(r) for r in to_cloud)
    if "llm" in {s.role for s in cs._policy(method, None, "closed").streams}:
        assert remote.traffic["round_trips"] >= remote.new_tokens
    cs.close()


def test_certified_traffic_escalates_and_is_reported(served, embedded):
    url, _ = served
    cs = device(url, top_k=1)  # k = 1 rarely certifies: forces escalations
    g = cs.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=30)
    assert g.token_ids == embedded.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=30).token_ids
    t = g.traffic
    assert t["steps"] in (g.new_tokens, g.new_tokens + 1) and t["uncertified_steps"] == 0
    assert t["escalations"] and t["certified_first_fraction"] < 1
    assert sum(t["escalations"].values()) + t["steps"] <= t["round_trips"]


@pytest.mark.parametrize("sampling", [dict(temperature=0.8, top_k=5), dict(temperature=1.2, top_p=0.8),
                                      dict(temperature=0.7, top_k=20, top_p=0.9)])
def test_top_k_and_top_p_sampling_is_exact_over_the_network(served, embedded, sampling):
    url, _ = served
    cs = device(url, top_k=4)
    for seed in range(3):
        remote = cs.generate(PROMPT, CONTEXT, max_new_tokens=20, seed=seed, **sampling)
        local = embedded.generate(PROMPT, CONTEXT, max_new_tokens=20, seed=seed, **sampling)
        assert remote.token_ids == local.token_ids
        assert remote.traffic["uncertified_steps"] == 0 and remote.traffic["max_missed_mass"] == 0.0


def test_plain_sampling_bounds_the_mass_it_leaves_out():
    with app_in_thread(create_app(NumpyModel(1, sharpness=20))) as url:  # a confident cloud
        g = device(url, top_k=8).generate(PROMPT, CONTEXT, max_new_tokens=20, temperature=0.9, seed=1)
    t = g.traffic
    assert 0 < t["max_missed_mass"] <= 1e-3 and t["uncertified_steps"] == 0 and t["certified_first_fraction"] > 0.5


@pytest.mark.parametrize("method", ALL_METHODS)
def test_privacy_rule_for_every_method(method, tmp_path):
    """Methods that hand the cloud the private context are refused before any request;
    every other method sends only the public conversation."""
    log = RequestLog()
    with app_in_thread(log.install(create_app(NumpyModel(1)))) as url:
        cs = device(url, wire_log=tmp_path / "wire.jsonl")
        if method in PRIVATE_IN_CLOUD:
            with pytest.raises(PrivacyError, match="privacy rule"):
                cs.generate(PROMPT, CONTEXT, method=method, max_new_tokens=4)
            assert log.bodies == []  # nothing reached the server, not even GET /v1/model
        else:
            cs.generate(PROMPT, CONTEXT, method=method, max_new_tokens=4)
            assert all(CANARY.encode() not in body for _, body in log.bodies)


def test_private_context_goes_to_the_cloud_only_with_the_loud_flag(served, embedded):
    url, log = served
    cs = device(url, send_private_context_to_cloud=True)
    before = len(log.bodies)
    remote = cs.generate(PROMPT, CONTEXT, method="llm-context", max_new_tokens=8)
    assert remote.token_ids == embedded.generate(PROMPT, CONTEXT, method="llm-context", max_new_tokens=8).token_ids
    assert any(CANARY.encode() in body for _, body in log.bodies[before:])


def test_cli_refuses_llm_context_to_a_remote_cloud_in_one_line(capsys):
    log = RequestLog()
    with app_in_thread(log.install(create_app(NumpyModel(1)))) as url:
        code = main(["generate", "--method", "llm-context", "--cloud", url, "--prompt", PROMPT,
                     "--context-text", CONTEXT])
        err = capsys.readouterr().err
        # the refusal in one line, after --context-text's one-line warning that others can read it
        assert code == 2 and err.count("\n") == 2 and err.splitlines()[0] == INLINE_TEXT_WARNING
        assert "privacy rule" in err.splitlines()[1] and CANARY not in err
        assert log.bodies == []
        for cloud in (f"openai+{url}/v1",):
            assert main(["generate", "--method", "llm-context", "--cloud", cloud, "--prompt", PROMPT]) == 2
        assert log.bodies == []


def test_the_cloud_client_takes_only_a_public_chat(served):
    from costeer.prompts import PrivateChat, PublicChat, build_prompts

    url, _ = served
    cs = device(url)
    cloud = cs.model("llm")
    pair = build_prompts(PROMPT, CONTEXT)
    assert isinstance(pair.public, PublicChat) and isinstance(pair.private, PrivateChat)
    for chat in (pair.private, list(pair.public), [{"role": "user", "content": CONTEXT}]):
        with pytest.raises(PrivacyError):
            cloud.open_session(chat, 4, 4)
    cs.close()


def test_a_server_sending_fewer_values_than_asked_is_treated_as_capped(embedded):
    """No endless re-asking: the device notices the cap and reports uncertified steps."""
    log = RequestLog()
    app = short_changing(create_app(NumpyModel(1, "numpy-cloud")), most=3)
    with app_in_thread(log.install(app)) as url:
        g = device(url, top_k=8).generate(PROMPT, CONTEXT, max_new_tokens=12)
    assert g.new_tokens > 0 and g.traffic["escalations"] == {}
    assert len([p for p, _ in log.bodies if p.endswith("/step")]) <= g.new_tokens + 1


# --- an OpenAI-compatible cloud ------------------------------------------------------

def openai_device(quirks: OpenAIQuirks, **kw):
    log = RequestLog()
    return log, app_in_thread(log.install(openai_app(NumpyModel(1, "numpy-cloud"), quirks)))


def test_openai_cloud_with_token_ids_gives_the_embedded_llm_answer(embedded):
    log, server = openai_device(OpenAIQuirks())
    with server as url:
        cs = device(f"openai+{url}/v1")
        remote = cs.generate(PROMPT, CONTEXT, method="llm", max_new_tokens=16)
        steered = cs.generate(PROMPT, CONTEXT, method="costeer", max_new_tokens=16)
    local = embedded.generate(PROMPT, CONTEXT, method="llm", max_new_tokens=16).token_ids
    # the same tokens, up to a step where the cloud's own choice prints like another id
    # (a byte fragment), so its string maps to no single id and the device cannot take it
    first_difference = next(i for i, (a, b) in enumerate(zip(remote.token_ids + [-1], local)) if a != b)
    assert first_difference > 0 and cs.model("llm").token_for_text(
        NumpyModel(1).token_bytes(local[first_difference]).decode("utf-8", "ignore")) is None
    assert remote.traffic["prompt_as_text"] is False and remote.traffic["unmapped_top_entries"] > 0
    t = steered.traffic
    assert t["escalations"] == {} and 0 <= t["uncertified_steps"] <= t["steps"]
    assert all(CANARY.encode() not in body for _, body in log.bodies)


def test_openai_cloud_that_refuses_token_ids_gets_text_and_drops_ambiguous_strings():
    log, server = openai_device(OpenAIQuirks(accepts_token_ids=False, eos_without_logprobs=True, max_logprobs=40))
    with server as url:
        g = device(f"openai+{url}/v1", max_k=40).generate(PROMPT, CONTEXT, max_new_tokens=16)
    assert g.traffic["prompt_as_text"] is True and g.new_tokens > 0
    assert g.traffic["unmapped_top_entries"] > 0  # byte fragments and b"ab" print alike


@pytest.mark.parametrize("method", ["costeer", "costeer-plausible", "llm"])
def test_openai_cloud_listing_only_unmappable_tokens_is_a_clear_error(method):
    _, server = openai_device(OpenAIQuirks(only_unmappable=True))
    with server as url, pytest.raises(UserError, match="maps to a single token id"):
        device(f"openai+{url}/v1").generate(PROMPT, CONTEXT, method=method, max_new_tokens=4)


# --- vLLM's shapes and llama-server's native route: exact ------------------------------

EXACT_METHODS = ["costeer", "llm", "mix:4", "costeer-plausible", "light", "unsure:3", "bounded:1.5", "ada", "ada:0.6", "auto"]


def engine_server(kind: str):
    cloud = NumpyModel(1, "numpy-cloud")
    if kind == "vllm":
        app, prefix = openai_app(cloud, replace(VLLM_UNCAPPED, tokenize_as=cloud)), "openai+"
    else:
        app, prefix = llama_server_app(cloud), "llama-server+"
    log = RequestLog()
    return log, app_in_thread(log.install(app)), prefix


@pytest.mark.parametrize("kind", ["vllm", "llama-server"])
@pytest.mark.parametrize("method", EXACT_METHODS)
def test_engines_that_name_token_ids_give_the_embedded_answer_with_no_uncertified_step(kind, method, embedded):
    log, server, prefix = engine_server(kind)
    with server as url:
        cs = device(f"{prefix}{url}{'/v1' if kind == 'vllm' else ''}", top_k=1)  # k = 1 forces escalations
        g = cs.generate(PROMPT, CONTEXT, method=method, max_new_tokens=24)
        cs.close()
    assert g.token_ids == embedded.generate(PROMPT, CONTEXT, method=method, max_new_tokens=24).token_ids
    t = g.traffic
    assert t["unmapped_top_entries"] == 0 and t.get("uncertified_steps", 0) == 0 and t["tokenizer_checked"] is True
    assert t["cloud_kind"] == ("openai" if kind == "vllm" else "llama-server") and t["logprobs_cap"] is None
    if method in ("costeer", "mix:4"):
        assert t["escalations"], "k = 1 never settled every step of a steered answer"
    assert all(CANARY.encode() not in body for _, body in log.bodies)


def test_a_vllm_cap_is_learned_from_its_refusal_and_reported():
    cloud = NumpyModel(1, "numpy-cloud")
    with app_in_thread(openai_app(cloud, VLLM_DEFAULT)) as url:
        cs = device(f"openai+{url}/v1", top_k=64)
        g = cs.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=24)
        again = cs.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=24)
    t = g.traffic
    assert t["logprobs_cap"] == 20 and t["entries_by_id"] is True and t["unmapped_top_entries"] == 0
    assert t["round_trips"] >= g.new_tokens + 1  # one refused request, then every step within the cap
    assert again.token_ids == g.token_ids and again.traffic["round_trips"] == g.traffic["round_trips"] - 1


def test_a_cloud_that_tokenizes_differently_is_refused_at_connect():
    other = NumpyModel(1, "other-tokenizer")
    other.tokenize = lambda text: [t for t in NumpyModel(1).tokenize(text)][::-1]  # same ids, other order
    for app, url_of in ((openai_app(NumpyModel(1), replace(VLLM_UNCAPPED, tokenize_as=other)), "openai+{}/v1"),
                        (llama_server_app(NumpyModel(1), tokenize_as=other), "llama-server+{}")):
        with app_in_thread(app) as url, pytest.raises(UserError, match="tokenizes differently"):
            device(url_of.format(url)).generate(PROMPT, CONTEXT, max_new_tokens=2)


def test_lookahead_against_an_engine_is_a_clear_error():
    with pytest.raises(UserError, match="lookahead needs a costeer serve"):
        CoSteer(slm=NumpyModel(2), cloud=CloudConfig("llama-server+http://127.0.0.1:9", lookahead=(2, 2))).generate(
            PROMPT, max_new_tokens=2)


def test_the_cli_says_when_a_capped_server_left_steps_unproven(capsys):
    with app_in_thread(openai_app(NumpyModel(1, "numpy-cloud"), replace(VLLM_DEFAULT, max_logprobs=2))) as url:
        cs = device(f"openai+{url}/v1")
        # sampling from the cloud alone needs its whole distribution: the cap leaves each step unproven
        g = cs.generate(PROMPT, CONTEXT, method="llm", max_new_tokens=8, temperature=1.0, seed=1)
        assert g.traffic["uncertified_steps"] == g.traffic["steps"] > 0
        from costeer.cli import _warn_inexact

        _warn_inexact(g.traffic)
    err = capsys.readouterr().err
    assert f"{g.traffic['uncertified_steps']} of {g.traffic['steps']} steps" in err and "--max-logprobs -1" in err
