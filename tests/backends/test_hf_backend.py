"""The transformers backend on tiny Qwen2 models built here from a config with random
weights and a tokenizer trained on the spot: no download, real forward passes."""

from __future__ import annotations

import numpy as np
import pytest

from costeer import CoSteer, UserError
from costeer.backends import load_model, same_tokenizer
from costeer.fusion import log_softmax
from support.tiny_hf import TORCH_IN_PROCESS, make_model_folder, make_tokenizer

pytestmark = TORCH_IN_PROCESS


def test_backend_loads_a_folder_and_reports_its_vocabulary(tiny_hf_pair):
    model = load_model(tiny_hf_pair[0])
    assert type(model).__name__ == "TransformersModel"
    ids = model.tokenize(model.render_chat([{"role": "user", "content": "I love skiing."}]))
    assert model.detokenize(ids).startswith("<|im_start|>user\nI love skiing.<|im_end|>")
    assert model.eos_token_ids == {model.tokenize("<|im_end|>")[0]}


def test_costeer_on_hf_models_and_loop_equals_closed_form(tiny_hf_pair):
    cs = CoSteer(*tiny_hf_pair, quiet=True)
    closed = cs.generate("Write a note.", "I live in Tromsø.", max_new_tokens=12, fusion="closed")
    loop = cs.generate("Write a note.", "I live in Tromsø.", max_new_tokens=12, fusion="loop")
    assert closed.token_ids == loop.token_ids and closed.new_tokens >= 1
    assert closed.prompt_tokens.keys() == {"llm_public", "slm_private", "slm_public"}


def test_fused_step_is_the_closed_form_of_the_three_streams(tiny_hf_pair):
    """One decoding step by hand: B + c*delta over the real logits picks the token CoSteer picks."""
    cs = CoSteer(*tiny_hf_pair, quiet=True)
    g = cs.generate("Write a note.", "I love reindeer stew.", max_new_tokens=1)
    llm, slm = cs.model("llm"), cs.model("slm")
    public = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Write a note."}]
    private = [public[0], {"role": "user", "content": "Write a note.\n\nFor reference, here is some information about me:\n\nI love reindeer stew."}]
    with llm.open_streams([llm.tokenize(llm.render_chat(public))], 1) as cloud, slm.open_streams(
        [slm.tokenize(slm.render_chat(private)), slm.tokenize(slm.render_chat(public))], 1
    ) as device:
        base = log_softmax(cloud.logits()[0])
        delta = log_softmax(device.logits()[0]) - log_softmax(device.logits()[1])
        expected = int(np.argmax(base + g.steering_coefficient * delta))
    first = g.token_ids[0] if g.token_ids else None
    assert first == expected or (first is None and expected in llm.eos_token_ids)


def test_different_tokenizers_steer_on_the_tokens_they_share(tmp_path, tiny_hf_pair):
    other = make_model_folder(tmp_path / "other", make_tokenizer(280), seed=3)
    llm, device = load_model(tiny_hf_pair[0]), load_model(other)
    assert not same_tokenizer(llm, device)
    cs = CoSteer(llm, device, quiet=True, context_cache=False)
    g = cs.generate("Write a note.", "I live in Oslo.", max_new_tokens=12)
    assert g.text == llm.detokenize(g.token_ids)  # the cloud's tokens
    assert g.alignment["shared_vocabulary"] >= 259  # the bytes and specials' texts aside, most merges agree
    assert g.alignment["steps"] == g.new_tokens - (g.finish_reason != "eos")



def test_same_size_but_different_token_strings_are_not_taken_for_one_tokenizer(tmp_path):
    # 259 bytes and specials + 11 merges: both corpora have far more than 11 pairs to merge
    first = make_model_folder(tmp_path / "a", make_tokenizer(270), seed=5)
    other_corpus = ["Completely different words: zebra xylophone quantum marmalade."] * 50
    second = make_model_folder(tmp_path / "b", make_tokenizer(270, other_corpus), seed=6)
    a, b = load_model(first), load_model(second)
    assert a.vocab_size == b.vocab_size == 270
    assert not same_tokenizer(a, b)  # same size, other strings: aligned by text, not by id
    g = CoSteer(a, b, quiet=True, context_cache=False).generate("Write a note.", "I like zebras.", max_new_tokens=8)
    assert g.alignment is not None and g.text == a.detokenize(g.token_ids)


def test_context_longer_than_the_window_is_cut_not_crashed(tiny_hf_pair, library_stderr):
    cs = CoSteer(*tiny_hf_pair, quiet=True)  # window: 256 tokens
    long_context = "I love ice sculpting and skiing in the mountains. " * 100
    g = cs.generate("Write a note.", long_context, max_new_tokens=8)
    assert g.context_truncated and g.prompt_tokens["slm_private"] + 8 <= 256
    assert "private context cut" in library_stderr()
    with pytest.raises(UserError, match="no room for the context"):
        cs.generate("Write a note.", long_context, max_new_tokens=250)


def test_explain_marks_the_picks_steering_changed(tiny_hf_pair):
    """tests/core/test_explain.py checks the records' values on the NumPy models, which
    forget the context within a few tokens (steering ~1e-6 nats); this pair's attention does not."""
    cs = CoSteer(*tiny_hf_pair, quiet=True)
    g = cs.generate("Write a note.", "I live in Tromso and I love skiing.", method="mix:4", max_new_tokens=16,
                    explain=True)
    alone = cs.generate("Write a note.", "I live in Tromso and I love skiing.", method="llm", max_new_tokens=1)
    assert g.token_ids == cs.generate("Write a note.", "I live in Tromso and I love skiing.", method="mix:4",
                                      max_new_tokens=16).token_ids
    assert g.steps[0].cloud_token_id == alone.token_ids[0]  # the cloud's own pick, as the cloud alone makes it
    changed = [s for s in g.steps if s.changed]
    assert changed and len(changed) < len(g.steps)
    for step in changed:  # steering made a token the cloud ranked lower the fused favourite
        assert step.token_cloud_probability < step.cloud_probability and step.fused_probability > 0
    cs.close()
