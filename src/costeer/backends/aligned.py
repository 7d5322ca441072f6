"""A device model that follows a cloud model of another tokenizer.

The decoding loop picks cloud tokens and feeds them to every group. `AlignedModel`
wraps the device model so that its groups take cloud tokens and give rows over the
cloud's vocabulary (`VocabularyMap.project`); every policy then works unchanged.

Keeping in step, without drift: both prefixes must spell the same text. A cloud
token that the device spells with one token of its own goes in as that token. Any
other is re-tokenized by the device as text (plain text: a literal "<|im_end|>"
stays text) and goes in as the tokens that spell it; bytes that are not UTF-8 go in
as the device's one-byte tokens (byte fallback). A cloud token that ends inside
a UTF-8 character (byte-level BPE splits some) waits until the character completes;
until then the device is behind and the step goes unsteered (delta 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..vocabulary_map import VocabularyMap
from .base import ChatMessage, LanguageModel, StreamGroup


@dataclass
class AlignmentStats:
    """How the device followed the cloud's tokens."""

    shared_vocabulary: int  # cloud tokens the device spells with one token
    steps: int = 0  # cloud tokens fed
    shared_steps: int = 0  # fed as the device's own one token
    retokenized_steps: int = 0  # outside the shared vocabulary: re-tokenized as text
    deferred_steps: int = 0  # ended inside a character: fed with the next token, the next step unsteered
    device_tokens: int = 0  # device tokens fed in all
    unspellable_bytes: int = 0  # non-UTF-8 bytes the device has no token for (read as U+FFFD): drift

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["outside_shared_vocabulary_rate"] = (self.retokenized_steps + self.deferred_steps) / self.steps if self.steps else 0.0
        return d


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of data that ends on a character boundary (an
    invalid byte counts as a character: it decodes to U+FFFD either way)."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead < 0x80:  # ASCII, then perhaps stray continuation bytes that nothing can complete
            return len(data)
        if lead >= 0xC0:  # a lead byte: how many bytes its character needs
            need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)  # only continuation bytes: not a character we can wait for


class AlignedStreams(StreamGroup):
    """A device group driven by cloud tokens (see the module's docstring)."""

    def __init__(self, inner: StreamGroup, device: LanguageModel, vocabulary: VocabularyMap,
                 cloud_pieces: Sequence[bytes], byte_ids: dict[int, int]) -> None:
        self._inner = inner
        self._device = device
        self._map = vocabulary
        self._cloud_pieces = cloud_pieces
        self._byte_ids = byte_ids
        self.pending = b""  # cloud bytes the device has not read yet (an unfinished character)
        self.fed: list[int] = []  # device tokens read after the prompt: they spell the cloud's text
        self.stats = AlignmentStats(shared_vocabulary=vocabulary.shared)
        self._prompt_lengths = inner.prompt_lengths

    @property
    def snapshots(self) -> dict[int, bytes]:
        """The device's saved prefill, for the context cache."""
        return self._inner.snapshots

    @property
    def snapshot_logits(self) -> dict[int, np.ndarray]:
        """The device's logits after a prompt saved whole, for the context cache."""
        return getattr(self._inner, "snapshot_logits", {})

    def logits(self) -> np.ndarray:
        if self.pending:  # behind by part of a character: no delta at this position
            return VocabularyMap.unsteered(len(self._prompt_lengths), self._map.cloud_vocab_size)
        return self._map.project(self._inner.logits())

    def advance(self, token_id: int) -> None:
        self._inner.advance_many(self._follow(token_id))

    def advance_many(self, token_ids: Sequence[int]) -> None:
        self._inner.advance_many([d for t in token_ids for d in self._follow(t)])

    def _follow(self, token_id: int) -> list[int]:
        """The device tokens that take the device past cloud token `token_id` (counted)."""
        stats = self.stats
        stats.steps += 1
        piece = self._cloud_pieces[token_id]
        device_id = None if self.pending else self._map.device_id(token_id)
        if device_id is not None:
            stats.shared_steps += 1
            return self._fed([device_id])
        data = self.pending + piece
        cut = _complete_utf8_prefix(data)
        self.pending = data[cut:]
        if self.pending:
            stats.deferred_steps += 1
        else:
            stats.retokenized_steps += 1
        return self._fed(self._spell(data[:cut]))

    def _spell(self, data: bytes) -> list[int]:
        """Device tokens that spell `data` exactly: its text re-tokenized as plain text,
        and bytes that are not UTF-8 (byte-level tokens can make such) as the device's
        one-byte tokens (byte fallback)."""
        ids: list[int] = []
        while data:
            try:
                text, bad, data = data.decode("utf-8"), b"", b""
            except UnicodeDecodeError as exc:
                text, bad, data = data[:exc.start].decode("utf-8"), data[exc.start:exc.end], data[exc.end:]
            if text:
                ids += self._device.tokenize(text, special=False)
            for byte in bad:
                if byte not in self._byte_ids:  # a device without byte fallback: reported, not hidden
                    self.stats.unspellable_bytes += 1
                    ids += self._device.tokenize(bytes([byte]).decode("utf-8", "replace"), special=False)
                else:
                    ids.append(self._byte_ids[byte])
        return ids

    def _fed(self, ids: list[int]) -> list[int]:
        self.fed.extend(ids)
        self.stats.device_tokens += len(ids)
        return ids

    def alignment(self) -> dict | None:
        return self.stats.as_dict()

    def close(self) -> None:
        self._inner.close()


