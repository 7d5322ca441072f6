"""The cloud model behind `costeer serve`, as the device sees it."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable, ContextManager, Literal, Sequence

from ...backends.base import LanguageModel, vocabulary_digest
from ...cloud import CloudSession, RemoteCloud
from ...distribution import NextToken, check_token_ids
from ...errors import UserError
from ...prompts import PublicChat
from ..protocol import API_PREFIX, CPU_LOOKAHEAD, Lookahead, Vocabulary, decode_distribution, decode_tree_node
from ..wire import CloudRefused, CloudUnreachable, WireClient, printable
from .first_k import FirstTopK
from .lookahead import TreeWalk
from .resume import Resumer

log = logging.getLogger(__name__)

# `lookahead="auto"` (the default): the tree a session asks for when a round trip costs at
# least AUTO_LOOKAHEAD_MIN_RTT_S. Measured on this project's CPU cloud (docs/speed.md):
# per-token steps are faster at 20 ms, lookahead 3,1,0.5 at 100 ms, the lines cross near
# 80 ms. A tree never changes the output, only round trips and the cloud's work.
AUTO_LOOKAHEAD = Lookahead(depth=CPU_LOOKAHEAD[0], width=CPU_LOOKAHEAD[1], min_probability=CPU_LOOKAHEAD[2])
AUTO_LOOKAHEAD_MIN_RTT_S = 0.080


class ServedCloud(RemoteCloud):
    """`costeer serve`: sends any k up to the full vector, so every step can be certified.

    With `lookahead`, each reply also carries the distributions after the cloud's own
    likeliest continuations (a tree computed from the public prefix alone); the
    session then walks that tree and sends the tokens it chose in one request when
    the choice leaves it. The output is the same token for token."""

    def __init__(self, wire: WireClient, tokenizer: LanguageModel, lookahead: Lookahead | Literal["auto"] | None = None,
                 retry_for_s: float = 0.0, adaptive_top_k: bool = True, speculate: int = 0) -> None:
        """`lookahead`: a tree to ask for with every step, none, or "auto": AUTO_LOOKAHEAD
        where the server offers trees and a round trip, measured now, costs at least
        AUTO_LOOKAHEAD_MIN_RTT_S. `retry_for_s`: how long a session keeps trying to reopen
        itself on a server that failed or restarted mid-generation (0: it fails at once).
        `adaptive_top_k`: each session learns its first k from its escalations (first_k.py).
        `speculate`: the most tokens of a device's draft a step sends along (speculation.py)."""
        self.adaptive_top_k = adaptive_top_k
        super().__init__(tokenizer)
        self._wire = wire
        info = wire.request("GET", f"{API_PREFIX}/model")
        try:
            self._identity = (info["name"], info["vocabulary_sha256"])
            self.max_tokens_per_step = int(info.get("limits", {}).get("max_tokens_per_step", 256))
            self.vocab_size = int(info["vocab_size"])
            self.context_window = int(info["context_window"])
            self.eos_token_ids = frozenset(int(t) for t in info["eos_token_ids"])
            self._digest = str(info["vocabulary_sha256"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"the server at {wire.base_url} is not a costeer serve: its /v1/model answer "
                            "is malformed") from None
        if self.vocab_size < 1:
            raise UserError(f"the cloud at {wire.base_url} reports a vocabulary of {self.vocab_size} tokens")
        check_token_ids(sorted(self.eos_token_ids), self.vocab_size, f"the cloud at {wire.base_url}")
        self.retry_for_s = retry_for_s
        self.name = f"{printable(str(info['name']))} at {wire.base_url}"
        self.measured_rtt_s: float | None = None  # with lookahead="auto": the round trip the choice was made on
        features = info.get("features", [])
        if lookahead == "auto":
            lookahead = self._auto_lookahead("lookahead" in features)
        elif lookahead is not None and "lookahead" not in features:
            raise UserError(f"the cloud at {wire.base_url} does not offer lookahead (an older costeer serve, or a "
                            "backend without lookahead trees); run without --lookahead")
        self.lookahead = lookahead
        if speculate and "speculate" not in features:
            raise UserError(f"the cloud at {wire.base_url} does not take drafts (an older costeer serve, or a "
                            "backend without lookahead trees); run without --speculate")
        self.speculate = speculate

    def _auto_lookahead(self, offered: bool) -> Lookahead | None:
        """AUTO_LOOKAHEAD if the server offers trees and a round trip to it (the faster of
        two `/healthz` requests on the open connection) takes AUTO_LOOKAHEAD_MIN_RTT_S or more."""
        if not offered:
            return None
        times = []
        for _ in range(2):
            start = time.perf_counter()
            try:
                self._wire.request("GET", "/healthz")
            except (CloudRefused, CloudUnreachable):
                return None  # no measure: no tree (per-token steps are never wrong, only slower far away)
            times.append(time.perf_counter() - start)
        self.measured_rtt_s = min(times)
        chosen = AUTO_LOOKAHEAD if self.measured_rtt_s >= AUTO_LOOKAHEAD_MIN_RTT_S else None
        log.debug("lookahead auto: a round trip to %s takes %.0f ms, so %s", self._wire.base_url,
                  self.measured_rtt_s * 1000, "a tree comes with each step" if chosen else "per-token steps")
        return chosen

    def vocabulary_digest(self) -> str:
        return self._digest

    def vocabulary(self) -> tuple[list[bytes], frozenset[int]]:
        try:
            reply = Vocabulary.model_validate(self._wire.request("GET", f"{API_PREFIX}/vocabulary"))
            pieces = reply.pieces()
        except CloudRefused as exc:
            if exc.status == 404:
                raise UserError(f"the cloud at {self._wire.base_url} cannot send its vocabulary (an older costeer "
                                "serve): use a device model with its tokenizer, or update the server") from None
            raise
        except ValueError as exc:
            raise UserError(f"the cloud at {self._wire.base_url} sent a malformed vocabulary: "
                            f"{printable(str(exc))}") from None
        if len(pieces) != self.vocab_size or vocabulary_digest(pieces) != self._digest:
            raise UserError(f"the vocabulary the cloud at {self._wire.base_url} sent does not match its digest")
        self._pieces = pieces
        return pieces, frozenset(reply.special_ids)

    def check_same_model(self) -> None:
        """After a restart: refuse to resume on a server that came back with another model."""
        info = self._wire.request("GET", f"{API_PREFIX}/model")
        if (info["name"], info["vocabulary_sha256"]) != self._identity:
            raise UserError(f"the cloud at {self._wire.base_url} came back with another model "
                            f"({printable(str(info['name']))}, not {printable(str(self._identity[0]))}); "
                            "this generation cannot continue on it")

    def open_session(self, chat: PublicChat, max_new_tokens: int, first_k: int | None) -> CloudSession:
        # a tree node holds a top-k: methods that need the full vector every step go without
        lookahead = self.lookahead.model_copy(update={"top_k": min(first_k, 1024)}) if self.lookahead and first_k else None
        return ServedSession(self, self.encode_chat(chat), max_new_tokens, first_k, lookahead,
                             self.speculate if first_k else 0)

    def recording(self) -> ContextManager[list[dict]]:
        return self._wire.recording()

    def close(self) -> None:
        self._wire.close()


class ServedSession(CloudSession):
    """A session that survives the server going away: it keeps every token it appended,
    and after a failure that may be a restart it opens a new session with the same
    public messages, sends those tokens again and asks again for what it was asking.
    The server decodes appended tokens alone, so the output stays the same."""

    def __init__(self, cloud: ServedCloud, chat: PublicChat, max_new_tokens: int, first_k: int | None,
                 lookahead: Lookahead | None = None, speculate: int = 0) -> None:
        self._cloud = cloud
        self._wire = wire = cloud._wire
        self._sender = f"the cloud at {wire.base_url}"
        self.vocab_size = vocab_size = cloud.vocab_size
        first_k = first_k if first_k is not None and first_k < vocab_size else None
        # None: every step asks for the full vector, which leaves nothing to learn
        self._first = FirstTopK(first_k, cloud.adaptive_top_k) if first_k is not None else None
        self._chosen: list[int] = []  # every token appended, sent or still walked: what a new session gets
        self._resumer = Resumer(cloud.retry_for_s, self._sender)
        self._capped = False  # the server sent fewer values than asked: it has a cap of its own
        self._start = wire.counters.copy()
        self._tree_k = lookahead.top_k if lookahead is not None else None
        self.drafts = speculate
        self._draft: tuple[int, int | None] = (0, None)  # the latest step's draft: its length, its nodes' k
        self._walk = TreeWalk(self._decode_node)
        # a chain (width 1, or a draft alone) is streamed: the device works on node 1 while the cloud computes node 2
        self._streamed = lookahead.width == 1 if lookahead is not None else speculate > 0
        self._open_request: dict = {"messages": list(chat), "max_new_tokens": max_new_tokens, "top_k": first_k}
        if lookahead is not None:
            self._open_request["lookahead"] = lookahead.model_dump()
        if speculate:
            self._open_request["speculate"] = speculate
        opened = wire.request("POST", f"{API_PREFIX}/sessions", self._open_request)
        self._session: str | None = opened["session_id"]
        self.prompt_tokens = int(opened["prompt_tokens"])
        self._store(opened["distribution"], first_k)

    @property
    def resumes(self) -> int:
        return self._resumer.resumes

    def _decode(self, payload: object, asked: int | None) -> NextToken:
        """A distribution the server sent, checked before any of it is used."""
        return self._capping(decode_distribution(payload, self.vocab_size, self._sender), asked)

    def _decode_node(self, payload: object) -> tuple[tuple[int, ...], NextToken]:
        path, view = decode_tree_node(payload, self.vocab_size, self._sender)
        drafted, draft_k = self._draft
        return path, self._capping(view, draft_k if len(path) <= drafted else self._tree_k)

    def _capping(self, view: NextToken, asked: int | None) -> NextToken:
        """A top-k with fewer values than asked shows the server has a cap of its own:
        from then on it is never asked for more."""
        if view.complete:
            return view
        if asked is None or len(view.ids) < asked:
            self._capped = True
        return replace(view, can_widen=False) if self._capped else view

    def _store(self, reply: dict, asked: int | None) -> None:
        """A reply at the session's position: its distribution, and its tree if it has one."""
        self._view = self._decode(reply, asked)
        if reply.get("tree") is not None:
            self._walk.receive(reply["tree"])

    def _step_path(self) -> str:
        return f"{API_PREFIX}/sessions/{self._session}/step"

    def _step(self, tokens: list[int], k: int | None, draft: Sequence[int] = ()) -> None:
        """Append tokens; the reply is the distribution there (and a new tree, if any)."""
        request: dict = {"tokens": tokens, "top_k": k}  # a session opened with lookahead sends a tree with every step
        draft = list(draft[: self.drafts]) if k is not None else []  # a draft's nodes are top-k
        if draft:
            request["draft"] = draft
        self._walk.restart()  # the server moves: the old walk and tree are done
        self._draft = (len(draft), k)
        if self._streamed and (draft or self._tree_k is not None):
            stream = self._wire.stream("POST", self._step_path(), {**request, "stream": True})
            self._walk.receive_stream(stream)
            first = stream.next()
            if first is None:
                raise UserError(f"{self._sender} answered a step with nothing")
            self._store(first, k)
        else:
            self._store(self._wire.request("POST", self._step_path(), request), k)

    def next_tokens(self) -> list[NextToken]:
        return [self._view]

    def widen(self, k: int | None) -> None:
        """A look: more of the distribution at the current tree node (or position),
        without moving the session or disturbing a tree the cloud is still sending."""
        k = k if k is not None and k < self.vocab_size else None
        if self._first is not None:
            self._first.widened(k)

        def look() -> None:
            walked = self._walk.walked
            request = {"tokens": [], "top_k": k, **({"path": walked} if walked else {})}
            self._view = self._decode(self._wire.request("POST", self._step_path(), request), k)
        self._resuming(look, k)

    def asks_after(self, token_id: int) -> bool:
        return not self._walk.holds(int(token_id))

    def advance(self, token_id: int, draft: Sequence[int] = ()) -> None:
        token = int(token_id)
        self._chosen.append(token)
        k = self._first.stepped() if self._first is not None else None
        node = self._walk.descend(token)
        if node is not None:  # the cloud computed this position already: no request
            self._view = node
            return
        self._resuming(lambda: self._step([*self._walk.walked, token], k, draft), k)

    def _resuming(self, send: Callable[[], None], k: int | None) -> None:
        """send(), which leaves the view at the session's position with top-k `k`; if the
        server fails in a way a restart would, reopen there instead (which leaves the same view)."""
        try:
            send()
        except (CloudUnreachable, CloudRefused) as exc:
            if not self._resumer.applies_to(exc):
                raise
            self._walk.restart()  # a new session starts with every chosen token sent
            self._resumer.reopen(lambda: self._reopen(k), exc)

    def _reopen(self, k: int | None) -> None:
        """A new session at the device's position: the same public messages and settings, then
        every chosen token in steps the server accepts; the last asks for top-k `k` (and a tree)."""
        self._cloud.check_same_model()
        chosen = self._chosen
        # nothing to send again: the open itself answers with the view asked for
        opened = self._wire.request("POST", f"{API_PREFIX}/sessions", {**self._open_request, "top_k": 1 if chosen else k})
        self._session = opened["session_id"]
        reply = opened["distribution"]
        size = self._cloud.max_tokens_per_step
        for start in range(0, len(chosen), size):
            last = start + size >= len(chosen)
            reply = self._wire.request("POST", self._step_path(),
                                       {"tokens": chosen[start:start + size], "top_k": k if last else 1, "lookahead": last})
        self._store(reply, k)
        if self._resumer.closing.is_set():  # closed while reopening: leave nothing behind
            self.close()

    def traffic(self) -> dict:
        counters = self._wire.counters.since(self._start)
        counters["lookahead_tokens"] = self._walk.tokens
        if self._cloud.measured_rtt_s is not None:
            counters["lookahead_auto_rtt_ms"] = round(self._cloud.measured_rtt_s * 1000, 1)
        counters["resumes"] = self.resumes
        return counters

    def close(self) -> None:
        self._resumer.closing.set()
        self._walk.end_stream()
        if self._session:
            session, self._session = self._session, None
            try:
                self._wire.request("DELETE", f"{API_PREFIX}/sessions/{session}")
            except Exception:
                pass  # the server expires it anyway
