"""Integration tests on the real default models (Qwen2.5-Coder 1.5B cloud, 0.5B device)."""

from __future__ import annotations

import pytest

from costeer import SteeringParams, UserError
from costeer.backends import same_tokenizer
from costeer.default_models import DEFAULT_LLM, DEFAULT_SLM, ensure_model
from support.example_profile import BIRTHDAY_PROMPT, facts_in

pytestmark = pytest.mark.models


def test_default_models_are_assembled_and_verified():
    for model in (DEFAULT_LLM, DEFAULT_SLM):
        path = ensure_model(model, quiet=True)
        assert path.stat().st_size == model.size
        assert not list(path.parent.glob(path.name + ".*.partial"))


def test_default_pair_shares_a_tokenizer(default_costeer):
    llm, slm = default_costeer.model("llm"), default_costeer.model("slm")
    assert same_tokenizer(llm, slm)
    assert llm.vocab_size == 151_936
    assert 151645 in llm.eos_token_ids  # <|im_end|>


def test_chat_template_is_the_models_own(default_costeer):
    llm = default_costeer.model("llm")
    text = llm.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenize(text)
    assert ids[0] == 151644 and ids.count(151645) == 2  # special tokens parsed, not spelled out


def test_costeer_uses_private_facts_and_the_cloud_alone_does_not(default_costeer, profile_text):
    steered = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, method="costeer", max_new_tokens=80)
    alone = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, method="llm", max_new_tokens=80)
    assert len(facts_in(steered.text)) >= 2, steered.text
    assert facts_in(alone.text) == [], alone.text
    assert alone.prompt_tokens == {"llm_public": alone.prompt_tokens["llm_public"]}  # no private stream at all
    assert steered.prompt_tokens["slm_private"] > steered.prompt_tokens["slm_public"] + 100


def test_loop_and_closed_form_give_the_same_greedy_tokens(default_costeer, profile_text):
    kwargs = dict(method="costeer", max_new_tokens=40)
    closed = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, fusion="closed", **kwargs)
    loop = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, fusion="loop", **kwargs)
    assert closed.token_ids == loop.token_ids
    assert closed.steering_coefficient == pytest.approx(1.783257, abs=1e-6)


def test_light_and_non_default_hyperparameters_change_the_steering(default_costeer, profile_text):
    light = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, method="light", max_new_tokens=8)
    assert light.steering_coefficient == pytest.approx(0.476190, abs=1e-6)
    strong = default_costeer.generate(
        BIRTHDAY_PROMPT, profile_text, max_new_tokens=8, params=SteeringParams(5, 0.5, 3, 1, 0.3)
    )
    assert strong.steering_coefficient == pytest.approx(3.502684, abs=1e-6)


def test_greedy_is_deterministic_and_streaming_shows_the_same_text(default_costeer, profile_text):
    chunks: list[str] = []
    first = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, max_new_tokens=24, on_text=chunks.append)
    second = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, max_new_tokens=24)
    assert first.token_ids == second.token_ids
    assert "".join(chunks) == first.text and len(chunks) > 3


def test_sampling_is_reproducible_with_a_seed(default_costeer, profile_text):
    run = lambda seed: default_costeer.generate(
        "Tell me a story.", profile_text, max_new_tokens=20, temperature=1.2, top_p=0.95, top_k=50, seed=seed
    ).token_ids
    assert run(11) == run(11)
    assert run(11) != run(12)


def test_stop_strings_end_generation_and_are_not_shown(default_costeer):
    g = default_costeer.generate("List the numbers from 1 to 20, separated by commas.", method="llm",
                                 max_new_tokens=60, stop=["7"])
    assert g.finish_reason == "stop"
    assert "7" not in g.text and "6" in g.text


def test_max_new_tokens_is_respected(default_costeer):
    g = default_costeer.generate("Write a long essay about rivers.", method="slm", max_new_tokens=5)
    assert g.new_tokens == 5 and g.finish_reason == "length"


@pytest.mark.parametrize("method, streams", [
    ("llm-context", {"llm_private"}),
    ("slm-context", {"slm_private"}),
    ("slm", {"slm_public"}),
])
def test_baseline_methods_use_the_prompts_they_claim(default_costeer, profile_text, method, streams):
    g = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, method=method, max_new_tokens=4)
    assert g.method == method and set(g.prompt_tokens) == streams and g.new_tokens >= 1


def test_long_context_is_cut_to_the_cap_with_a_warning(default_costeer, profile_text, library_stderr):
    g = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, max_new_tokens=4, max_context_tokens=20)
    assert g.context_truncated
    err = library_stderr()
    assert "cut to its first 20" in err and "Thaddeus" not in err  # never quotes the private text
    full = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, max_new_tokens=4)
    assert g.prompt_tokens["slm_private"] < full.prompt_tokens["slm_private"] - 50


def test_unknown_method_is_a_user_error(default_costeer):
    with pytest.raises(UserError, match="unknown method"):
        default_costeer.generate("hi", method="magic")
