"""The CoSteer fusion math, as pure functions over numpy arrays.

Per decoding position, with B = log_softmax(z_llm) (the cloud model on the public
prompt) and delta = log_softmax(z_slm_with) - log_softmax(z_slm_without) (the
device model with and without the private context), the paper runs T steps of
follow-the-regularized-leader starting from pi_1 = B:

    u_k        = alpha * (log pi_k - B) + beta * delta
    log pi_k+1 = log_softmax((k*lambda*B + sum_{i<=k} u_i + log pi_k / eta) / (k*lambda + 1/eta))

Every term is linear in B and delta and log_softmax only shifts by a constant, so
log pi_k = log_softmax(B + c_k * delta) for a scalar c_k that depends only on the
hyperparameters. `steering_coefficient` computes c = c_{T+1}; `fuse_closed_form`
applies it. `fuse_ftrl_loop` is the published loop, kept to reproduce the paper
and to prove the two equal (see tests/core/test_fusion.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UserError

# Computation dtype for the fusion: the paper asks for fp32; float64 costs little
# at one vector per token and keeps the loop and closed form equal to ~1e-12.
FUSION_DTYPE = np.float64


@dataclass(frozen=True)
class SteeringParams:
    """Hyperparameters of the paper's update (defaults: the paper's)."""

    iterations: int = 20  # T
    alpha: float = 2.0
    beta: float = 1.0
    lam: float = 2.0  # lambda
    eta: float = 10.0

    def __post_init__(self) -> None:
        validate_params(self)

    @property
    def coefficient(self) -> float:
        return steering_coefficient(self)


def validate_params(p: SteeringParams) -> None:
    """Reject hyperparameters for which the update is undefined or meaningless."""
    if isinstance(p.iterations, bool) or not isinstance(p.iterations, (int, np.integer)):
        raise UserError(f"iterations (T) must be an integer, got {p.iterations!r}")
    if p.iterations < 1:
        raise UserError(f"iterations (T) must be >= 1, got {p.iterations}")
    for name in ("alpha", "beta", "lam", "eta"):
        value = getattr(p, name)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{_display(name)} must be a number, got {value!r}") from None
        if not math.isfinite(value):
            raise UserError(f"{_display(name)} must be finite, got {value}")
    if p.lam <= 0:
        raise UserError(f"lambda must be > 0, got {p.lam}")
    if p.eta <= 0:
        raise UserError(f"eta must be > 0, got {p.eta}")


def _display(name: str) -> str:
    return "lambda" if name == "lam" else name


def steering_coefficient(p: SteeringParams) -> float:
    """The scalar c with  log pi_{T+1} = log_softmax(B + c * delta).

    Substituting log pi_k = B + c_k*delta (+ const) into the update gives
    u_k = (alpha*c_k + beta) * delta, hence with S_k = sum_{i<=k} (alpha*c_i + beta):
        c_1 = 0,   c_{k+1} = (S_k + c_k/eta) / (k*lambda + 1/eta).
    """
    c = 0.0
    running_sum = 0.0
    for k in range(1, int(p.iterations) + 1):
        running_sum += p.alpha * c + p.beta
        c = (running_sum + c / p.eta) / (k * p.lam + 1.0 / p.eta)
    return c


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log_softmax over the last axis, in FUSION_DTYPE."""
    x = np.asarray(logits, dtype=FUSION_DTYPE)
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def local_delta(slm_with_context: np.ndarray, slm_without_context: np.ndarray) -> np.ndarray:
    """delta = log_softmax(z_with) - log_softmax(z_without): what the private context adds."""
    return log_softmax(slm_with_context) - log_softmax(slm_without_context)


def fuse_closed_form(base_logprobs: np.ndarray, delta: np.ndarray, coefficient: float) -> np.ndarray:
    """log_softmax(B + c * delta): the result of the FTRL loop in one step."""
    return log_softmax(np.asarray(base_logprobs, FUSION_DTYPE) + coefficient * np.asarray(delta, FUSION_DTYPE))


def fuse_ftrl_loop(base_logprobs: np.ndarray, delta: np.ndarray, p: SteeringParams) -> np.ndarray:
    """The paper's T-step FTRL update, literally; returns log pi_{T+1}."""
    base = np.asarray(base_logprobs, FUSION_DTYPE)
    delta = np.asarray(delta, FUSION_DTYPE)
    log_pi = base.copy()
    u_sum = np.zeros_like(base)
    for k in range(1, int(p.iterations) + 1):
        u_sum += p.alpha * (log_pi - base) + p.beta * delta
        log_pi = log_softmax((k * p.lam * base + u_sum + log_pi / p.eta) / (k * p.lam + 1.0 / p.eta))
    return log_pi
