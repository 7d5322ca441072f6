"""One stream's next-token distribution, possibly known only in part.

Local models hand over all their logits for free. A remote cloud sends its top-k
(or the full vector) and more only when asked; policies decide from what is known
and, where that cannot settle the step, say how much more they need (`AskFor`).
The decoding loop, not the policy, makes the round trip (see `decoding.py`).

Values are raw logits z with their log-normalizer lse, so log p = z - lse, and
scores built from them are bit-identical to the ones an embedded run computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class NextToken:
    """`ids is None`: `logits` covers the whole vocabulary in id order (complete).
    Otherwise `logits[i]` is token `ids[i]`'s, likeliest first, and the rest is unknown."""

    logits: np.ndarray
    lse: float
    vocab_size: int
    ids: np.ndarray | None = None
    # The entries are exactly the len(ids) likeliest tokens. False when the sender
    # dropped some (a server's token strings that map to no single id): then the
    # smallest listed value bounds nothing and only the missing mass does.
    exact_top: bool = True
    # The sender can send more at this position (a larger k or the full vector).
    can_widen: bool = False
    # How far the listed probabilities may sum above the truth through rounding
    # (float32 logits and a float64 lse: ~1e-12; a server's printed logprobs: more).
    mass_slack: float = 1e-9

    @classmethod
    def local(cls, logits: np.ndarray) -> "NextToken":
        return cls(logits, log_sum_exp(logits), int(logits.shape[-1]))

    @property
    def complete(self) -> bool:
        return self.ids is None

    @property
    def known(self) -> int:
        """How many tokens' values are known."""
        return self.vocab_size if self.ids is None else len(self.ids)

    def top_logprob(self) -> float:
        """log p of the likeliest token: the same float embedded and over the wire (the
        same float32 logit and lse), so policies that read it stay exact in split mode."""
        if self.known == 0:
            return -math.inf
        best = self.logits.max() if self.ids is None else self.logits[0]
        return float(best) - self.lse

    def logprob(self, token: int) -> float | None:
        """log p of `token`, where this view lists it (None: outside a top-k); the same
        float embedded and over the wire, as `top_logprob`."""
        if self.ids is None:
            return float(self.logits[token]) - self.lse
        where = np.flatnonzero(self.ids == token)
        return float(self.logits[where[0]]) - self.lse if where.size else None

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, logits) of the k likeliest known tokens, likeliest first."""
        if self.ids is None:
            return top_k(self.logits, k)
        return self.ids[:k], self.logits[:k]


def check_token_ids(ids: np.ndarray | Sequence[int], vocab_size: int, sender: str) -> None:
    """Refuse token ids a server sent that are not in the vocabulary, before any is used:
    numpy would silently read a negative id as one counted from the vocabulary's end."""
    array = np.asarray(ids)  # ints too large for int64 become objects, still compared exactly
    outside = (array < 0) | (array >= vocab_size) if array.size else np.zeros(0, dtype=bool)
    if outside.any():
        raise UserError(f"{sender} sent token id {array[outside][0]}, outside the vocabulary (0 to {vocab_size - 1}); "
                        "nothing of that reply was used")


def sparse_scores(vocab_size: int, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Scores over the vocabulary: `values` at `ids`, -inf (never picked) elsewhere."""
    scores = np.full(vocab_size, -np.inf)
    scores[ids] = values
    return scores


def log_sum_exp(values: np.ndarray) -> float:
    z = np.asarray(values, dtype=np.float64)
    peak = float(z.max())
    if not math.isfinite(peak):
        return peak
    return peak + float(np.log(np.exp(z - peak).sum()))


def top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and values of the k largest entries, largest first (ties: lower id first)."""
    k = max(1, min(int(k), values.shape[-1]))
    if k < values.shape[-1]:
        # argpartition picks arbitrarily among values tied with the k-th: take the lowest ids
        threshold = values[np.argpartition(-values, k - 1)[k - 1]]
        above = np.flatnonzero(values > threshold)
        ids = np.concatenate([above, np.flatnonzero(values == threshold)[: k - len(above)]])
    else:
        ids = np.arange(values.shape[-1])
    order = np.lexsort((ids, -values[ids]))
    ids = ids[order]
    return ids, values[ids]


def top_probability(logits: np.ndarray) -> float:
    """Probability of the likeliest token under softmax(logits)."""
    shifted = np.asarray(logits, np.float64) - float(np.max(logits))
    return float(1.0 / np.exp(shifted).sum())
