"""Scoring on the real default models: stepwise scores are generation's numbers, prompts
shared across answers change nothing, batches stay aligned, and `costeer score` runs."""

from __future__ import annotations

import pytest

from support.commands import costeer
from support.example_profile import BIRTHDAY_PROMPT, EXAMPLE_PROFILE

pytestmark = pytest.mark.models

LOCAL = "Join me in Tromsø for ice sculpting and reindeer stew!"
GENERIC = "Please come to my party on Saturday."


def test_a_greedy_answer_scores_as_its_own_argmax_and_shared_prompts_change_nothing(default_costeer):
    context = EXAMPLE_PROFILE.read_text()
    g = default_costeer.generate(BIRTHDAY_PROMPT, context, method="costeer", max_new_tokens=12)
    answers = [g.text, LOCAL, GENERIC]
    together = default_costeer.score(BIRTHDAY_PROMPT, answers, context, method="costeer")
    assert together[0].token_ids == g.token_ids and together[0].top_token_ids == g.token_ids
    for text, score in zip(answers[1:], together[1:]):
        assert default_costeer.score(BIRTHDAY_PROMPT, text, context, method="costeer").logprobs == score.logprobs
    batched = default_costeer.score(BIRTHDAY_PROMPT, answers, context, method="costeer", batched=True)
    for exact, fast in zip(together, batched):
        # llama.cpp rounds a batch otherwise (up to ~0.5 nats on a token, measured); a row
        # out of step would be off by several nats
        assert max(abs(a - b) for a, b in zip(exact.logprobs, fast.logprobs)) < 1.5
        assert abs(exact.mean - fast.mean) < 0.3


def test_the_command_ranks_the_answer_that_fits_the_profile_first_under_costeer():
    done = costeer("score", "--prompt", BIRTHDAY_PROMPT, "--context", str(EXAMPLE_PROFILE), "--answer", LOCAL,
                   "--answer", GENERIC, "--methods", "llm,costeer,llm-context")
    assert done.returncode == 0, done.stderr
    header, first, second = done.stdout.splitlines()
    assert header.split() == ["answer", "tokens", "llm", "costeer", "llm-context"]
    # the cloud alone prefers the generic invitation; the profile makes the local one likelier
    assert first.split()[3].endswith("*") and first.split()[4].endswith("*") and second.split()[2].endswith("*")
    assert "mean log-probability per token" in done.stderr
