"""Decoding methods as policies over the one decoding loop.

A policy names the streams it needs (which model, which prompt) and turns their
next-token logits into the log-distribution the token is picked from. The loop in
`decoding.py` does everything else, identically for every method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from .errors import UserError
from .certified import CertificationStats, fuse_with_partial_cloud
from .distribution import NextToken
from .fusion import FUSION_DTYPE, SteeringParams, fuse_ftrl_loop, local_delta, log_softmax

Role = Literal["llm", "slm"]  # cloud model, device model
PromptKind = Literal["public", "private"]  # without / with the private context
Fusion = Literal["closed", "loop"]

# First top-k a remote cloud is asked for (see certified.py and the README's traffic table).
DEFAULT_TOP_K = 64


@dataclass(frozen=True)
class StreamSpec:
    role: Role
    prompt: PromptKind


class Policy(ABC):
    name: str
    streams: tuple[StreamSpec, ...]

    @abstractmethod
    def next_logprobs(self, logits: list[np.ndarray]) -> np.ndarray:
        """Log-probabilities over the vocabulary, up to an additive constant (the
        picker normalizes), given each stream's logits in `streams` order."""

    def scores(self, dists: list[NextToken], greedy: bool) -> np.ndarray:
        """What the loop picks from. Policies that can decide from a remote cloud's
        top-k override this; the default asks every stream for its full vector."""
        return self.next_logprobs([d.full()[0] for d in dists])

    @property
    def roles(self) -> set[Role]:
        return {s.role for s in self.streams}


class SingleModel(Policy):
    """One model on one prompt: the baselines."""

    def __init__(self, name: str, role: Role, prompt: PromptKind) -> None:
        self.name = name
        self.streams = (StreamSpec(role, prompt),)

    def next_logprobs(self, logits: list[np.ndarray]) -> np.ndarray:
        return np.asarray(logits[0], dtype=FUSION_DTYPE)

    def scores(self, dists: list[NextToken], greedy: bool) -> np.ndarray:
        dist = dists[0]
        if dist.local or not greedy:
            return self.next_logprobs([dist.full()[0]])
        ids, logits, _ = dist.top(1)  # greedy needs the argmax only
        scores = np.full(dist.vocab_size, -np.inf)
        scores[ids] = logits
        return scores


class CoSteerPolicy(Policy):
    """The cloud model on the public prompt, steered by the device model's local delta."""

    streams = (StreamSpec("llm", "public"), StreamSpec("slm", "private"), StreamSpec("slm", "public"))

    def __init__(self, name: str, params: SteeringParams, fusion: Fusion = "closed", first_k: int = DEFAULT_TOP_K) -> None:
        if fusion not in ("closed", "loop"):
            raise UserError(f"unknown fusion {fusion!r}: choose closed or loop")
        self.name = name
        self.params = params
        self.fusion = fusion
        self.coefficient = params.coefficient
        self.first_k = first_k
        self.traffic = CertificationStats()  # filled only when the cloud is remote

    def scores(self, dists: list[NextToken], greedy: bool) -> np.ndarray:
        cloud, with_ctx, without_ctx = dists
        if cloud.local or self.fusion == "loop":
            return super().scores(dists, greedy)
        steer = self.coefficient * (with_ctx.full()[0].astype(FUSION_DTYPE) - without_ctx.full()[0])
        return fuse_with_partial_cloud(cloud, steer, self.first_k, greedy, self.traffic)

    def next_logprobs(self, logits: list[np.ndarray]) -> np.ndarray:
        if self.fusion == "loop":
            return fuse_ftrl_loop(log_softmax(logits[0]), local_delta(logits[1], logits[2]), self.params)
        # log_softmax(B + c*delta) without its normalizations, which only shift every
        # token by one constant: z_llm + c*(z_with - z_without). 5x cheaper per token.
        llm, with_ctx, without_ctx = (np.asarray(x, dtype=FUSION_DTYPE) for x in logits)
        return llm + self.coefficient * (with_ctx - without_ctx)


def _costeer(params: SteeringParams, fusion: Fusion) -> Policy:
    return CoSteerPolicy("costeer", params, fusion)


def _light(params: SteeringParams, fusion: Fusion) -> Policy:
    # LightCoSteer: one FTRL iteration, the other hyperparameters unchanged
    one_step = SteeringParams(1, params.alpha, params.beta, params.lam, params.eta)
    return CoSteerPolicy("light", one_step, fusion)


METHODS: dict[str, Callable[[SteeringParams, Fusion], Policy]] = {
    "costeer": _costeer,
    "light": _light,
    "llm": lambda p, f: SingleModel("llm", "llm", "public"),
    "llm-context": lambda p, f: SingleModel("llm-context", "llm", "private"),
    "slm": lambda p, f: SingleModel("slm", "slm", "public"),
    "slm-context": lambda p, f: SingleModel("slm-context", "slm", "private"),
}


def make_policy(method: str, params: SteeringParams | None = None, fusion: Fusion = "closed") -> Policy:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[method](params or SteeringParams(), fusion)
