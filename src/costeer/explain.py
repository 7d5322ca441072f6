"""Per-token explanation of a generation (`explain=True`, `--explain`): for every token,
what the cloud alone would have picked and how sure it was, the fused probability of the
token picked, the steering term at it, and whether steering changed the pick.

Built only from what the device holds at each step: the cloud's distribution as it
arrived (the full vector embedded, a top-k with its log-sum-exp in split mode), the
device's two full distributions, and the scores the pick was made from. The cloud's
own choice and probabilities are exact either way (a top-k lists the likeliest first and
its log-sum-exp normalises them, and a certified pick is always inside the top-k). The
fused probability is exact when the step had the full vector; from a top-k it is the
token's share of the fused mass of the tokens received, an upper bound (`exact` says which).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .distribution import NextToken
from .fusion import log_softmax
from .methods import Policy, StreamSpec

CLOUD = StreamSpec("llm", "public")


@dataclass(frozen=True)
class TokenStep:
    token_id: int
    text: str  # the token's bytes as text (a piece of a character shows as U+FFFD)
    cloud_token_id: int | None  # the cloud's own likeliest token (None: the method reads no public cloud)
    cloud_text: str | None
    cloud_probability: float | None  # its probability under the cloud alone
    token_cloud_probability: float | None  # the picked token's probability under the cloud alone
    fused_probability: float  # the picked token's probability in the distribution it was picked from
    steering: float | None  # the steering term at the picked token, in nats (c * delta for costeer)
    changed: bool  # steering picked another token than the cloud alone would have
    exact: bool  # every distribution was complete (fused_probability is exact, not a bound)

    def to_dict(self) -> dict:
        return asdict(self)


def explain_step(policy: Policy, dists: list[NextToken], scores: np.ndarray, token: int,
                 spell: Callable[[int], bytes]) -> TokenStep:
    """The record of one step: `dists` as the policy last saw them, `scores` the pick's,
    `spell` the bytes of a token of the picked vocabulary."""
    cloud = dists[policy.streams.index(CLOUD)] if CLOUD in policy.streams else None
    cloud_token = cloud_p = token_cloud_p = None
    if cloud is not None and cloud.known:
        cloud_token = int(cloud.top(1)[0][0])
        cloud_p = math.exp(cloud.top_logprob())
        logprob = cloud.logprob(token)
        token_cloud_p = None if logprob is None else math.exp(logprob)
    fused = float(np.exp(log_softmax(np.asarray(scores, dtype=np.float64))[token]))
    steering = policy.steering_at(dists, token)
    return TokenStep(
        token_id=token,
        text=spell(token).decode("utf-8", errors="replace"),
        cloud_token_id=cloud_token,
        cloud_text=None if cloud_token is None else spell(cloud_token).decode("utf-8", errors="replace"),
        cloud_probability=cloud_p,
        token_cloud_probability=token_cloud_p,
        fused_probability=fused,
        steering=steering,
        changed=cloud_token is not None and cloud_token != token,
        # only a remote cloud sends part of a distribution; reading the device's streams
        # here would make a paused device (ada) run
        exact=all(dists[i].complete for i, spec in enumerate(policy.streams) if spec.role == "llm"),
    )
