"""Fusing with a cloud model that sends only its top-k, exactly: the certificate.

If the cloud sends the log-probabilities B_i of its k likeliest tokens (set K),
every other token j has

    B_j <= bound_B = min(min_{i in K} B_i, log R),    R = 1 - sum_{i in K} p_i (+ rounding slack)

and the outside mass sums to at most R. The device knows the steering term
s_j = c * delta_j for the whole vocabulary, so with S = max_{j not in K} s_j every
outside token's fused score B_j + s_j is at most bound_B + S. From that:

- greedy: the argmax over K is the full-vocabulary argmax when it beats bound_B + S;
- sampling with top-k m: the m best tokens over K are the m best over the whole
  vocabulary when the m-th beats bound_B + S; the sampled distribution is then exact;
- sampling with top-p: the nucleus computed over K is the true nucleus when its
  last token beats bound_B + S and its mass reaches p even against the largest
  possible outside mass; the sampled distribution is then exact;
- plain sampling at temperature T: the fused mass outside K is at most
  U / (Z_K + U), with Z_K = sum_K exp((B_i + s_i) / T) and U the largest value of
  sum_{j not in K} exp((B_j + s_j) / T) the two facts above allow.

`certify` is a pure function: it returns a `Pick` (scores to pick from) or an
`AskFor` (the next, larger k to ask for, or the full vector). It never asks for
particular token ids, which would tell the cloud what the private context favours.
The decoding loop makes the round trips.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .distribution import NextToken, log_sum_exp, sparse_scores
from .sampling import SamplingConfig, nucleus

# A certificate must hold by more than this many nats, so float rounding in the
# comparisons can never turn a tie into a wrong "proof".
MARGIN_TOLERANCE = 1e-9
# Plain sampling: widen K until the fused mass outside it is provably below this.
DEFAULT_MAX_MISSED_MASS = 1e-3


@dataclass(frozen=True)
class Pick:
    """Scores over the vocabulary to pick from (-inf where unknown)."""

    scores: np.ndarray
    certified: bool | None = None  # None: nothing to certify (all values were known)
    missed_mass: float | None = None  # plain sampling: the bound on fused mass left out


@dataclass(frozen=True)
class AskFor:
    """Ask the cloud again at the same position for its top-k (None: the full vector)."""

    k: int | None


Decision = Pick | AskFor


@dataclass
class CertificationStats:
    """What top-k traffic cost over one generation."""

    steps: int = 0
    certified_first: int = 0  # steps settled by the first top-k
    requests_by_k: Counter = field(default_factory=Counter)  # escalation requests, by size ("full" for all)
    uncertified: int = 0  # the cloud could not send more (a server cap): chose inside K anyway
    max_missed_mass: float = 0.0  # plain sampling: the largest bound on fused mass outside K

    def record(self, pick: Pick, asked: list[int | None]) -> None:
        """One decoding step: its final pick and the escalations it needed."""
        self.steps += 1
        for k in asked:
            self.requests_by_k["full" if k is None else k] += 1
        if pick.certified and not asked:
            self.certified_first += 1
        if pick.certified is False:
            self.uncertified += 1
        if pick.missed_mass is not None:
            self.max_missed_mass = max(self.max_missed_mass, pick.missed_mass)

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "certified_first_fraction": self.certified_first / self.steps if self.steps else None,
            "escalations": dict(sorted(self.requests_by_k.items(), key=lambda kv: (kv[0] == "full", kv[0]))),
            "uncertified_steps": self.uncertified,
            "max_missed_mass": self.max_missed_mass,
        }


def next_request(known: int, vocab_size: int) -> int | None:
    """The k to ask for after `known` values did not settle a step: 16 times more,
    then the full vector (None) once that would be an eighth of the vocabulary."""
    k = max(1, known) * 16
    return k if k < vocab_size // 8 else None


@dataclass(frozen=True)
class OutsideBound:
    """What the top-k proves about the tokens it does not list."""

    log_rest: float  # log of the most probability mass outside K
    max_logprob: float  # the largest log-probability any single outside token can have
    count: int  # how many tokens are outside K

    def log_weight(self, temperature: float) -> float:
        """log of the largest possible sum over outside tokens of p_j ** (1 / T)."""
        if self.count == 0 or self.log_rest == -math.inf:
            return -math.inf
        inv = 1.0 / temperature
        each_at_most = math.log(self.count) + self.max_logprob * inv
        if inv >= 1:  # sharper: p ** inv <= p * max_p ** (inv - 1)
            return min(self.log_rest + self.max_logprob * (inv - 1), each_at_most)
        # flatter: p ** inv is concave, so the sum peaks with the mass spread evenly
        return math.log(self.count) + min(self.log_rest - math.log(self.count), self.max_logprob) * inv


def outside_bound(view: NextToken, base_k: np.ndarray) -> OutsideBound:
    """`base_k`: the listed tokens' log-probabilities, float64."""
    count = view.vocab_size - len(base_k)
    rest = max(0.0, 1.0 - float(np.exp(base_k).sum())) + view.mass_slack
    log_rest = math.log(rest) if count else -math.inf
    max_logprob = min(float(base_k.min()), log_rest) if view.exact_top and len(base_k) else log_rest
    return OutsideBound(log_rest, min(max_logprob, 0.0), count)


