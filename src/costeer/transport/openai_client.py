"""Any OpenAI-compatible completions server as the cloud (vLLM, llama.cpp, SGLang).

Each step is a one-token completion with `logprobs: k`: the server returns its k
likeliest next tokens. The prompt goes as token ids where the server accepts them
(vLLM does), else as text (llama-cpp-python's server), which the server
re-tokenizes: detokenized output can split differently from the chosen tokens,
so text mode is reported. Servers cap k (vLLM: --max-logprobs, 20 by default) and
never send the full vector: where the certificate needs more than the cap, the
device chooses inside the top-k and counts the step as uncertified.

The server's tokenizer cannot be checked over this API: it must be the device
model's (same vocabulary and token strings), as with `costeer serve`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..backends.base import ChatMessage, LanguageModel, StreamGroup
from ..distribution import NextToken
from ..errors import UserError
from .wire import CloudRefused, WireClient

DEFAULT_MAX_K = 20  # vLLM's default --max-logprobs


class OpenAICloudModel(LanguageModel):
    local = False

    def __init__(self, wire: WireClient, tokenizer: LanguageModel, model_name: str | None = None, max_k: int = DEFAULT_MAX_K) -> None:
        self._wire = wire
        self._tokenizer = tokenizer
        self.max_k = max_k
        self.vocab_size = tokenizer.vocab_size
        self.context_window = tokenizer.context_window
        self.eos_token_ids = tokenizer.eos_token_ids
        if model_name is None:
            listed = (wire.request("GET", "/models") or {}).get("data") or [{}]
            model_name = listed[0].get("id", "default")
        self.model_name = model_name
        self.name = f"{model_name} at {wire.base_url}"
        self.prompt_as_text = False  # learned on the first refusal of token ids
        self.asked_with_ids = False  # a token-id prompt has been accepted once
        self._by_text: dict[str, int] | None = None

    def vocabulary_digest(self) -> str:
        return self._tokenizer.vocabulary_digest()  # assumed shared: see the module docstring

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.tokenize(text)

    def token_bytes(self, token_id: int) -> bytes:
        return self._tokenizer.token_bytes(token_id)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return self._tokenizer.render_chat(messages)

    def token_for_text(self, text: str) -> int | None:
        """The id a server's token string stands for; None when several ids print alike."""
        if self._by_text is None:
            seen: dict[str, int] = {}
            ambiguous: set[str] = set()
            for i in range(self.vocab_size):
                key = self._tokenizer.token_bytes(i).decode("utf-8", errors="ignore")
                if key in seen:
                    ambiguous.add(key)
                seen[key] = i
            self._by_text = {k: v for k, v in seen.items() if k not in ambiguous}
        return self._by_text.get(text)

    def open_streams(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> StreamGroup:
        if len(prompts) != 1:
            raise ValueError("an OpenAI-compatible cloud holds one stream")
        return OpenAIStreams(self, list(prompts[0]))

    def close(self) -> None:
        self._wire.close()


class OpenAIStreams(StreamGroup):
    remote = True

    def __init__(self, model: OpenAICloudModel, prompt_ids: list[int]) -> None:
        self._m = model
        self._tokens = prompt_ids
        self._prompt_lengths = [len(prompt_ids)]
        self._prompt_text = model._tokenizer.detokenize(prompt_ids)
        self._generated: list[int] = []
        self._start = model._wire.counters.copy()
        self.skipped_entries = 0  # top-logprob strings that map to no single token id
        self.eos_without_logprobs = 0
        self._fetch()

    def _fetch(self) -> None:
        m = self._m
        body = {"model": m.model_name, "max_tokens": 1, "temperature": 0, "logprobs": m.max_k}
        if not m.prompt_as_text:
            try:
                reply = m._wire.request("POST", "/completions", {**body, "prompt": self._tokens + self._generated})
            except CloudRefused as exc:
                # llama-cpp-python's server answers a token-id prompt with 500 (a validation
                # error), vLLM accepts it: a refusal of the very first request means "send text"
                if exc.status == 401 or m.asked_with_ids:
                    raise
                m.prompt_as_text = True
            else:
                m.asked_with_ids = True
        if m.prompt_as_text:
            text = self._prompt_text + m._tokenizer.detokenize(self._generated)
            reply = m._wire.request("POST", "/completions", {**body, "prompt": text})
        try:
            choice = reply["choices"][0]
            tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
        except (KeyError, IndexError, TypeError, AttributeError):
            raise UserError("the cloud's answer is not an OpenAI completion") from None
        if not tops and choice.get("finish_reason") == "stop":
            # The server chose end-of-sequence and sends no logprobs with it (llama-cpp-python
            # does this): we know the cloud's argmax, not its distribution. Treat it as certain.
            self.eos_without_logprobs += 1
            self._ids = np.array([min(m.eos_token_ids)], dtype=np.int64)
            self._logprobs = np.zeros(1, dtype=np.float32)
            self._complete = True
            return
        if not tops:
            raise UserError("the cloud's completion carries no top_logprobs: does it support `logprobs`?")
        top = tops[0]
        pairs = []
        for text, logprob in top.items():
            token = m.token_for_text(text)
            if token is None:
                self.skipped_entries += 1
            else:
                pairs.append((logprob, token))
        pairs.sort(key=lambda p: (-p[0], p[1]))
        self._ids = np.array([t for _, t in pairs], dtype=np.int64)
        self._logprobs = np.array([lp for lp, _ in pairs], dtype=np.float32)
        self._complete = len(pairs) == len(top)

    def logits(self) -> np.ndarray:
        raise UserError("an OpenAI-compatible cloud sends its top-k only; this method needs full vectors")

    def next_tokens(self) -> list[NextToken]:
        return [_OpenAINextToken(self)]

    def advance(self, token_id: int) -> None:
        self._generated.append(int(token_id))
        self._fetch()

    def traffic(self) -> dict:
        report = self._m._wire.counters.since(self._start)
        report["prompt_as_text"] = self._m.prompt_as_text
        report["unmapped_top_entries"] = self.skipped_entries
        report["eos_without_logprobs"] = self.eos_without_logprobs
        return report


class _OpenAINextToken(NextToken):
    local = False

    def __init__(self, streams: OpenAIStreams) -> None:
        self._s = streams
        self.vocab_size = streams._m.vocab_size
        self.max_k = len(streams._ids)  # all the server sent
        self.exact_top = streams._complete  # False: an entry is missing, so min_K is no bound

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        return self._s._ids[:k], self._s._logprobs[:k], 0.0  # log-probabilities already: lse = 0

    def full(self) -> tuple[np.ndarray, float]:
        raise UserError("an OpenAI-compatible cloud sends its top-k only; use --fusion closed")
