"""Teacher-forced scoring: how likely a given continuation is under a method's
next-token distribution, the very one the decoding loop picks from (at temperature 1).

Each position goes through the method's policy as a decoding step would (`decide`,
then `chose` with the given token), so `llm`, `costeer`, every lever and
`llm-context` are scored by the code that generates with them. Stepwise (the
default) the numbers are bit for bit what generation computes; `batched` feeds a
continuation's positions to each model in few passes, which llama.cpp rounds
otherwise (differences of the order of 1e-3 nats per token).

Scores need every position's whole distribution, so they run embedded: from a remote
cloud they would cost its full vector (600 KB at 152k tokens) for every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .backends.base import StreamGroup, StreamSource
from .certified import Pick
from .distribution import NextToken, log_sum_exp
from .errors import UserError
from .fusion import FUSION_DTYPE
from .methods import Policy, Role, StreamSpec
from .sampling import SamplingConfig

_AS_IS = SamplingConfig()  # temperature 0: decide() returns the distribution untempered, whole


@dataclass
class Score:
    """A continuation's log-likelihood under one method, token by token."""

    method: str
    token_ids: list[int]
    logprobs: list[float]  # natural log of each token's probability, given the ones before
    top_token_ids: list[int]  # each position's likeliest token: where they differ, the method would not have said it

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        """Per token: the length normalisation `costeer eval` picks options with."""
        return self.total / len(self.logprobs)

    def to_dict(self) -> dict:
        return {"method": self.method, "total": self.total, "mean": self.mean, "token_ids": self.token_ids,
                "logprobs": self.logprobs, "top_token_ids": self.top_token_ids}


def score_continuations(
    policies: dict[str, Callable[[], Policy]],
    models: dict[Role, StreamSource],
    prompts: dict[StreamSpec, Sequence],
    continuations: Sequence[Sequence[int]],
    batched: bool = False,
) -> dict[str, list[Score]]:
    """Score each continuation after the prompts, under each policy (by the name given).
    `prompts[spec]` is the prompt of each stream the policies read (as for `decode`). They share their
    streams: each (model, prompt) is run once for all of them, and each continuation gets
    fresh policies (levers keep state across steps); the prompts are prefilled once where
    every model's group can restart."""
    if any(m.remote for m in models.values()):
        raise UserError("scoring runs with the cloud model on this machine: from a remote cloud it would need "
                        "the cloud's full distribution at every position (about 600 KB a token)")
    if not continuations or any(len(c) == 0 for c in continuations):
        raise UserError("nothing to score: give at least one non-empty continuation")
    specs = list(prompts)  # every stream some policy reads
    by_role = {role: [s for s in specs if s.role == role] for role in dict.fromkeys(s.role for s in specs)}
    where = {spec: (spec.role, by_role[spec.role].index(spec)) for spec in specs}
    longest = max(len(c) for c in continuations)
    groups: dict[Role, StreamGroup] = {}

    def open_all() -> None:
        for role, role_specs in by_role.items():
            groups[role] = models[role].open_for_decoding([prompts[s] for s in role_specs], longest, first_k=None,
                                                          private=[s.prompt == "private" for s in role_specs])

    scores: dict[str, list[Score]] = {name: [] for name in policies}
    try:
        open_all()
        for n, tokens in enumerate(continuations):
            if n and all(g.restarts for g in groups.values()):
                for g in groups.values():
                    g.restart()
            elif n:
                _close(groups)
                open_all()
            fresh = {name: make() for name, make in policies.items()}
            for policy in fresh.values():
                policy.started([groups[s.role].prompt_lengths[where[s][1]] for s in policy.streams])
            made = _score_one(fresh, groups, where, list(tokens), batched)
            for name, score in made.items():
                scores[name].append(score)
    finally:
        _close(groups)
    return scores


def _score_one(policies: dict[str, Policy], groups: dict[Role, StreamGroup], where: dict[StreamSpec, tuple[Role, int]],
               tokens: list[int], batched: bool) -> dict[str, Score]:
    along = {role: g.logits_along(tokens, batched) for role, g in groups.items()}
    logprobs: dict[str, list[float]] = {name: [] for name in policies}
    tops: dict[str, list[int]] = {name: [] for name in policies}
    for token in tokens:
        rows = {role: next(it) for role, it in along.items()}
        dists = {spec: NextToken.local(rows[role][j]) for spec, (role, j) in where.items()}
        for name, policy in policies.items():
            decision = policy.decide([dists[spec] for spec in policy.streams], _AS_IS)
            assert isinstance(decision, Pick)  # every distribution is whole: nothing to ask for
            scores = np.asarray(decision.scores, dtype=FUSION_DTYPE)
            logprobs[name].append(float(scores[token] - log_sum_exp(scores)))
            tops[name].append(int(scores.argmax()))
            policy.chose(token)
    return {name: Score(policy.name, tokens, logprobs[name], tops[name]) for name, policy in policies.items()}


def _close(groups: dict[Role, StreamGroup]) -> None:
    for g in groups.values():
        g.close()
    groups.clear()
