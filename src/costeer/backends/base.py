"""The one small interface every model backend implements.

A `LanguageModel` is a loaded model plus its tokenizer. `open_streams` starts a
`StreamGroup`: several prompts decoded in lockstep, each keeping its own KV cache.
In CoSteer every stream of a model sees the same generated tokens after its own
prompt (the device model runs with and without the private context), so a group
advances all its streams with one token at a time, which also lets a backend batch
them into one forward pass.

The decoding loop sees every model as a `StreamSource` and every group as `Streams`:
local models and their groups here, a remote cloud and its session in cloud.py.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Iterator, NamedTuple, Protocol, Self, Sequence

import numpy as np

from ..distribution import NextToken
from ..errors import UserError

ChatMessage = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}


class Streams(ABC):
    """What the decoding loop reads and drives: one model's streams, in lockstep after
    their prompts. Local (`StreamGroup`) or a session on a remote cloud
    (`cloud.CloudSession`); what only some can do is an attribute, not a type."""

    remote = False  # `advance` waits on a network: the loop runs it beside the local groups' work
    widens = False  # `widen` asks again at the same position for more of the distribution
    restored_tokens = 0  # prompt tokens started from a saved state, not prefilled (context_cache/)

    @property
    @abstractmethod
    def prompt_lengths(self) -> list[int]:
        """Tokens in each stream's prompt."""

    @abstractmethod
    def next_tokens(self) -> list[NextToken]:
        """Each stream's next-token distribution, as far as it is known."""

    @abstractmethod
    def advance(self, token_id: int) -> None:
        """Append one token to every stream."""

    def widen(self, k: int | None) -> None:
        """Where `widens`: ask again at the same position for the top-k (None: the full vector)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be asked again")

    def traffic(self) -> dict | None:
        """Network counters (none: local streams)."""
        return None

    def alignment(self) -> dict | None:
        """How a device group followed a cloud of another vocabulary (backends/aligned.py)."""
        return None

    def close(self) -> None:
        """Free what the streams hold; they are unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamSource(Protocol):
    """A model as the decoding loop opens it: a `LanguageModel`, a `cloud.RemoteCloud`, or
    a model behind the context cache (`context_cache.CachedModel`)."""

    remote: bool  # its streams are remote: opened in a thread while the local models prefill
    eos_token_ids: frozenset[int]

    def token_bytes(self, token_id: int) -> bytes: ...

    def open_for_decoding(self, prompts: Sequence, max_new_tokens: int, *, private: Sequence[bool],
                          first_k: int | None) -> Streams:
        """Streams after `prompts`; `private[i]`: prompt i holds the private context; `first_k`:
        the top-k a remote cloud sends with every step (None: the full vector)."""
        ...


class StreamGroup(Streams):
    """Prompts decoded in lockstep on this machine; `logits()` is the next-token logits of each."""

    @abstractmethod
    def logits(self) -> np.ndarray:
        """float32 array of shape (n_streams, vocab_size) for the next position."""

    @abstractmethod
    def advance(self, token_id: int) -> None:
        """Append one token to every stream, feeding only that token (KV cache)."""

    def advance_many(self, token_ids: Sequence[int]) -> None:
        """`advance` each token in turn; backends may feed them in one pass."""
        for t in token_ids:
            self.advance(t)

    def logits_along(self, token_ids: Sequence[int], batched: bool = False) -> Iterator[np.ndarray]:
        """Teacher forcing (scoring.py): before each of `token_ids`, every stream's next-token
        logits, shape (n_streams, vocab_size), valid until the next item; the group takes
        each token but the last. Stepwise, the numbers are exactly what decoding sees;
        `batched` lets a backend feed several tokens a pass (faster, and rounded otherwise)."""
        for i, token in enumerate(token_ids):
            yield self.logits()
            if i + 1 < len(token_ids):
                self.advance(token)

    # True where `restart` works: back to right after the prompts, as if just opened
    restarts = False

    def restart(self) -> None:
        """Drop every token since the prompts (scoring several continuations of one prompt)."""
        raise NotImplementedError(f"{type(self).__name__} cannot restart")

    # True where `checkpoint` and `rewind` work (speculation.py runs ahead on a draft)
    rewinds = False

    def checkpoint(self) -> object:
        """A mark of where the streams are now, for `rewind`."""
        raise NotImplementedError(f"{type(self).__name__} cannot rewind")

    def rewind(self, mark: object) -> None:
        """Back to `mark` (taken since the last rewind to an earlier one): the tokens
        since are dropped, and the next step computes as if they had never been fed."""
        raise NotImplementedError(f"{type(self).__name__} cannot rewind")

    @property
    def prompt_lengths(self) -> list[int]:
        """Tokens in each stream's prompt."""
        return list(self._prompt_lengths)

    def next_tokens(self) -> list[NextToken]:
        """Each stream's next-token distribution, complete."""
        return [NextToken.local(row) for row in self.logits()]

    def lookahead(self, width: int, depth: int, min_probability: float = 0.0,
                  draft: Sequence[int] = ()) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """The nodes after `draft` and each prefix of it (a device's guess of its next
        tokens), in order; then the tree of stream 0's `width` likeliest next tokens
        after the whole draft, `depth` levels deep, growing children only under nodes
        whose likeliest token has at least `min_probability`: (path, logits after the
        path) for every node, computed lazily as the iteration reaches it (it may stop
        early), children of a node in any order. Leaves the group where it is; an
        `advance` along a path of the latest tree may reuse its work. Only where the
        model's `supports_lookahead` is true (the group opened with `lookahead_depth`
        at least the draft's length plus `depth`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot compute lookahead trees")

    def close(self) -> None:
        """Free the caches; the group is unusable afterwards."""


def vocabulary_digest(pieces: Sequence[bytes]) -> str:
    """SHA-256 of the length-prefixed token bytes in id order."""
    h = hashlib.sha256()
    for piece in pieces:
        h.update(len(piece).to_bytes(4, "little"))
        h.update(piece)
    return h.hexdigest()


def check_window(model_name: str, window: int, prompt_tokens: int, max_new_tokens: int) -> None:
    """The one check that a prompt and its new tokens fit a model's window."""
    if prompt_tokens + max_new_tokens > window:
        raise UserError(
            f"prompt of {prompt_tokens} tokens plus {max_new_tokens} new tokens exceeds "
            f"{model_name}'s window of {window} tokens"
        )


