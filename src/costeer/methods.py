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
from .fusion import FUSION_DTYPE, SteeringParams, fuse_ftrl_loop, local_delta, log_softmax

Role = Literal["llm", "slm"]  # cloud model, device model
PromptKind = Literal["public", "private"]  # without / with the private context
Fusion = Literal["closed", "loop"]


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

    @property
    def roles(self) -> set[Role]:
        return {s.role for s in self.streams}


class SingleModel(Policy):
    """One model on one prompt: the baselines."""

    def __init__(self, name: str, role: Role, prompt: PromptKind) -> None:
        self.name = name
        self.streams = (StreamSpec(role, prompt),)

    def next_logprobs(self, logits: list[np.ndarray]) -> np.ndarray:
        return log_softmax(logits[0])


class CoSteerPolicy(Policy):
    """The cloud model on the public prompt, steered by the device model's local delta."""

    streams = (StreamSpec("llm", "public"), StreamSpec("slm", "private"), StreamSpec("slm", "public"))

    def __init__(self, name: str, params: SteeringParams, fusion: Fusion = "closed") -> None:
        if fusion not in ("closed", "loop"):
            raise UserError(f"unknown fusion {fusion!r}: choose closed or loop")
        self.name = name
        self.params = params
        self.fusion = fusion
        self.coefficient = params.coefficient

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
