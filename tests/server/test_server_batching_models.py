"""The batched server on the default cloud model: 16 devices at once get, bit for bit,
the tokens and logits each gets alone (no cross-talk, no rounding that depends on
the neighbours), and a session in a cache of its own gets the same numbers as one in
a slot of the shared cache."""

from __future__ import annotations

import pytest

from costeer.bench.load import alone, drive
from support.servers import costeer_serve, free_port

pytestmark = pytest.mark.models

PROMPTS = [f"In one sentence, {q}" for q in (
    "why is the sky blue?", "what is a prime number?", "how do bees make honey?", "what is TCP?",
    "why do cats purr?", "what is entropy?", "how does a lock work?", "what is a GGUF file?",
    "why is the sea salty?", "what is a black hole?", "how do vaccines work?", "what is rust (the language)?",
    "why do leaves change colour?", "what is a hash function?", "how do tides work?", "what is jazz?")]
NEW_TOKENS = 6


def test_sixteen_devices_at_once_get_exactly_what_each_gets_alone():
    args = ("--max-sessions", "16", "--batch-slot-tokens", "256", "--max-kv-tokens", "8192")
    with costeer_serve(*args, port=free_port(), threads=2) as url:
        reference = alone(url, PROMPTS, NEW_TOKENS)
        run = drive(url, PROMPTS, NEW_TOKENS)
        assert run.errors == []
        assert run.matches(reference) == [True] * 16
        # too long for a 256-token slot: a llama.cpp context of its own, the same numbers
        private = drive(url, PROMPTS[:2], NEW_TOKENS, reserve_tokens=300)
        assert private.errors == [] and private.matches(reference[:2]) == [True, True]
    assert len({tuple(t.tokens) for t in reference}) > 8  # the prompts lead to different answers
