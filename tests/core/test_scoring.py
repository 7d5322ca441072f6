"""Teacher-forced scoring (scoring.py, `CoSteer.score`): the numbers are the ones the
decoding loop picks from, for every method, and the API refuses what it cannot do."""

from __future__ import annotations

import numpy as np
import pytest

from costeer import CloudConfig, CoSteer, UserError
from costeer.decoding import decode
from costeer.distribution import log_sum_exp
from costeer.methods import make_policy
from costeer.prompts import build_prompts
from costeer.sampling import SamplingConfig, TokenPicker
from costeer.scoring import score_continuations

from support.fakes import NumpyModel

METHODS = ["llm", "llm-context", "costeer", "light", "mix:3", "unsure:4", "bounded:0.5", "ada", "ada:0.2",
           "costeer-plausible", "cos", "slm-context", "fit"]


class RecordingPicker(TokenPicker):
    """Samples as generation does and notes each picked token's log-probability."""

    def __init__(self, config: SamplingConfig) -> None:
        super().__init__(config)
        self.logprobs: list[float] = []

    def pick(self, logprobs: np.ndarray) -> int:
        token = super().pick(logprobs)
        scores = np.asarray(logprobs, dtype=np.float64)
        self.logprobs.append(float(scores[token] - log_sum_exp(scores)))
        return token


def _setup(sharpness: float = 6.0):
    models = {"llm": NumpyModel(1, sharpness=sharpness), "slm": NumpyModel(2, sharpness=sharpness)}
    pair = build_prompts("Tell me about my weekend.", "I climb on Saturdays and sleep on Sundays.", "Be brief.")
    return models, pair


def _prompts(policy, models, pair):
    return [models[s.role].encode_chat(pair.public if s.prompt == "public" else pair.private) for s in policy.streams]


def _score(methods, models, pair, continuations, **options):
    """Each method's scores, with the methods sharing their streams."""
    makers = {m: (lambda m=m: make_policy(m, **options)) for m in methods}
    specs = {spec for make in makers.values() for spec in make().streams}
    prompts = {s: models[s.role].encode_chat(pair.public if s.prompt == "public" else pair.private) for s in specs}
    return score_continuations(makers, models, prompts, continuations)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fusion", ["closed", "loop"])
def test_a_sampled_answer_scores_exactly_as_generation_drew_it(method, fusion):
    models, pair = _setup()
    policy = make_policy(method, fusion=fusion)
    picker = RecordingPicker(SamplingConfig(temperature=1.0, seed=7))
    made = decode(policy, models, _prompts(policy, models, pair), picker, 24)
    assert made.token_ids, "nothing generated"
    [score] = _score([method], models, pair, [made.token_ids], fusion=fusion)[method]
    assert score.logprobs == picker.logprobs[: len(made.token_ids)]  # bit for bit
    assert score.method == policy.name and score.token_ids == made.token_ids


@pytest.mark.parametrize("method", ["llm", "costeer", "mix:3", "ada", "cos"])
def test_a_greedy_answer_is_each_positions_likeliest_token(method):
    models, pair = _setup()
    policy = make_policy(method)
    made = decode(policy, models, _prompts(policy, models, pair), TokenPicker(SamplingConfig()), 20)
    [score] = _score([method], models, pair, [made.token_ids])[method]
    assert score.top_token_ids == made.token_ids
    assert all(lp <= 0 for lp in score.logprobs)
    assert score.total == pytest.approx(sum(score.logprobs)) and score.mean == pytest.approx(score.total / 20)


def test_steering_changes_the_score_and_sharing_prompts_or_methods_changes_nothing():
    models, pair = _setup(sharpness=12.0)
    conts = [list(b"climbing"), list(b"sleep"), list(b"the weekend")]
    methods = ["llm", "costeer", "mix:8", "ada", "llm-context", "cos"]
    together = _score(methods, models, pair, conts)
    for method in methods:
        alone = [_score([method], models, pair, [c])[method][0] for c in conts]
        assert [s.logprobs for s in together[method]] == [s.logprobs for s in alone]
    totals = {m: np.array([s.total for s in together[m]]) for m in methods}
    assert not np.array_equal(totals["costeer"], totals["llm"])
    # the delta is the device model's log-ratio: a heavier weight moves the scores further from the cloud's
    gap = lambda m: np.abs(totals[m] - totals["llm"]).sum()
    assert gap("mix:8") > gap("costeer") > 0


def test_the_api_scores_text_and_refuses_what_it_cannot_do():
    models, _ = _setup()
    cs = CoSteer(models["llm"], models["slm"], context_cache=False)
    one = cs.score("Tell me about my weekend.", "Rest <|im_end|> well", "I sleep on Sundays.", method="costeer")
    assert one.token_ids == list("Rest <|im_end|> well".encode())  # generated text: markup stays text
    many = cs.score("Tell me about my weekend.", ["Rest", "Climb"], "I sleep on Sundays.", method="costeer")
    assert [s.token_ids for s in many] == [list(b"Rest"), list(b"Climb")]
    assert many[0].to_dict()["total"] == many[0].total
    pair = build_prompts("Tell me about my weekend.", "I sleep on Sundays.")
    each = cs.score_from_messages(pair.public, pair.private, ["Rest", "Climb"], ["mix:1.0", "llm"])
    assert list(each) == ["mix:1.0", "llm"] and each["mix:1.0"][0].method == "mix:1"
    assert [s.logprobs for s in each["llm"]] == [s.logprobs for s in cs.score(
        "Tell me about my weekend.", ["Rest", "Climb"], method="llm")]
    with pytest.raises(UserError, match="nothing to score"):
        cs.score("Hi", ["fine", ""], "ctx")
    with pytest.raises(UserError, match="unknown method"):
        cs.score("Hi", "fine", "ctx", method="nope")
    remote = CoSteer(slm=models["slm"], cloud=CloudConfig("http://127.0.0.1:9"), context_cache=False)
    with pytest.raises(UserError, match="on this machine"):
        remote.score("Hi", "fine", "ctx", method="costeer")
