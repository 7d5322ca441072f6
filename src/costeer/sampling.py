"""Choosing the next token from a log-distribution: greedy, or seeded sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .distribution import top_k as top_k_ids
from .errors import UserError


# Temperatures below this decode greedily, as vLLM's do (its _SAMPLING_EPS): dividing
# logits by a denormal temperature overflows to inf - inf = NaN in the picker.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 (below GREEDY_BELOW) means greedy (the default, deterministic)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class TokenPicker:
    """Picks token ids from log-probabilities; one instance per generation so a
    seed reproduces the whole sequence."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)

    def pick(self, logprobs: np.ndarray) -> int:
        if self.config.greedy:
            return int(np.argmax(logprobs))
        ids, probs = self.candidates(logprobs)
        return int(self._rng.choice(ids, p=probs))

    def candidates(self, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and their renormalized probabilities after temperature, top-k, top-p."""
        cfg = self.config
        return nucleus(np.asarray(logprobs, dtype=np.float64) / cfg.temperature, cfg.top_k, cfg.top_p)


def nucleus(scaled: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The set a sampler draws from: ids, likeliest first, and their renormalized
    probabilities, after a top-k cut (0: none) then a top-p cut.

    `scaled`: scores already divided by the temperature (float64). The one place this
    arithmetic lives: the certificate (certified.py) must find exactly the set the
    picker does, to the last bit."""
    if top_k and top_k < scaled.size:
        ids, _ = top_k_ids(scaled, top_k)  # ties: lower id first, whatever else is in the array
    else:
        ids = np.argsort(-scaled, kind="stable")
    probs = np.exp(scaled[ids] - scaled[ids[0]])
    probs /= probs.sum()
    if top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        ids, probs = ids[:keep], probs[:keep]
        probs = probs / probs.sum()
    return ids, probs
