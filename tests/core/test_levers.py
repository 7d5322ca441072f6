"""The personalization levers of issue 12 as policies over the one loop, each checked
against a from-scratch reference decoder on the fake models (no stream, cache or policy
of costeer's: the fake network folded over the whole prefix), embedded and in split
mode: `unsure:W` (weight by the cloud's doubt), `bounded:B` (clipped delta) and `ada`
(two-way AdaCoSteer, which skips the device while paused and catches it up in one batch)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from costeer import CoSteer
from costeer.errors import UserError
from costeer.fusion import SteeringParams, local_delta, log_softmax
from costeer.methods import jensen_shannon, make_policy
from costeer.prompts import PAPER_SYSTEM_PROMPT, build_prompts
from support.fakes import HIDDEN, NumpyModel

PROMPT = "Write a note for my friend."
CONTEXTS = ["My name is Ingrid and I live in Tromso.", "I love the sea; call me Sven.", "ab" * 20]
C = SteeringParams().coefficient


def reference(method: str, context: str, n: int, counts: dict | None = None) -> list[int]:
    """Greedy tokens of `method`, each step from the logits after the whole prefix: the fake
    network's state folded over the prompt, then a token at a time, exactly as logits_after
    folds it from scratch (the same arithmetic in the same order: the same numbers, checked
    at the end) without refolding the prefix at every step. `counts`, for ada: paused steps
    and resumes after a pause."""
    counts = {} if counts is None else counts
    counts.update(paused=0, resumed=0)
    llm, slm = NumpyModel(1), NumpyModel(2, sharpness=1.0)
    pair = build_prompts(PROMPT, context, PAPER_SYSTEM_PROMPT)
    cloud_p, with_p, without_p = llm.encode_chat(pair.public), slm.encode_chat(pair.private), slm.encode_chat(pair.public)
    streams = [(llm, cloud_p), (slm, with_p), (slm, without_p)]
    states = [functools.reduce(model.step_state, prompt, np.zeros(HIDDEN, dtype=np.float32)) for model, prompt in streams]
    name, _, value = method.partition(":")
    tokens: list[int] = []
    streak = 0
    for _ in range(n):
        z, zw, zwo = (model.state_logits(state).astype(np.float64) for (model, _), state in zip(streams, states))
        p_max = float(np.exp(log_softmax(z).max()))
        if name == "unsure":
            scores = z + float(value) * (1 - p_max) * (zw - zwo)
        elif name == "bounded":
            scores = z + np.clip(C * local_delta(zw, zwo), -float(value), float(value))
        elif name == "fit":
            n = len(with_p) - len(without_p)  # the context's device tokens
            w = 3.0 if n <= 64 else 1.0 if n >= 512 else 3.0 * (1 / 3) ** (np.log(n / 64) / np.log(8))
            scores = z + w * (zw - zwo)
        elif name == "specsteer":  # SpecSteer's test, written out: p_LLM(d) > 0.5 * exp(-JSD) * p_without(d)
            lw, lwo = log_softmax(zw), log_softmax(zwo)
            draft = int(np.argmax(lw))
            m = 0.5 * (np.exp(lw) + np.exp(lwo))
            jsd = 0.5 * np.sum(np.exp(lw) * (lw - np.log(m))) + 0.5 * np.sum(np.exp(lwo) * (lwo - np.log(m)))
            accepted = log_softmax(z)[draft] > np.log(0.5) - jsd + lwo[draft]
            counts["accepted"] = counts.get("accepted", 0) + accepted
            scores = np.where(np.arange(len(z)) == draft, 0.0, -np.inf) if accepted else z + 1.0 * (zw - zwo)
        elif name == "ada":
            confident = p_max >= float(value or 0.9)
            scores = z if streak >= 3 and confident else z + C * (zw - zwo)
            counts["paused"] += streak >= 3 and confident
            counts["resumed"] += streak >= 3 and not confident
            streak = streak + 1 if confident else 0
        token = int(np.argmax(scores))
        if token in llm.eos_token_ids:
            break
        tokens.append(token)
        states = [model.step_state(state, token) for (model, _), state in zip(streams, states)]
    for (model, prompt), state in zip(streams, states):
        assert np.array_equal(model.state_logits(state), model.logits_after(prompt + tokens))
    return tokens


def pair() -> CoSteer:
    return CoSteer(llm=NumpyModel(1), slm=NumpyModel(2, sharpness=1.0), context_cache=False)


@pytest.mark.parametrize("method", ["unsure:3", "unsure:40", "bounded:0.5", "bounded:3", "ada", "ada:0.5", "ada:0.99",
                                    "fit", "specsteer"])
@pytest.mark.parametrize("context", CONTEXTS + ["x " * 150, "long profile line. " * 120])
def test_each_lever_equals_its_reference(method, context):
    g = pair().generate(PROMPT, context, method=method, max_new_tokens=24)
    assert g.token_ids == reference(method, context, 24)


def test_specsteer_takes_the_device_draft_where_the_cloud_agrees_and_recovers_elsewhere():
    """Both branches of SpecSteer's rule happen on the fakes, and a rejected step is
    mix:1's pick (beta = 1)."""
    counts: dict = {}
    tokens = reference("specsteer", CONTEXTS[0], 40, counts)
    assert 0 < counts["accepted"] < len(tokens)
    assert pair().generate(PROMPT, CONTEXTS[0], method="specsteer", max_new_tokens=40).token_ids == tokens
    assert tokens != pair().generate(PROMPT, CONTEXTS[0], method="mix:1", max_new_tokens=40).token_ids


