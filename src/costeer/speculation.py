"""Exact speculative steering: the device guesses its next tokens, the cloud scores the guess.

Each request to a remote cloud costs a round trip, and per-token CoSteer sends one a
token. With a draft, the device sends along its guess of the next K tokens, and the
cloud answers with its distribution after each prefix of the guess, computed exactly
as per-token steps would. The device then decides every position exactly as before,
from the cloud's distribution there: while its choices follow the guess, the next
distribution is already here and no request goes out. The output is per-token
CoSteer's, token for token; only the number of round trips changes.

The guess comes from the device model itself, which runs ahead on it. Those passes
are the ones a per-token step makes, in the same order on the same cache, so a
guessed token the choice follows costs the device nothing more, and one it does not
is taken back (`StreamGroup.rewind`) before the chosen token is fed.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .backends.base import StreamGroup
from .fusion import log_softmax

DraftRule = Callable[[np.ndarray], int]  # the device group's logits (streams x vocabulary) -> the guessed token


def steered_guess(with_context: int, without_context: int, weight: float = 1.0) -> DraftRule:
    """The device's own stand-in for the fused pick: its model without the context in
    place of the cloud, steered by its local delta, argmax of
    log p_without + weight * (log p_with - log p_without). At weight 1 that is the
    with-context model's greedy token."""
    if weight == 1.0:
        return lambda logits: int(np.argmax(logits[with_context]))

    def guess(logits: np.ndarray) -> int:
        without = log_softmax(logits[without_context])
        return int(np.argmax(without + weight * (log_softmax(logits[with_context]) - without)))
    return guess


class _Ahead(NamedTuple):
    token: int
    mark: object  # the group's checkpoint before this token
    logits: np.ndarray  # the group's logits after it


class SpeculativeGroup(StreamGroup):
    """A device group that can run ahead of the decoding loop on a draft and take back
    what the loop's choices did not follow."""

    def __init__(self, inner: StreamGroup, rule: DraftRule) -> None:
        if not inner.rewinds:
            raise ValueError(f"{type(inner).__name__} cannot rewind")
        self._inner, self._rule = inner, rule
        self._prompt_lengths = inner.prompt_lengths
        self.restored_tokens = inner.restored_tokens
        self._ahead: list[_Ahead] = []  # tokens fed past the loop's position, in order
        self._here: np.ndarray | None = None  # the logits at the loop's position while ahead
        self._guess: list[int] = []  # what is left of the latest draft
        self.drafted = self.followed = 0  # tokens guessed; tokens the loop then chose as guessed

    def logits(self) -> np.ndarray:
        return self._here if self._ahead else self._inner.logits()

    def advance(self, token_id: int) -> None:
        if self._guess and self._guess[0] == token_id:
            self.followed += 1
            self._guess.pop(0)
        else:
            self._guess = []
        if self._ahead and self._ahead[0].token == token_id:  # computed already
            self._here = self._ahead.pop(0).logits
            return
        self._take_back()
        self._inner.advance(token_id)

    def draft(self, n: int) -> list[int]:
        """Guess the next `n` tokens, running ahead on all but the last (`run_ahead` takes
        the last, while the cloud computes)."""
        self._take_back()
        guess: list[int] = []
        logits = self._inner.logits()
        while True:
            guess.append(self._rule(logits))
            if len(guess) == n:
                break
            logits = self._run_ahead(guess[-1])
        self.drafted += n
        self._guess = list(guess)
        return guess

    def run_ahead(self, token: int) -> None:
        """Feed the latest draft's last token past the others (a pass the choices may use)."""
        if self._guess and self._guess[-1] == token and len(self._ahead) + 1 == len(self._guess):
            self._run_ahead(token)

    def _run_ahead(self, token: int) -> np.ndarray:
        if not self._ahead:
            self._here = self._inner.logits().copy()
        mark = self._inner.checkpoint()
        self._inner.advance(token)
        self._ahead.append(_Ahead(token, mark, self._inner.logits().copy()))
        return self._ahead[-1].logits

    def _take_back(self) -> None:
        if self._ahead:
            self._inner.rewind(self._ahead[0].mark)
            self._ahead = []

    def alignment(self) -> dict | None:
        return self._inner.alignment()

    def close(self) -> None:
        self._inner.close()
