"""Completion servers that send their top logprobs as the cloud: vLLM and any
OpenAI-compatible server (`openai+URL`), and llama.cpp's `llama-server` through its
native `/completion` route (`llama-server+URL`, see llama_server.py).

Each step is a one-token completion asking for the server's k likeliest next tokens
after the prompt and the tokens chosen so far, sent as token ids. Where the server
names those tokens by id (vLLM with `return_tokens_as_token_ids`, llama-server
always), the top-k is exact and the certificate in certified.py can ask again at
the same position for a larger k, up to the whole vocabulary, just as it does
against `costeer serve`: every step is then exact relative to the server's own
distribution. What a server cannot do is detected and reported, not hidden:
- a cap on k (vLLM's --max-logprobs, 20 by default; -1 lifts it) is learned from
  its refusal; steps the cap leaves unsettled are chosen inside the top-k and
  counted as uncertified;
- entries keyed by token text (llama-cpp-python's server) map to an id only where a
  single id prints that way; the rest are counted as unmapped;
- a server that refuses token-id prompts gets text, which it re-tokenizes.

The server's tokenizer must be the device model's: where the server can tokenize
(`/tokenize`), a probe text is tokenized on both sides and compared at connect.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from dataclasses import dataclass
from typing import ContextManager, Sequence

import numpy as np

from ...backends.base import LanguageModel
from ...cloud import CloudSession, RemoteCloud
from ...distribution import NextToken, check_token_ids
from ...errors import UserError
from ...prompts import PublicChat
from ..wire import CloudRefused, WireClient, printable

DEFAULT_MAX_K = 20  # vLLM's default --max-logprobs: the cap assumed when a refusal names none
# Probabilities come from a float32 softmax summed one term at a time (llama-server) or
# by a vectorized reduction (vLLM): each sum may fall short of the true normalizer by
# up to n * 2**-24 relative, so the listed probabilities may sum that much too high.
FLOAT32_SUM_ERROR = 2.0**-24
# ... and each printed log-probability is rounded to float32 (relative 2**-24 on p).
PRINTED_LOGPROB_SLACK = 2.0**-23
# Text with merges, bytes and several scripts, tokenized on both sides at connect.
TOKENIZER_PROBE = "CoSteer checks tokenizers: naïve café, 東京, 🎉 — x**2 + y_1 >= 10\n\tdef f(): return 'ok'"
_CAP_IN_REFUSAL = re.compile(r"(?:max(?:imum)?(?: allowed)?|at most|<=)\D{0,20}(\d+)", re.IGNORECASE)
_ID_KEY = re.compile(r"token_id:(-?\d+)")  # vLLM's key for an entry named by id


@dataclass
class TopEntries:
    """One answer: (logprob, token id) pairs, likeliest first, and what was lost."""

    pairs: list[tuple[float, int]]
    listed: int  # how many entries the server sent
    unmapped: int = 0  # entries whose token text maps to no single id
    eos_without_logprobs: bool = False  # the server stopped and sent no distribution


class TopLogprobsCloud(RemoteCloud):
    """A server that answers "the top-k logprobs after these token ids"; subclasses
    say how to ask (`ask`) and how to check the tokenizer (`tokenize`)."""

    kind: str

    def __init__(self, wire: WireClient, tokenizer: LanguageModel, max_k: int | None) -> None:
        super().__init__(tokenizer)
        self._wire = wire
        self.max_k = max_k  # the server's cap on k, where given or learned (None: none known)
        self.vocab_size = tokenizer.vocab_size
        self.context_window = tokenizer.context_window
        self.eos_token_ids = tokenizer.eos_token_ids
        self.tokenizer_checked = False

    def vocabulary_digest(self) -> str:
        return self.tokenizer.vocabulary_digest()  # checked by probe where the server allows: check_tokenizer

    @abstractmethod
    def ask(self, ids: list[int], k: int) -> TopEntries:
        """The server's k likeliest next tokens after `ids` (one request)."""

    def tokenize(self, text: str) -> list[int] | None:
        """The server's token ids for `text` (None: the server cannot say)."""
        return None

    def check_tokenizer(self) -> None:
        try:
            theirs = self.tokenize(TOKENIZER_PROBE)
        except CloudRefused as exc:
            if exc.status in (401, 403):
                raise
            theirs = None  # no tokenize route: trusted, as documented
        if theirs is None:
            return
        ours = self.tokenizer.tokenize(TOKENIZER_PROBE)
        if list(theirs) != list(ours):
            raise UserError(
                f"the cloud at {self._wire.base_url} tokenizes differently from the device model "
                f"{self.tokenizer.name} ({len(theirs)} vs {len(ours)} tokens for the same probe text): "
                "CoSteer needs the two models to share a tokenizer"
            )
        self.tokenizer_checked = True

    def ask_within_cap(self, ids: list[int], k: int | None) -> tuple[TopEntries, int]:
        """`ask` for k (None: the whole vocabulary), lowered to the server's cap; a cap
        the server refuses with is learned from its answer. Returns (entries, k used)."""
        k = self.vocab_size if k is None else min(k, self.vocab_size)
        if self.names_ids is False:
            # entries keyed by text: asking for more cannot make a step exact (some ids
            # stay unnamed), so every step asks for the cap once, as many as it allows
            k = self.max_k or DEFAULT_MAX_K
        if self.max_k is not None:
            k = min(k, self.max_k)
        try:
            entries = self.ask(ids, k)
        except CloudRefused as exc:
            cap = _cap_in(exc, k)
            if cap is None:
                raise
            self.max_k = cap
            entries, k = self.ask(ids, cap), cap
        if self.names_ids and 0 < entries.listed < k:
            self.max_k = entries.listed  # fewer than asked: a silent cap
        return entries, min(k, max(entries.listed, 1))

    @property
    def names_ids(self) -> bool | None:
        """Whether the server names its entries by token id (None: not known yet)."""
        return True

    def can_send_more(self, k: int) -> bool:
        return bool(self.names_ids) and k < self.vocab_size and (self.max_k is None or k < self.max_k)

    def open_session(self, chat: PublicChat, max_new_tokens: int, first_k: int | None) -> CloudSession:
        return TopLogprobsSession(self, list(self.tokenizer.encode_chat(self.encode_chat(chat))), first_k)

    def traffic_notes(self) -> dict:
        return {"cloud_kind": self.kind, "logprobs_cap": self.max_k, "tokenizer_checked": self.tokenizer_checked}

    def recording(self) -> ContextManager[list[dict]]:
        return self._wire.recording()

    def close(self) -> None:
        self._wire.close()


