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

import numpy as np

from ..backends.base import LanguageModel
from ..cloud import CloudSession, RemoteCloud
from ..distribution import NextToken
from ..errors import UserError
from ..prompts import PublicChat
from .wire import CloudRefused, WireClient

DEFAULT_MAX_K = 20  # vLLM's default --max-logprobs
# Servers print log-probabilities as decimals, often from float32: each listed
# probability may be off by about this much, relative.
PRINTED_LOGPROB_SLACK = 1e-6


class OpenAICloud(RemoteCloud):
    def __init__(self, wire: WireClient, tokenizer: LanguageModel, model_name: str | None = None, max_k: int = DEFAULT_MAX_K) -> None:
        super().__init__(tokenizer)
        self._wire = wire
        self.max_k = max_k
        self.vocab_size = tokenizer.vocab_size
        self.context_window = tokenizer.context_window
        self.eos_token_ids = tokenizer.eos_token_ids
        if model_name is None:
            listed = (wire.request("GET", "/models") or {}).get("data") or [{}]
            model_name = listed[0].get("id", "default") if isinstance(listed[0], dict) else "default"
        self.model_name = model_name
        self.name = f"{model_name} at {wire.base_url}"
        self.prompt_as_text = False  # learned on the first refusal of token ids
        self.asked_with_ids = False  # a token-id prompt has been accepted once
        self._by_text: dict[str, int] | None = None

    def vocabulary_digest(self) -> str:
        return self.tokenizer.vocabulary_digest()  # assumed shared: see the module docstring

    def token_for_text(self, text: str) -> int | None:
        """The id a server's token string stands for; None when several ids print alike."""
        if self._by_text is None:
            seen: dict[str, int] = {}
            ambiguous: set[str] = set()
            for i in range(self.vocab_size):
                key = self.tokenizer.token_bytes(i).decode("utf-8", errors="ignore")
                if key in seen:
                    ambiguous.add(key)
                seen[key] = i
            self._by_text = {k: v for k, v in seen.items() if k not in ambiguous}
        return self._by_text.get(text)

    def open_session(self, chat: PublicChat, max_new_tokens: int, first_k: int | None) -> CloudSession:
        # the server caps k and sends no full vector: every step asks for the cap
        return OpenAISession(self, list(self.tokenizer.encode_chat(self.encode_chat(chat))))

    def complete(self, prompt: list[int], generated: list[int]) -> dict:
        """One-token completion with the server's top logprobs after prompt + generated."""
        body = {"model": self.model_name, "max_tokens": 1, "temperature": 0, "logprobs": self.max_k}
        if not self.prompt_as_text:
            try:
                reply = self._wire.request("POST", "/completions", {**body, "prompt": prompt + generated})
            except CloudRefused as exc:
                # llama-cpp-python's server answers a token-id prompt with 500 (a validation
                # error), vLLM accepts it: a refusal of the very first request means "send text"
                if exc.status == 401 or self.asked_with_ids:
                    raise
                self.prompt_as_text = True
            else:
                self.asked_with_ids = True
                return reply
        return self._wire.request("POST", "/completions", {**body, "prompt": self.tokenizer.detokenize(prompt + generated)})

    def close(self) -> None:
        self._wire.close()


class OpenAISession(CloudSession):
    def __init__(self, cloud: OpenAICloud, prompt_ids: list[int]) -> None:
        self._cloud = cloud
        self._prompt = prompt_ids
        self.prompt_tokens = len(prompt_ids)
        self._generated: list[int] = []
        self._start = cloud._wire.counters.copy()
        self.skipped_entries = 0  # top-logprob strings that map to no single token id
        self.eos_without_logprobs = 0
        self._fetch()

    def _fetch(self) -> None:
        cloud = self._cloud
        reply = cloud.complete(self._prompt, self._generated)
        try:
            choice = reply["choices"][0]
            tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
            top = tops[0] if tops else {}
            if not isinstance(top, dict):
                raise TypeError
        except (KeyError, IndexError, TypeError, AttributeError):
            raise UserError("the cloud's answer is not an OpenAI completion with logprobs") from None
        if not top and choice.get("finish_reason") == "stop":
            # The server chose end-of-sequence and sends no logprobs with it (llama-cpp-python
            # does this): we know the cloud's argmax, not its distribution. Treat it as certain.
            self.eos_without_logprobs += 1
            eos = np.array([min(cloud.eos_token_ids)], dtype=np.int64)
            self._view = NextToken(np.zeros(1, dtype=np.float32), 0.0, cloud.vocab_size, ids=eos)
            return
        if not top:
            raise UserError("the cloud's completion carries no top_logprobs: does it support `logprobs`?")
        pairs = []
        for text, logprob in top.items():
            token = cloud.token_for_text(text)
            if token is None or not isinstance(logprob, (int, float)) or not logprob <= 0:
                self.skipped_entries += 1
            else:
                pairs.append((float(logprob), token))
        if not pairs:
            raise UserError(
                f"none of the {len(top)} tokens the cloud listed maps to a single token id of the device's "
                "tokenizer (several ids print alike, or the cloud's tokenizer differs); the step cannot be fused"
            )
        pairs.sort(key=lambda p: (-p[0], p[1]))
        # log-probabilities already: lse = 0; the cap is final, so nothing can widen
        self._view = NextToken(
            np.array([lp for lp, _ in pairs], dtype=np.float32), 0.0, cloud.vocab_size,
            ids=np.array([t for _, t in pairs], dtype=np.int64),
            exact_top=len(pairs) == len(top),  # a dropped entry leaves a hole: min_K bounds nothing
            mass_slack=PRINTED_LOGPROB_SLACK * len(pairs),
        )

    def next_tokens(self) -> list[NextToken]:
        return [self._view]

    def widen(self, k: int | None) -> None:
        raise AssertionError("an OpenAI-compatible cloud's views never offer to widen")

    def advance(self, token_id: int) -> None:
        self._generated.append(int(token_id))
        self._fetch()

    def traffic(self) -> dict:
        report = self._cloud._wire.counters.since(self._start)
        report["prompt_as_text"] = self._cloud.prompt_as_text
        report["unmapped_top_entries"] = self.skipped_entries
        report["eos_without_logprobs"] = self.eos_without_logprobs
        return report
