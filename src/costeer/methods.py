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
# costeer-plausible: candidates are the cloud's top PLAUSIBLE_K with p >= PLAUSIBLE_TAU * p_max
# (0.1 as in contrastive decoding; 20 is the most logprobs vLLM returns by default).
PLAUSIBLE_K, PLAUSIBLE_TAU = 20, 0.1


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

    def steering(self, with_ctx: np.ndarray, without_ctx: np.ndarray) -> np.ndarray:
        """c * (z_with - z_without): c * delta up to a constant. Every fusion path uses
        this one expression, so remote and embedded scores are bit-identical."""
        return self.coefficient * (np.asarray(with_ctx, dtype=FUSION_DTYPE) - np.asarray(without_ctx, dtype=FUSION_DTYPE))

    def scores(self, dists: list[NextToken], greedy: bool) -> np.ndarray:
        cloud, with_ctx, without_ctx = dists
        if cloud.local or self.fusion == "loop":
            return super().scores(dists, greedy)
        steer = self.steering(with_ctx.full()[0], without_ctx.full()[0])
        return fuse_with_partial_cloud(cloud, steer, self.first_k, greedy, self.traffic)

    def next_logprobs(self, logits: list[np.ndarray]) -> np.ndarray:
        if self.fusion == "loop":
            return fuse_ftrl_loop(log_softmax(logits[0]), local_delta(logits[1], logits[2]), self.params)
        # log_softmax(B + c*delta) without its normalizations, which only shift every
        # token by one constant: z_llm + c*(z_with - z_without). 5x cheaper per token.
        return np.asarray(logits[0], dtype=FUSION_DTYPE) + self.steering(logits[1], logits[2])


class PlausibleCoSteer(CoSteerPolicy):
    """costeer-plausible (ours, not the paper's): the fused choice is restricted to
    tokens the cloud model itself finds plausible, in the spirit of contrastive
    decoding's adaptive plausibility constraint: tokens in the cloud's top-k whose
    probability is at least `tau` times its best one. A remote cloud's top-k holds
    the whole candidate set, so this is exact with top-k traffic by construction,
    and a strong delta cannot pull in a token the cloud finds implausible (such as
    a verbatim copy of private text)."""

    def __init__(self, name: str, params: SteeringParams, k: int = PLAUSIBLE_K, tau: float = PLAUSIBLE_TAU) -> None:
        super().__init__(name, params, "closed")
        self.k, self.log_tau = k, float(np.log(tau))

    def scores(self, dists: list[NextToken], greedy: bool) -> np.ndarray:
        cloud, with_ctx, without_ctx = dists
        ids, logits, _ = cloud.top(self.k)
        keep = logits >= logits[0] + self.log_tau  # p_i >= tau * p_max; logits[0] is the max
        ids, logits = ids[keep], logits[keep].astype(FUSION_DTYPE)
        scores = np.full(cloud.vocab_size, -np.inf)
        scores[ids] = logits + self.steering(with_ctx.full()[0][ids], without_ctx.full()[0][ids])
        return scores


def _costeer(params: SteeringParams, fusion: Fusion) -> Policy:
    return CoSteerPolicy("costeer", params, fusion)


def _light(params: SteeringParams, fusion: Fusion) -> Policy:
    # LightCoSteer: one FTRL iteration, the other hyperparameters unchanged
    one_step = SteeringParams(1, params.alpha, params.beta, params.lam, params.eta)
    return CoSteerPolicy("light", one_step, fusion)


# CoS with lambda = 1 doubles the context's influence; He et al. sweep lambda over
# about -1..3. `cos:L` picks another lambda.
DEFAULT_COS_LAMBDA = 1.0


class ContextSteering(Policy):
    """Context Steering (CoS, He et al. 2024) on the device model alone: its
    with-context log-probabilities plus lambda times the likelihood gap the context makes."""

    streams = (StreamSpec("slm", "private"), StreamSpec("slm", "public"))

    def __init__(self, lam: float, name: str | None = None) -> None:
        self.name = name or f"cos:{lam:.12g}"
        self.lam = lam

    def next_logprobs(self, logits: list[np.ndarray]) -> np.ndarray:
        with_ctx = log_softmax(logits[0])
        return with_ctx + self.lam * (with_ctx - log_softmax(logits[1]))


class FixedWeightMix(CoSteerPolicy):
    """Logit arithmetic log_softmax(B + w*delta) with w given directly. CoSteer is this
    with w = c(T, alpha, beta, lambda, eta); sweeping w shows where the paper's c sits."""

    def __init__(self, weight: float) -> None:
        super().__init__(f"mix:{weight:.12g}", SteeringParams())  # closed form: the params are unused
        self.coefficient = weight


def _parameter(method: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise UserError(f"method {method!r}: expected a finite number after ':', got {text!r}")
    return value


# Methods named `prefix:number`: the number is the policy's weight.
PARAMETRIC_METHODS: dict[str, Callable[[float], Policy]] = {
    "mix": FixedWeightMix,
    "cos": ContextSteering,
}


METHODS: dict[str, Callable[[SteeringParams, Fusion], Policy]] = {
    "costeer": _costeer,
    "light": _light,
    "costeer-plausible": lambda p, f: PlausibleCoSteer("costeer-plausible", p),
    "llm": lambda p, f: SingleModel("llm", "llm", "public"),
    "llm-context": lambda p, f: SingleModel("llm-context", "llm", "private"),
    "slm": lambda p, f: SingleModel("slm", "slm", "public"),
    "slm-context": lambda p, f: SingleModel("slm-context", "slm", "private"),
    "cos": lambda p, f: ContextSteering(DEFAULT_COS_LAMBDA, name="cos"),
}


def make_policy(method: str, params: SteeringParams | None = None, fusion: Fusion = "closed") -> Policy:
    prefix, colon, value = method.partition(":")
    if colon and prefix in PARAMETRIC_METHODS:
        return PARAMETRIC_METHODS[prefix](_parameter(method, value))
    if method not in METHODS:
        choices = ", ".join([*METHODS, *(f"{p}:NUMBER" for p in PARAMETRIC_METHODS)])
        raise UserError(f"unknown method {method!r}: choose one of {choices}")
    return METHODS[method](params or SteeringParams(), fusion)