class AlignedModel(LanguageModel):
    """The device model as the decoding loop sees it beside a cloud of another
    vocabulary: prompts in the device's own tokens (its own chat template), steps in
    the cloud's tokens, logits over the cloud's vocabulary."""

    def __init__(self, device: LanguageModel, cloud_pieces: Sequence[bytes], cloud_special: frozenset[int],
                 cloud_eos: frozenset[int]) -> None:
        self.device = device
        self.name = device.name
        self.vocab_size = len(cloud_pieces)
        self.eos_token_ids = cloud_eos
        self.context_window = device.context_window
        self._cloud_pieces = cloud_pieces
        device_pieces = device.vocabulary_fingerprint()
        device_special = device.special_token_ids()
        self.map = VocabularyMap.between(cloud_pieces, device_pieces, cloud_special, device_special)
        # the device's one-byte tokens, to spell bytes that are not UTF-8 text
        self._byte_ids: dict[int, int] = {}
        for i, piece in enumerate(device_pieces):
            if len(piece) == 1 and i not in device_special:
                self._byte_ids.setdefault(piece[0], i)
        # the context cache saves and restores the device's own prefill
        self.supports_prefix_state = device.supports_prefix_state
        self.prefix_state_block = device.prefix_state_block

    def __getattr__(self, name: str):  # the device's file and state version, for the context cache
        if name in ("path", "state_version"):
            return getattr(self.device, name)
        raise AttributeError(name)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.device.tokenize(text, special)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.device.detokenize(token_ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._cloud_pieces[token_id]  # the ids the loop feeds are the cloud's

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return self.device.render_chat(messages)

    def open_streams(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs) -> StreamGroup:
        # the device may need more tokens than the cloud for the same text: room for 4x
        inner = self.device.open_streams(prompts, self._device_budget(prompts, max_new_tokens), **kwargs)
        return AlignedStreams(inner, self.device, self.map, self._cloud_pieces, self._byte_ids)

    def open_streams_stepwise(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                              **kwargs) -> tuple[StreamGroup, Iterator[None]]:
        inner, steps = self.device.open_streams_stepwise(prompts, self._device_budget(prompts, max_new_tokens), **kwargs)
        return AlignedStreams(inner, self.device, self.map, self._cloud_pieces, self._byte_ids), steps

    def _device_budget(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
        room = self.device.context_window - max(len(p) for p in prompts)
        return max(max_new_tokens, min(4 * max_new_tokens, room))

    def close(self) -> None:
        self.device.close()
