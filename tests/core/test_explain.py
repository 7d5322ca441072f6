"""`explain=True`: per-token records of what the cloud alone would have picked, the fused
probability and the steering term, checked against a from-scratch computation on the
seeded NumPy models, and the same records over real HTTP from what a top-k holds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from costeer.cli import build_parser
from costeer.fusion import local_delta, log_softmax
from costeer.prompts import PAPER_SYSTEM_PROMPT, build_prompts
from support.split_fixtures import CONTEXT, PROMPT, device, embedded, served  # noqa: F401  (fixtures)


def _reference(cs, tokens: list[int], weight: float) -> list[dict]:
    """Each step of a mix:W answer from full vectors: the cloud's pick, c * delta, fused p."""
    pair = build_prompts(PROMPT, CONTEXT, PAPER_SYSTEM_PROMPT)
    llm, slm = cs.model("llm"), cs.model("slm")
    cloud_prompt, with_prompt, without_prompt = (llm.encode_chat(pair.public), slm.encode_chat(pair.private),
                                                 slm.encode_chat(pair.public))
    steps = []
    for i, token in enumerate(tokens):
        base = log_softmax(llm.logits_after([*cloud_prompt, *tokens[:i]])).astype(np.float64)
        delta = local_delta(slm.logits_after([*with_prompt, *tokens[:i]]), slm.logits_after([*without_prompt, *tokens[:i]]))
        fused = log_softmax(base + weight * delta)
        steps.append({"cloud_token_id": int(np.argmax(base)), "cloud_probability": float(np.exp(base.max())),
                      "token_cloud_probability": float(np.exp(base[token])), "steering": float(weight * delta[token]),
                      "fused_probability": float(np.exp(fused[token]))})
    return steps


def test_explain_records_every_pick_as_computed_from_scratch_and_changes_no_token(embedded):
    plain = embedded.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=20)
    g = embedded.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=20, explain=True)
    assert plain.steps is None and "steps" not in plain.to_dict()  # off: nothing recorded, the same fields
    assert g.token_ids == plain.token_ids and len(g.steps) == len(g.token_ids) + (g.finish_reason == "eos")
    for step, expected in zip(g.steps, _reference(embedded, g.token_ids, 4.0)):
        assert step.exact
        assert step.cloud_token_id == expected["cloud_token_id"]
        for key in ("cloud_probability", "token_cloud_probability", "steering", "fused_probability"):
            assert getattr(step, key) == pytest.approx(expected[key], rel=1e-4, abs=1e-9), key
        assert step.changed == (step.cloud_token_id != step.token_id)
    assert [s.token_id for s in g.steps[: len(g.token_ids)]] == g.token_ids
    assert "".join(s.text for s in g.steps[: len(g.token_ids)]) == g.text
    assert json.loads(json.dumps(g.to_dict()))["steps"][0]["token_id"] == g.token_ids[0]


def test_the_cloud_alone_is_never_changed_and_steers_nothing(embedded):
    g = embedded.generate(PROMPT, CONTEXT, method="llm", max_new_tokens=12, explain=True)
    assert g.steps and all(not s.changed and s.steering is None for s in g.steps)
    assert all(s.fused_probability == pytest.approx(s.token_cloud_probability, rel=1e-5) for s in g.steps)
    device_only = embedded.generate(PROMPT, CONTEXT, method="slm-context", max_new_tokens=6, explain=True)
    assert all(s.cloud_token_id is None and not s.changed for s in device_only.steps)


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.8, top_k=20, seed=3)])
def test_split_mode_explains_from_the_top_k_what_embedded_explains_from_full_vectors(served, embedded, sampling):
    url, _ = served
    local = embedded.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=20, explain=True, **sampling)
    cs = device(url, top_k=4)
    remote = cs.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=20, explain=True, **sampling)
    cs.close()
    assert remote.token_ids == local.token_ids
    for far, near in zip(remote.steps, local.steps, strict=True):
        assert (far.token_id, far.cloud_token_id, far.changed) == (near.token_id, near.cloud_token_id, near.changed)
        assert far.cloud_probability == pytest.approx(near.cloud_probability, rel=1e-5)
        assert far.token_cloud_probability == pytest.approx(near.token_cloud_probability, rel=1e-5)
        assert far.steering == pytest.approx(near.steering, rel=1e-5)
        # from a top-k: the token's share of the fused mass received, never below the truth
        assert far.fused_probability >= near.fused_probability * (1 - 1e-5)
    assert not all(s.exact for s in remote.steps)


def test_the_cli_takes_explain():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--explain", "--json"])
    assert args.explain is True



def test_explaining_ada_leaves_its_device_paused():
    """Records of paused steps read only the cloud: the device still skips its passes."""
    from costeer import CoSteer
    from support.fakes import NumpyModel

    runs = {}
    for explain in (False, True):
        cs = CoSteer(llm=NumpyModel(1), slm=NumpyModel(2, sharpness=1.0), context_cache=False)
        g = cs.generate(PROMPT, "My name is Ingrid and I live in Tromso.", method="ada:0.3", max_new_tokens=40,
                        explain=explain)
        runs[explain] = (g, cs.model("slm").forward_passes)
    (plain, passes), (explained, explained_passes) = runs[False], runs[True]
    assert explained.token_ids == plain.token_ids and explained_passes == passes
    assert 0 < explained.paused_steps == plain.paused_steps
    assert sum(s.steering == 0.0 for s in explained.steps) >= explained.paused_steps
