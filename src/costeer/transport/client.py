"""The cloud model as the device sees it: a `LanguageModel` behind `costeer serve`."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..backends.base import ChatMessage, LanguageModel, StreamGroup
from ..distribution import NextToken, top_k
from .protocol import API_PREFIX, FLOATS, IDS, decode_array
from .wire import WireClient


class PublicChat(list):
    """The public conversation, sent as messages: the server applies its own template."""


class RemoteCloudModel(LanguageModel):
    local = False

    def __init__(self, wire: WireClient, tokenizer: LanguageModel, prefetch_k: int = 64) -> None:
        self._wire = wire
        self._tokenizer = tokenizer  # the device model: the vocabulary is shared (checked)
        self.prefetch_k = prefetch_k
        info = wire.request("GET", f"{API_PREFIX}/model")
        self.name = f"{info['name']} at {wire.base_url}"
        self.vocab_size = int(info["vocab_size"])
        self.context_window = int(info["context_window"])
        self.eos_token_ids = frozenset(info["eos_token_ids"])
        self._digest = info["vocabulary_sha256"]

    def vocabulary_digest(self) -> str:
        return self._digest

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.tokenize(text)

    def token_bytes(self, token_id: int) -> bytes:
        return self._tokenizer.token_bytes(token_id)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        raise NotImplementedError("the cloud renders its own chat template")

    def encode_chat(self, messages: Sequence[ChatMessage]) -> PublicChat:
        return PublicChat(messages)

    def open_streams(self, prompts: Sequence[Sequence], max_new_tokens: int) -> StreamGroup:
        if len(prompts) != 1 or not isinstance(prompts[0], PublicChat):
            raise ValueError("a remote cloud session holds one public conversation")
        return RemoteStreams(self._wire, list(prompts[0]), max_new_tokens, self.prefetch_k, self.vocab_size)

    def close(self) -> None:
        self._wire.close()


class RemoteStreams(StreamGroup):
    remote = True

    def __init__(self, wire: WireClient, messages: list[ChatMessage], max_new_tokens: int, prefetch_k: int, vocab_size: int) -> None:
        self._wire = wire
        self._prefetch_k = prefetch_k
        self.vocab_size = vocab_size
        self._start = wire.counters.copy()
        opened = wire.request("POST", f"{API_PREFIX}/sessions",
                              {"messages": messages, "max_new_tokens": max_new_tokens, "top_k": prefetch_k})
        self._session = opened["session_id"]
        self._prompt_lengths = [opened["prompt_tokens"]]
        self._store(opened["distribution"])

    def _store(self, dist: dict) -> None:
        self._lse = float(dist["lse"])
        if dist.get("full_logits_b64"):
            self._full = decode_array(dist["full_logits_b64"], FLOATS).astype(np.float32)
            self._ids, self._logits = None, None
        else:
            self._full = None
            self._ids = decode_array(dist["top_ids_b64"], IDS).astype(np.int64)
            self._logits = decode_array(dist["top_logits_b64"], FLOATS).astype(np.float32)

    def _step(self, tokens: list[int], k: int | None) -> None:
        self._store(self._wire.request("POST", f"{API_PREFIX}/sessions/{self._session}/step", {"tokens": tokens, "top_k": k}))

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        if self._full is not None:
            return (*top_k(self._full, k), self._lse)
        if k > len(self._ids):
            self._step([], k if k < self.vocab_size else None)  # ask for more at the same position
            return self.top(k)
        return self._ids[:k], self._logits[:k], self._lse

    def full(self) -> tuple[np.ndarray, float]:
        if self._full is None:
            self._step([], None)
        return self._full, self._lse

    def logits(self) -> np.ndarray:
        return self.full()[0][None, :]

    def next_tokens(self) -> list[NextToken]:
        return [_RemoteNextToken(self)]

    def advance(self, token_id: int) -> None:
        self._step([int(token_id)], self._prefetch_k)

    def traffic(self) -> dict:
        return self._wire.counters.since(self._start)

    def close(self) -> None:
        if self._session:
            session, self._session = self._session, None
            try:
                self._wire.request("DELETE", f"{API_PREFIX}/sessions/{session}")
            except Exception:
                pass  # the server expires it anyway


class _RemoteNextToken(NextToken):
    local = False
    max_k = None  # `costeer serve` sends up to the full vector

    def __init__(self, streams: RemoteStreams) -> None:
        self._streams = streams
        self.vocab_size = streams.vocab_size

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        return self._streams.top(k)

    def full(self) -> tuple[np.ndarray, float]:
        return self._streams.full()
