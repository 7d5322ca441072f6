"""The first top-k a split session asks of the cloud each step, learned from the session's
own escalations.

A step whose pick the first top-k cannot certify costs a second round trip (a look at the
same position with 16 times more values, see certified.next_request). Strong steering
moves picks outside a small top-k for many steps in a row, so after a step had to widen,
the next steps ask for what it needed up front, in the step request itself; after a run
of steps that settled at once, the k halves again. The certificate, not the k, decides
every pick, so the output is the same whatever k is asked: only round trips and bytes
change.
"""

from __future__ import annotations

# Bounds: never below the configured first k; never above ADAPTIVE_MAX_K up front (1,024
# values are about 11 KB a step; larger asks stay escalations). Shrink after
# ADAPTIVE_PATIENCE steps in a row settled by the first k.
ADAPTIVE_MAX_K = 1024
ADAPTIVE_PATIENCE = 8


class FirstTopK:
    """`k`: what the next step asks for. Tell it about each widening (`widened`) and each
    step (`stepped`, which returns the k for that step's request)."""

    def __init__(self, base: int, adaptive: bool = True, ceiling: int = ADAPTIVE_MAX_K,
                 patience: int = ADAPTIVE_PATIENCE) -> None:
        self.base = base
        self.adaptive = adaptive
        self.ceiling = max(ceiling, base)
        self.patience = patience
        self.k = base
        self._needed = 0  # the most this step asked for (0: it settled at once)
        self._calm = 0  # steps in a row settled by the first k

    def widened(self, k: int | None) -> None:
        """The current step asked for `k` values (None: the full vector)."""
        self._needed = max(self._needed, self.ceiling if k is None else k)

    def stepped(self) -> int:
        """The session moves to its next position: the k to ask there."""
        needed, self._needed = self._needed, 0
        if not self.adaptive:
            return self.k
        if needed:
            self.k, self._calm = min(self.ceiling, max(self.k, needed)), 0
        else:
            self._calm += 1
            if self._calm >= self.patience:
                self.k, self._calm = max(self.base, self.k // 2), 0
        return self.k
