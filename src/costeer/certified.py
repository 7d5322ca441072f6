"""Fusing with a cloud model that sends only its top-k, exactly.

If the cloud sends the log-probabilities B_i of its k likeliest tokens (set K),
every other token j has  B_j <= min(min_{i in K} B_i, log(1 - sum_{i in K} p_i)).
The device knows the steering term s_j = c * delta_j for the whole vocabulary, so
the fused greedy choice inside K is provably the full-vocabulary choice when

    max_{i in K} (B_i + s_i)  >  bound_B + max_{j not in K} s_j          (certificate)

When it fails, the device asks for a larger k, then the whole vector: never for
particular token ids, which would tell the cloud what the private context favours.
For sampling, the fused probability mass outside K is at most U / (Z_K + U) with
U = (1 - sum_K p) * exp(max_{j not in K} s_j) and Z_K = sum_K exp(B_i + s_i);
the device widens K until that bound is below a tolerance.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .distribution import NextToken


@dataclass
class CertificationStats:
    """What top-k traffic cost over one generation."""

    steps: int = 0
    certified_first: int = 0  # steps settled by the first top-k
    requests_by_k: Counter = field(default_factory=Counter)  # escalation requests, by size ("full" for all)
    uncertified: int = 0  # the cloud could not send more (a server cap): chose inside K anyway
    max_missed_mass: float = 0.0  # sampling: the largest bound on fused mass outside K

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "certified_first_fraction": self.certified_first / self.steps if self.steps else None,
            "escalations": dict(sorted(self.requests_by_k.items(), key=lambda kv: (kv[0] == "full", kv[0]))),
            "uncertified_steps": self.uncertified,
            "max_missed_mass": self.max_missed_mass,
        }


def _log1m_mass(logprobs: np.ndarray) -> float:
    """log(1 - sum exp(logprobs)), -inf when the listed tokens hold all the mass."""
    rest = 1.0 - float(np.exp(logprobs).sum())
    return math.log(rest) if rest > 0 else -math.inf


def certificate_margin(
    base_k: np.ndarray, steer_k: np.ndarray, base_rest_log: float, steer_out_max: float, exact_top: bool = True
) -> float:
    """> 0 proves argmax over K of B + s is the argmax over the whole vocabulary.
    Without `exact_top` (K may miss some of the true top-k) only the mass bound holds."""
    bound = (min(float(base_k.min()), base_rest_log) if exact_top else base_rest_log) + steer_out_max
    return float((base_k + steer_k).max()) - bound


def missed_mass_bound(base_k: np.ndarray, steer_k: np.ndarray, base_rest_log: float, steer_out_max: float) -> float:
    """Upper bound on the fused probability of all tokens outside K."""
    log_outside = base_rest_log + steer_out_max
    if log_outside == -math.inf:
        return 0.0
    fused = base_k + steer_k
    peak = float(fused.max())
    log_inside = peak + math.log(float(np.exp(fused - peak).sum()))
    return 1.0 / (1.0 + math.exp(log_inside - log_outside))


def escalation_ladder(first_k: int, vocab_size: int) -> list[int]:
    """k values to ask for in turn; vocab_size stands for the full vector."""
    ks, k = [], max(1, first_k)
    while k < vocab_size // 8:
        ks.append(k)
        k *= 16
    return ks + [vocab_size]


def fuse_with_partial_cloud(
    cloud: NextToken,
    steer: np.ndarray,
    first_k: int,
    greedy: bool,
    stats: CertificationStats,
    max_missed_mass: float = 1e-3,
) -> np.ndarray:
    """Scores (log-probabilities up to a constant) of B + steer, -inf outside the
    tokens the cloud sent; exact for greedy, mass-bounded for sampling.

    `steer` is c * (z_with - z_without) over the whole vocabulary (float64).
    """
    vocab = steer.shape[-1]
    stats.steps += 1
    cap = getattr(cloud, "max_k", None)  # a server that sends at most `cap` tokens, all at once
    ladder = [cap] if cap is not None else escalation_ladder(first_k, vocab)
    for attempt, k in enumerate(ladder):
        if attempt:
            stats.requests_by_k["full" if k >= vocab else k] += 1
        if k >= vocab:
            logits, _ = cloud.full()
            return logits.astype(np.float64) + steer
        ids, logits, lse = cloud.top(k)
        base_k = logits.astype(np.float64) - lse
        steer_k = steer[ids]
        outside = steer.copy()
        outside[ids] = -np.inf
        steer_out_max = float(outside.max())
        rest_log = _log1m_mass(base_k)
        if greedy:
            settled = certificate_margin(base_k, steer_k, rest_log, steer_out_max, getattr(cloud, "exact_top", True)) > 0
        else:
            missed = missed_mass_bound(base_k, steer_k, rest_log, steer_out_max)
            settled = missed <= max_missed_mass
        capped = cap is not None and k >= cap
        if settled or capped:
            if settled and attempt == 0:
                stats.certified_first += 1
            if not settled:
                stats.uncertified += 1
            if not greedy:
                stats.max_missed_mass = max(stats.max_missed_mass, missed)
            scores = np.full(vocab, -np.inf)
            scores[ids] = logits.astype(np.float64) + steer_k  # same arithmetic as the embedded closed form
            return scores
    raise AssertionError("unreachable: the ladder ends with the full vector")
