"""One stream's next-token distribution, possibly known only in part.

Local models hand over all their logits for free. A remote cloud model sends what
it is asked for: its top-k, or the full vector. Policies ask for as little as
they can prove is enough (see `certified.py`).

Values are raw logits z with their log-normalizer lse, so log p = z - lse, and
scores built from them are bit-identical to the ones an embedded run computes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class NextToken(ABC):
    vocab_size: int
    local: bool  # True when full() costs nothing

    @abstractmethod
    def top(self, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(ids, logits, lse) of the k likeliest tokens, likeliest first."""

    @abstractmethod
    def full(self) -> tuple[np.ndarray, float]:
        """(logits of the whole vocabulary, lse)."""


class LocalNextToken(NextToken):
    local = True

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits
        self.vocab_size = int(logits.shape[-1])
        self._lse: float | None = None

    @property
    def lse(self) -> float:
        if self._lse is None:
            z = self.logits.astype(np.float64)
            peak = float(z.max())
            self._lse = peak + float(np.log(np.exp(z - peak).sum()))
        return self._lse

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        return (*top_k(self.logits, k), self.lse)

    def full(self) -> tuple[np.ndarray, float]:
        return self.logits, self.lse


def top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and values of the k largest entries, largest first (ties: lower id first)."""
    k = max(1, min(int(k), values.shape[-1]))
    ids = np.argpartition(-values, k - 1)[:k] if k < values.shape[-1] else np.arange(values.shape[-1])
    order = np.lexsort((ids, -values[ids]))
    ids = ids[order]
    return ids, values[ids]