def _cap_in(exc: CloudRefused, asked: int) -> int | None:
    """The cap a 400 refusal of `asked` logprobs names (vLLM: "... greater than max
    allowed: 20"), else the usual default where that is below what was asked."""
    if exc.status != 400 or "logprob" not in str(exc).lower():
        return None
    found = [int(n) for n in _CAP_IN_REFUSAL.findall(str(exc)) if 0 < int(n) < asked]
    if found:
        return found[-1]
    return DEFAULT_MAX_K if asked > DEFAULT_MAX_K else None


class OpenAICloud(TopLogprobsCloud):
    """`/v1/completions` of vLLM or any OpenAI-compatible server."""

    kind = "openai"

    def __init__(self, wire: WireClient, tokenizer: LanguageModel, model_name: str | None = None,
                 max_k: int | None = None) -> None:
        super().__init__(wire, tokenizer, max_k)
        if model_name is None:
            listed = (wire.request("GET", "/models") or {}).get("data") or [{}]
            model_name = listed[0].get("id", "default") if isinstance(listed[0], dict) else "default"
        self.model_name = model_name
        self.name = f"{printable(str(model_name))} at {wire.base_url}"
        self.prompt_as_text = False  # learned on the first refusal of token ids
        self.asked_with_ids = False  # a token-id prompt has been accepted once
        self.entries_by_id: bool | None = None  # the server keys entries as token_id:N (vLLM)
        self._by_text: dict[str, int] | None = None
        self.check_tokenizer()

    def tokenize(self, text: str) -> list[int] | None:
        # vLLM's /tokenize sits beside /v1, not under it
        root = self._wire.base_url.removesuffix("/v1")
        if root == self._wire.base_url:
            return None
        try:
            # vLLM reads `prompt`, llama-server `content`; each ignores the other's fields
            answer = self._wire.request("POST", f"{root}/tokenize", {
                "model": self.model_name, "prompt": text, "add_special_tokens": False, "content": text, "add_special": False})
        except CloudRefused as exc:
            if exc.status in (404, 405, 501):
                return None
            raise
        tokens = (answer or {}).get("tokens")
        if isinstance((answer or {}).get("max_model_len"), int):
            self.context_window = min(self.context_window, answer["max_model_len"])
        return tokens if isinstance(tokens, list) else None

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

    def _complete(self, ids: list[int], k: int) -> dict:
        body = {"model": self.model_name, "max_tokens": 1, "temperature": 0, "logprobs": k,
                "return_tokens_as_token_ids": True}  # vLLM: entries keyed "token_id:N"; others ignore it
        if not self.prompt_as_text:
            try:
                reply = self._wire.request("POST", "/completions", {**body, "prompt": ids})
            except CloudRefused as exc:
                # llama-cpp-python's server answers a token-id prompt with 500 (a validation
                # error), vLLM accepts it: a refusal of the very first request means "send text"
                if exc.status in (401, 403) or "logprob" in str(exc).lower() or self.asked_with_ids:
                    raise
                self.prompt_as_text = True
            else:
                self.asked_with_ids = True
                return reply
        return self._wire.request("POST", "/completions", {**body, "prompt": self.tokenizer.detokenize(ids)})

    def ask(self, ids: list[int], k: int) -> TopEntries:
        reply = self._complete(ids, k)
        try:
            choice = reply["choices"][0]
            top = _first_top_logprobs(choice.get("logprobs") or {})
        except (KeyError, IndexError, TypeError, AttributeError):
            raise UserError("the cloud's answer is not an OpenAI completion with logprobs") from None
        if not top and choice.get("finish_reason") == "stop":
            # The server chose end-of-sequence and sends no logprobs with it (llama-cpp-python
            # does this): we know the cloud's argmax, not its distribution.
            return TopEntries([], 0, eos_without_logprobs=True)
        if not top:
            raise UserError("the cloud's completion carries no top_logprobs: does it support `logprobs`?")
        pairs, unmapped = [], 0
        for key, logprob in top:
            token = self._token_id(key)
            if token is None or not isinstance(logprob, (int, float)) or not logprob <= 0:
                unmapped += 1
            else:
                pairs.append((float(logprob), token))
        return TopEntries(pairs, len(top), unmapped)

    def _token_id(self, key: str | int) -> int | None:
        """An entry's id: given (llama-server), as "token_id:N" (vLLM), or looked up by text.
        An id outside the vocabulary is an error, never used."""
        by_id = _ID_KEY.fullmatch(key) if isinstance(key, str) else None
        if isinstance(key, int) or by_id:
            self.entries_by_id = True
            token = key if isinstance(key, int) else int(by_id.group(1))
            check_token_ids([token], self.vocab_size, f"the cloud at {self._wire.base_url}")
            return token
        self.entries_by_id = False
        return self.token_for_text(key)

    @property
    def names_ids(self) -> bool | None:
        return self.entries_by_id

    def traffic_notes(self) -> dict:
        return {**super().traffic_notes(), "prompt_as_text": self.prompt_as_text, "entries_by_id": self.entries_by_id}


