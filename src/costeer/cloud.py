"""A cloud model served elsewhere, as the device sees it.

Not a `LanguageModel`: the device cannot run it, render its template or read its
logits at will. It opens a session on a public conversation, sends (part of) the
next-token distribution, takes the chosen token, and, where it can, sends more
at the same position when asked. The tokenizer is the device model's where the two
share a vocabulary (checked where the API allows); a cloud that can send its
vocabulary also works beside a device model of another tokenizer.

The privacy rule lives in the types: `encode_chat` takes a `PublicChat` only, so a
conversation holding the private context cannot reach a cloud by accident.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ContextManager, Sequence

from .backends.base import LanguageModel, Streams
from .distribution import NextToken
from .errors import PrivacyError, UserError
from .prompts import PublicChat


class CloudSession(Streams):
    """One public conversation on the cloud, positioned after its prompt and the
    tokens appended so far: one stream, over a network, that can be asked again."""

    remote = True
    widens = True
    prompt_tokens: int
    drafts = 0  # the most tokens of a device's draft `advance` can send along (speculation.py)

    @property
    def prompt_lengths(self) -> list[int]:
        return [self.prompt_tokens]

    @abstractmethod
    def next_tokens(self) -> list[NextToken]:
        """What is known of the next-token distribution (one stream)."""

    @abstractmethod
    def widen(self, k: int | None) -> None:
        """Ask again at the same position for the top-k (None: the full vector)."""

    @abstractmethod
    def advance(self, token_id: int, draft: Sequence[int] = ()) -> None:
        """Append the chosen token and receive the next distribution's top-k; where
        `drafts`, and a request goes out, also the distributions along `draft` (the
        device's guess of the tokens after this one)."""

    def asks_after(self, token_id: int) -> bool:
        """Whether `advance(token_id)` sends a request (a draft is worth making)."""
        return True

    def close(self) -> None:
        """End the session on the server (best effort: servers expire idle ones)."""


class RemoteCloud(ABC):
    """A `StreamSource` whose streams are a session on the cloud."""

    remote = True
    name: str
    vocab_size: int
    eos_token_ids: frozenset[int]
    context_window: int

    def __init__(self, tokenizer: LanguageModel) -> None:
        self.tokenizer = tokenizer
        self._pieces: list[bytes] | None = None  # the cloud's own, once fetched (another tokenizer)

    def token_bytes(self, token_id: int) -> bytes:
        return self._pieces[token_id] if self._pieces is not None else self.tokenizer.token_bytes(token_id)

    def vocabulary(self) -> tuple[list[bytes], frozenset[int]]:
        """The cloud's token bytes in id order and its control tokens, for a device model
        of another tokenizer; from then on `token_bytes` spells the cloud's tokens."""
        raise UserError(f"the cloud at {self.name} cannot send its vocabulary, so the device model must share its "
                        "tokenizer; steering across tokenizers needs an embedded cloud or a costeer serve cloud")

    def encode_chat(self, chat: PublicChat) -> PublicChat:
        """The prompt `open_session` takes: the public chat itself, nothing else."""
        if not isinstance(chat, PublicChat):
            raise PrivacyError(f"refused to send a {type(chat).__name__} to the cloud at {self.name}: "
                               "only the public conversation may leave the device")
        return chat

    @abstractmethod
    def vocabulary_digest(self) -> str:
        """SHA-256 of the cloud's token bytes, compared with the device model's."""

    @abstractmethod
    def open_session(self, chat: PublicChat, max_new_tokens: int, first_k: int | None) -> CloudSession:
        """Send the public conversation; `first_k` values come back with every step."""

    def open_for_decoding(self, prompts: Sequence[PublicChat], max_new_tokens: int, *, private: Sequence[bool],
                          first_k: int | None) -> CloudSession:
        """`StreamSource`'s way in: a session on the one conversation, public as `encode_chat`
        made sure (a private one arrives declassified, where the API allowed it)."""
        if len(prompts) != 1:
            raise ValueError("a remote cloud session holds one public conversation")
        return self.open_session(prompts[0], max_new_tokens, first_k)

    def recording(self) -> ContextManager[list[dict]]:
        """A block during which every message to and from the cloud is also kept in the
        list it yields, as the wire log writes it (what the chat page shows crossed)."""
        raise UserError(f"the cloud at {self.name} keeps no record of its messages")

    def close(self) -> None:
        """Release the connection."""