@given(st.lists(st.floats(-30, 30), min_size=2, max_size=40), st.data())
def test_jensen_shannon_is_a_bounded_symmetric_divergence(logits, data):
    other = data.draw(st.lists(st.floats(-30, 30), min_size=len(logits), max_size=len(logits)))
    p, q = log_softmax(np.array(logits)), log_softmax(np.array(other))
    d = jensen_shannon(p, q)
    assert 0 <= d <= np.log(2) + 1e-9
    assert d == pytest.approx(jensen_shannon(q, p), abs=1e-12)
    assert jensen_shannon(p, p) == pytest.approx(0.0, abs=1e-12)


def test_ada_pauses_and_resumes_and_skips_device_passes():
    """With a threshold the sharp fake cloud often meets, steering pauses; it resumes
    where the cloud hesitates (two-way), and the device runs fewer forward passes."""
    runs = {}
    for method in ("costeer", "ada:0.3"):
        cs = pair()
        device = cs.model("slm")
        g = cs.generate(PROMPT, CONTEXTS[0], method=method, max_new_tokens=40)
        runs[method] = (g, device.forward_passes)
    ada, passes = runs["ada:0.3"]
    counts: dict = {}
    assert ada.token_ids == reference("ada:0.3", CONTEXTS[0], 40, counts)
    assert 0 < ada.paused_steps == counts["paused"] < ada.new_tokens
    assert counts["resumed"] > 0  # two-way: steered again after a pause (one-way never is)
    assert passes < runs["costeer"][1] - ada.paused_steps // 2  # paused tokens caught up in batches


def test_levers_refuse_meaningless_parameters():
    for bad in ("bounded:0", "bounded:-1", "ada:1", "ada:0", "ada:1.5"):
        with pytest.raises(UserError):
            make_policy(bad)


def test_auto_is_the_method_chosen_on_dev_under_its_own_name():
    from costeer.methods import AUTO_METHOD

    cs = pair()
    auto = cs.generate(PROMPT, CONTEXTS[0], method="auto", max_new_tokens=24)
    chosen = cs.generate(PROMPT, CONTEXTS[0], method=AUTO_METHOD, max_new_tokens=24)
    assert auto.method == "auto" and auto.token_ids == chosen.token_ids
    assert auto.steering_coefficient == chosen.steering_coefficient


def test_fit_is_strong_on_a_stated_preference_and_gentle_on_a_long_profile():
    from costeer.methods import fitted_weight

    weights = {n: fitted_weight(n) for n in (1, 20, 64, 100, 181, 300, 512, 5000)}
    assert weights[1] == weights[20] == weights[64] == 3.0 and weights[512] == weights[5000] == 1.0
    assert 3.0 > weights[100] > weights[181] > weights[300] > 1.0
    assert weights[181] == pytest.approx(3 ** 0.5, rel=0.01)  # log-linear: halfway in log length, sqrt(3)
    cs = pair()
    short = cs.generate(PROMPT, "owls", method="fit", max_new_tokens=4)
    long = cs.generate(PROMPT, "I like owls. " * 200, method="fit", max_new_tokens=4)
    # the context's length as the device knows it: its two prompts' difference (framing included)
    added = short.prompt_tokens["slm_private"] - short.prompt_tokens["slm_public"]
    assert short.steering_coefficient == fitted_weight(added) > 2.5 and long.steering_coefficient == 1.0


def test_fit_w_sets_the_long_profiles_weight_and_keeps_the_short_one():
    from costeer.methods import fitted_weight

    assert fitted_weight(5000, 0.5) == 0.5 and fitted_weight(20, 0.5) == 3.0
    assert fitted_weight(181, 0.5) == pytest.approx((3 * 0.5) ** 0.5, rel=0.01)  # log-linear in between
    cs = pair()
    long = cs.generate(PROMPT, "I like owls. " * 200, method="fit:0.5", max_new_tokens=4)
    short = cs.generate(PROMPT, "owls", method="fit:0.5", max_new_tokens=4)
    assert long.method == "fit:0.5" and long.steering_coefficient == 0.5
    assert short.token_ids == cs.generate(PROMPT, "owls", method="fit", max_new_tokens=4).token_ids
    for bad in ("fit:0", "fit:-1", "fit:x"):
        with pytest.raises(UserError, match="fit"):
            cs.generate(PROMPT, "owls", method=bad, max_new_tokens=4)