def certify(
    view: NextToken,
    steer: np.ndarray,
    sampling: SamplingConfig,
    max_missed_mass: float = DEFAULT_MAX_MISSED_MASS,
) -> Decision:
    """Scores of z + steer from what `view` holds, or what to ask for next.

    `steer` is c * (z_with - z_without) over the whole vocabulary (float64). The
    scores are exactly the embedded closed form's wherever they are not -inf.
    """
    if view.complete:
        return Pick(view.logits.astype(np.float64) + steer)
    ids = view.ids
    logits = view.logits.astype(np.float64)
    scores = sparse_scores(view.vocab_size, ids, logits + steer[ids])  # same arithmetic as the embedded closed form
    if len(ids) == 0:
        return AskFor(next_request(0, view.vocab_size)) if view.can_widen else Pick(scores, certified=False)
    outside = outside_bound(view, logits - view.lse)
    steer_out = steer.copy()
    steer_out[ids] = -np.inf
    steer_out_max = float(steer_out.max()) if outside.count else -math.inf
    # no outside token's score (z_j + s_j, as the picker sees it) is above this
    score_out_max = view.lse + outside.max_logprob + steer_out_max
    settled, missed = _settled(scores[ids], score_out_max, outside, view.lse + steer_out_max, sampling, max_missed_mass)
    if settled:
        return Pick(scores, certified=True, missed_mass=missed)
    if view.can_widen:
        return AskFor(next_request(len(ids), view.vocab_size))
    return Pick(scores, certified=False, missed_mass=missed)


def _settled(
    inside: np.ndarray,
    score_out_max: float,
    outside: OutsideBound,
    shift: float,
    sampling: SamplingConfig,
    max_missed_mass: float,
) -> tuple[bool, float | None]:
    """Whether the picker, given only K, picks from the distribution it would with the
    whole vocabulary; and for plain sampling, the bound on the mass it leaves out.

    `inside`: the scores z_i + s_i over K; `score_out_max`: no outside score is above
    it; outside scores are B_j + s_j + lse, so their weights at temperature T sum to
    at most exp(shift / T) * outside.log_weight(T) with shift = lse + max outside s_j."""
    if score_out_max == -math.inf:
        return True, (None if sampling.greedy else 0.0)
    order = np.sort(inside)[::-1]
    if sampling.greedy:
        return bool(order[0] - score_out_max > MARGIN_TOLERANCE), None
    vocab = len(inside) + outside.count
    if 0 < sampling.top_k < vocab:
        m = sampling.top_k
        return bool(len(order) >= m and order[m - 1] - score_out_max > MARGIN_TOLERANCE), 0.0
    t = sampling.temperature
    log_outside = shift / t + outside.log_weight(t)  # log of the most outside weight
    scaled = order / t
    log_inside = log_sum_exp(scaled)
    if sampling.top_p < 1.0:
        # the nucleus the picker finds over K (top-k was settled above)
        scaled_inside = inside / t
        kept_ids, _ = nucleus(scaled_inside, top_p=sampling.top_p)
        kept = scaled_inside[kept_ids]  # likeliest first
        beats_outside = kept[-1] - score_out_max / t > MARGIN_TOLERANCE
        log_kept = log_sum_exp(kept)
        reaches_p = log_kept - np.logaddexp(log_inside, log_outside) >= math.log(sampling.top_p) + MARGIN_TOLERANCE
        return bool(beats_outside and reaches_p), 0.0
    missed = 1.0 / (1.0 + math.exp(min(700.0, log_inside - log_outside))) if log_outside > -math.inf else 0.0
    return missed <= max_missed_mass, missed
