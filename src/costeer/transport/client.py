"""The cloud model behind `costeer serve`, as the device sees it."""

from __future__ import annotations

import numpy as np

from ..backends.base import LanguageModel
from ..cloud import CloudSession, RemoteCloud
from ..distribution import NextToken
from ..prompts import PublicChat
from .protocol import API_PREFIX, FLOATS, IDS, decode_array
from .wire import WireClient


class ServedCloud(RemoteCloud):
    """`costeer serve`: sends any k up to the full vector, so every step can be certified."""

    def __init__(self, wire: WireClient, tokenizer: LanguageModel) -> None:
        super().__init__(tokenizer)
        self._wire = wire
        info = wire.request("GET", f"{API_PREFIX}/model")
        self.name = f"{info['name']} at {wire.base_url}"
        self.vocab_size = int(info["vocab_size"])
        self.context_window = int(info["context_window"])
        self.eos_token_ids = frozenset(info["eos_token_ids"])
        self._digest = info["vocabulary_sha256"]

    def vocabulary_digest(self) -> str:
        return self._digest

    def open_session(self, chat: PublicChat, max_new_tokens: int, first_k: int | None) -> CloudSession:
        return ServedSession(self._wire, self.encode_chat(chat), max_new_tokens, first_k, self.vocab_size)

    def close(self) -> None:
        self._wire.close()


class ServedSession(CloudSession):
    def __init__(self, wire: WireClient, chat: PublicChat, max_new_tokens: int, first_k: int | None, vocab_size: int) -> None:
        self._wire = wire
        self._first_k = first_k if first_k is not None and first_k < vocab_size else None
        self.vocab_size = vocab_size
        self._capped = False  # the server sent fewer values than asked: it has a cap of its own
        self._start = wire.counters.copy()
        opened = wire.request("POST", f"{API_PREFIX}/sessions",
                              {"messages": list(chat), "max_new_tokens": max_new_tokens, "top_k": self._first_k})
        self._session = opened["session_id"]
        self.prompt_tokens = int(opened["prompt_tokens"])
        self._store(opened["distribution"], self._first_k)

    def _store(self, dist: dict, asked: int | None) -> None:
        lse = float(dist["lse"])
        if dist.get("full_logits_b64"):
            logits = decode_array(dist["full_logits_b64"], FLOATS).astype(np.float32)
            self._view = NextToken(logits, lse, self.vocab_size)
            return
        ids = decode_array(dist["top_ids_b64"], IDS).astype(np.int64)
        logits = decode_array(dist["top_logits_b64"], FLOATS).astype(np.float32)
        if asked is None or len(ids) < asked:
            self._capped = True  # never ask this server for more than it sends
        self._view = NextToken(logits, lse, self.vocab_size, ids=ids, can_widen=not self._capped)

    def _step(self, tokens: list[int], k: int | None) -> None:
        reply = self._wire.request("POST", f"{API_PREFIX}/sessions/{self._session}/step", {"tokens": tokens, "top_k": k})
        self._store(reply, k)

    def next_tokens(self) -> list[NextToken]:
        return [self._view]

    def widen(self, k: int | None) -> None:
        self._step([], k if k is not None and k < self.vocab_size else None)

    def advance(self, token_id: int) -> None:
        self._step([int(token_id)], self._first_k)

    def traffic(self) -> dict:
        return self._wire.counters.since(self._start)

    def close(self) -> None:
        if self._session:
            session, self._session = self._session, None
            try:
                self._wire.request("DELETE", f"{API_PREFIX}/sessions/{session}")
            except Exception:
                pass  # the server expires it anyway