def _first_top_logprobs(logprobs: dict) -> list[tuple[str | int, object]]:
    """The first position's entries as (text, or id where given; logprob), from the
    legacy completions shape ({"top_logprobs": [{text: logprob}]}: OpenAI, vLLM) or
    the chat shape ({"content": [{"top_logprobs": [{"id", "token", "logprob"}]}]}:
    llama-server's OpenAI route)."""
    if "content" in logprobs and "top_logprobs" not in logprobs:
        content = logprobs["content"] or [{}]
        entries = content[0].get("top_logprobs") or []
        return [(e["id"] if isinstance(e.get("id"), int) else e["token"], e.get("logprob")) for e in entries]
    tops = logprobs.get("top_logprobs") or [{}]
    if not isinstance(tops[0], dict):
        raise TypeError
    return list(tops[0].items())


class TopLogprobsSession(CloudSession):
    def __init__(self, cloud: TopLogprobsCloud, prompt_ids: list[int], first_k: int | None) -> None:
        self._cloud = cloud
        self._prompt = prompt_ids
        self._first_k = first_k
        self.prompt_tokens = len(prompt_ids)
        self._generated: list[int] = []
        self._start = cloud._wire.counters.copy()
        self.unmapped_entries = 0  # top-logprob strings that map to no single token id
        self.eos_without_logprobs = 0
        self._fetch(first_k)

    def _fetch(self, k: int | None) -> None:
        cloud = self._cloud
        entries, used = cloud.ask_within_cap(self._prompt + self._generated, k)
        self.unmapped_entries += entries.unmapped
        if entries.eos_without_logprobs:
            # the cloud's argmax is known, not its distribution: treat it as certain
            self.eos_without_logprobs += 1
            eos = np.array([min(cloud.eos_token_ids)], dtype=np.int64)
            self._view = NextToken(np.zeros(1, dtype=np.float32), 0.0, cloud.vocab_size, ids=eos)
            return
        if not entries.pairs:
            raise UserError(
                f"none of the {entries.listed} tokens the cloud listed maps to a single token id of the device's "
                "tokenizer (several ids print alike, or the cloud's tokenizer differs); the step cannot be fused"
            )
        pairs = sorted(entries.pairs, key=lambda p: (-p[0], p[1]))
        # log-probabilities already: lse = 0
        self._view = NextToken(
            np.array([lp for lp, _ in pairs], dtype=np.float32), 0.0, cloud.vocab_size,
            ids=np.array([t for _, t in pairs], dtype=np.int64),
            exact_top=entries.unmapped == 0,  # a dropped entry leaves a hole: min_K bounds nothing
            can_widen=cloud.can_send_more(used),
            mass_slack=cloud.vocab_size * FLOAT32_SUM_ERROR + len(pairs) * PRINTED_LOGPROB_SLACK,
        )

    def next_tokens(self) -> list[NextToken]:
        return [self._view]

    def widen(self, k: int | None) -> None:
        self._fetch(k)

    def advance(self, token_id: int, draft: Sequence[int] = ()) -> None:
        self._generated.append(int(token_id))
        self._fetch(self._first_k)

    def traffic(self) -> dict:
        report = self._cloud._wire.counters.since(self._start)
        report.update(self._cloud.traffic_notes())
        report["unmapped_top_entries"] = self.unmapped_entries
        report["eos_without_logprobs"] = self.eos_without_logprobs
        return report