class PrefixRestore(NamedTuple):
    """A saved state to start a stream from (see `LanguageModel.supports_prefix_state`)."""

    state: bytes  # from a group's `snapshots`
    n_tokens: int  # tokens the state holds
    keep: int  # its first tokens that equal the prompt's: the stream prefills from there
    # the next-token logits after all n_tokens (a group's `snapshot_logits`): with them a
    # state that holds the whole prompt (keep == n_tokens == its length) needs no prefill
    logits: np.ndarray | None = None


class PrefixStateError(RuntimeError):
    """The backend refused a saved state (nothing was opened)."""


class BatchEngine(ABC):
    """Many sequences of one model in one shared cache, decoded together (the cloud
    server's batching, transport/server/scheduler.py). Each sequence lives in a slot of
    `slot_tokens` cells. Not thread-safe: one thread drives it.

    A token's logits do not depend on the other slots' contents, and in a forward
    pass of at most `exact_batch` tokens not on the batch either: the same prompt and
    tokens give the same numbers bit for bit whether a session is alone on the server
    or shares it with many (tested on the real backend). Larger batches are faster
    but round differently."""

    slots: int
    slot_tokens: int
    exact_batch: int
    max_batch: int  # tokens in one forward pass

    @abstractmethod
    def prefill(self, slot: int, prompt: Sequence[int], start: int) -> tuple[int, np.ndarray | None]:
        """Feed the next block of `prompt` from `start` into the (empty) slot: where
        the next block starts, and the logits after the prompt once it is all in."""

    @abstractmethod
    def decode(self, entries: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Append token to slot for each (slot, token), at most one entry a slot: the
        logits after each, in order."""

    @abstractmethod
    def free(self, slot: int) -> None:
        """Empty a slot for the next sequence."""

    def close(self) -> None:
        """Release the shared cache."""


class LanguageModel(ABC):
    remote = False  # it runs here (a `StreamSource`)
    # True where open_streams(prompts, n, restore={i: PrefixRestore}, snapshot={i: m})
    # starts stream i from a saved state and puts stream i's state at m prompt tokens
    # in the group's `snapshots[i]` (bytes); then `path` is the model file and
    # `state_version` names all else the state depends on (context_cache/); a kept
    # prefix is a multiple of `prefix_state_block` tokens
    supports_prefix_state = False
    prefix_state_block = 1
    name: str
    vocab_size: int  # width of the logits
    eos_token_ids: frozenset[int]
    context_window: int  # most tokens one stream may hold
    # True where open_streams([prompt], n, lookahead_depth=D) gives a group whose
    # `lookahead` works for trees up to D deep (the cloud server's lookahead)
    supports_lookahead = False

    @abstractmethod
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of text; special-token markup (ChatML tags) is parsed unless
        `special` is False (generated text: a literal "<|im_end|>" stays text)."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, used to detokenize and to compare vocabularies."""

    def special_token_ids(self) -> frozenset[int]:
        """Control tokens (turn markers, padding, end of text): they stand for no text,
        so no other vocabulary shares them."""
        return self.eos_token_ids

    @abstractmethod
    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The model's own chat template applied to messages, ending with the
        assistant turn's opening so generation starts the reply."""

    @abstractmethod
    def open_streams(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> StreamGroup:
        """Prefill each prompt and return the group positioned after them."""

    def open_for_decoding(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, private: Sequence[bool],
                          first_k: int | None) -> StreamGroup:
        """`StreamSource`'s way in: `open_streams` (which prompts are private matters to a
        context cache, the first k to a remote cloud; neither here)."""
        return self.open_streams(prompts, max_new_tokens)

    def open_streams_stepwise(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                              **kwargs) -> tuple[StreamGroup, Iterator[None]]:
        """`open_streams` with the prefill left to the caller: run the iterator to its end,
        one bounded piece of work a step (the server interleaves them with other sessions'
        batches), before using the group. Here: all done at once."""
        return self.open_streams(prompts, max_new_tokens, **kwargs), iter(())

    def batch_engine(self, slots: int, slot_tokens: int, max_batch: int | None = None) -> BatchEngine | None:
        """A shared cache for `slots` sequences of up to `slot_tokens` tokens that decodes
        up to `max_batch` tokens (default: its `exact_batch`) in one forward pass; None
        where the backend cannot batch (the server then runs one session at a time)."""
        return None

    def encode_chat(self, messages: Sequence[ChatMessage]) -> Sequence[int]:
        """The prompt `open_streams` takes for these messages."""
        return self.tokenize(self.render_chat(messages))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")

    def vocabulary_fingerprint(self) -> list[bytes]:
        """Every token's bytes, in id order; equal lists mean a shared tokenizer."""
        return [self.token_bytes(i) for i in range(self.vocab_size)]

    def vocabulary_digest(self) -> str:
        """SHA-256 of the length-prefixed token bytes: compares vocabularies across a network."""
        cached = getattr(self, "_vocabulary_digest", None)
        if cached is None:
            cached = self._vocabulary_digest = vocabulary_digest(self.vocabulary_fingerprint())
        return cached

    def close(self) -> None:
        """Release the model's memory."""
