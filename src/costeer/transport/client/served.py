"""The cloud model behind `costeer serve`, as the device sees it."""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from ...backends.base import LanguageModel, vocabulary_digest
from ...cloud import CloudSession, RemoteCloud
from ...distribution import NextToken, check_token_ids
from ...errors import UserError
from ...prompts import PublicChat
from ..protocol import API_PREFIX, FLOATS, IDS, Lookahead, Vocabulary, decode_array
from ..wire import CloudRefused, CloudUnreachable, WireClient, printable

RESUME_BACKOFF_S = (0.5, 4.0)  # first pause between tries to reopen a session, doubling up to the second


class ServedCloud(RemoteCloud):
    """`costeer serve`: sends any k up to the full vector, so every step can be certified.

    With `lookahead`, each reply also carries the distributions after the cloud's own
    likeliest continuations (a tree computed from the public prefix alone); the
    session then walks that tree and sends the tokens it chose in one request when
    the choice leaves it. The output is the same token for token."""

    def __init__(self, wire: WireClient, tokenizer: LanguageModel, lookahead: Lookahead | None = None,
                 retry_for_s: float = 0.0) -> None:
        """`retry_for_s`: how long a session keeps trying to reopen itself on a server
        that failed or restarted mid-generation (0: it fails at once)."""
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
        if lookahead is not None and "lookahead" not in info.get("features", []):
            raise UserError(f"the cloud at {wire.base_url} does not offer lookahead (an older costeer serve, or a "
                            "backend without lookahead trees); run without --lookahead")
        self.lookahead = lookahead

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
        return ServedSession(self, self.encode_chat(chat), max_new_tokens, first_k, lookahead)

    def close(self) -> None:
        self._wire.close()


def _resumable(exc: Exception) -> str | None:
    """Why `exc` may be a server going away (a reason to report), or None: it is not,
    so it fails at once (a bad key, a bad request, a cap)."""
    if isinstance(exc, CloudUnreachable):
        return exc.reason
    if isinstance(exc, CloudRefused):
        if exc.status == 404 and exc.kind == "unknown_session":
            return "it no longer knows the session"
        if exc.status in (429, 502, 503, 504):  # busy, or a proxy in front of a server that is down
            return f"HTTP {exc.status}"
    return None


class ServedSession(CloudSession):
    """A session that survives the server going away: it keeps every token it appended,
    and after a failure that may be a restart it opens a new session with the same
    public messages, sends those tokens again and asks again for what it was asking.
    The server decodes appended tokens alone, so the output stays the same."""

    def __init__(self, cloud: ServedCloud, chat: PublicChat, max_new_tokens: int, first_k: int | None,
                 lookahead: Lookahead | None = None) -> None:
        self._cloud = cloud
        self._wire = wire = cloud._wire
        self.vocab_size = vocab_size = cloud.vocab_size
        self._first_k = first_k if first_k is not None and first_k < vocab_size else None
        self._chosen: list[int] = []  # every token appended, sent or still walked: what a new session gets
        self.resumes = 0
        self._closing = threading.Event()  # close() ends a wait between tries
        self._capped = False  # the server sent fewer values than asked: it has a cap of its own
        self._start = wire.counters.copy()
        self._tree: dict[tuple[int, ...], NextToken] = {}  # path after the server's position -> distribution
        self._walked: list[int] = []  # tokens chosen along the tree, not yet sent
        self._tree_tokens = 0  # tokens whose distribution came from a tree, not a request
        self._tree_k = lookahead.top_k if lookahead is not None else None
        # a chain (width 1) is streamed: each node reaches the device the moment the
        # cloud has computed it, so the device works on node 1 while the cloud computes node 2
        self._streamed = lookahead is not None and lookahead.width == 1
        self._stream = None
        self._open_request: dict = {"messages": list(chat), "max_new_tokens": max_new_tokens, "top_k": self._first_k}
        if lookahead is not None:
            self._open_request["lookahead"] = lookahead.model_dump()
        opened = wire.request("POST", f"{API_PREFIX}/sessions", self._open_request)
        self._session: str | None = opened["session_id"]
        self.prompt_tokens = int(opened["prompt_tokens"])
        self._store(opened["distribution"], self._first_k)

    def _top(self, dist: dict, asked: int | None) -> NextToken:
        """A distribution the server sent, checked before any of it is used."""
        try:
            lse = float(dist["lse"])
            if dist.get("full_logits_b64"):
                logits = decode_array(dist["full_logits_b64"], FLOATS).astype(np.float32)
                if len(logits) != self.vocab_size:
                    raise ValueError(f"{len(logits)} logits for a vocabulary of {self.vocab_size}")
                return NextToken(logits, lse, self.vocab_size)
            ids = decode_array(dist["top_ids_b64"], IDS).astype(np.int64)
            logits = decode_array(dist["top_logits_b64"], FLOATS).astype(np.float32)
            if len(ids) != len(logits):
                raise ValueError(f"{len(ids)} token ids for {len(logits)} logits")
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"the cloud at {self._wire.base_url} sent a malformed distribution "
                            f"({printable(str(exc))})") from None
        check_token_ids(ids, self.vocab_size, f"the cloud at {self._wire.base_url}")
        if asked is None or len(ids) < asked:
            self._capped = True  # never ask this server for more than it sends
        return NextToken(logits, lse, self.vocab_size, ids=ids, can_widen=not self._capped)

    def _store(self, dist: dict, asked: int | None) -> None:
        self._view = self._top(dist, asked)
        if dist.get("tree") is not None:
            self._tree = {self._tree_path(node): self._top(node, self._tree_k) for node in dist["tree"]}

    def _tree_path(self, node: object) -> tuple[int, ...]:
        """A tree node's path of token ids, checked like every id the server sends."""
        path = node.get("path") if isinstance(node, dict) else None
        if not isinstance(path, list) or not all(type(t) is int for t in path):
            raise UserError(f"the cloud at {self._wire.base_url} sent a lookahead tree node without a path "
                            "of token ids")
        check_token_ids(path, self.vocab_size, f"the cloud at {self._wire.base_url}")
        return tuple(path)

    def _step(self, tokens: list[int], k: int | None) -> None:
        """Append tokens; the reply is the distribution there (and a new tree, if any)."""
        path = f"{API_PREFIX}/sessions/{self._session}/step"
        request = {"tokens": tokens, "top_k": k}  # a session opened with lookahead sends a tree with every step
        self._end_stream()  # the server moves: the old walk and tree are done
        self._tree, self._walked = {}, []
        if self._streamed:
            self._stream = self._wire.stream("POST", path, {**request, "stream": True})
            first = self._stream.next()
            if first is None:
                raise UserError(f"the cloud at {self._wire.base_url} answered a step with nothing")
            self._store(first, k)
        else:
            self._store(self._wire.request("POST", path, request), k)

    def _node(self, path: tuple[int, ...]) -> NextToken | None:
        """The tree's node for `path`: received already, or read from the stream as the
        cloud computes it. A chain's nodes come in order, so a node as deep as `path` on
        another branch means `path` will not come."""
        while path not in self._tree and self._stream is not None:
            try:
                line = self._stream.next()
            except CloudUnreachable:
                line = None  # the stream dropped: the walk ends here; the step that follows resumes if need be
            if line is None:
                self._end_stream()
                break
            got = self._tree_path(line)
            self._tree[got] = self._top(line, self._tree_k)
            if len(got) >= len(path) and got != path:
                break
        return self._tree.get(path)

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def next_tokens(self) -> list[NextToken]:
        return [self._view]

    def widen(self, k: int | None) -> None:
        """A look: more of the distribution at the current tree node (or position),
        without moving the session or disturbing a tree the cloud is still sending."""
        k = k if k is not None and k < self.vocab_size else None

        def look() -> None:
            request = {"tokens": [], "top_k": k, **({"path": self._walked} if self._walked else {})}
            reply = self._wire.request("POST", f"{API_PREFIX}/sessions/{self._session}/step", request)
            self._view = self._top(reply, k)
        self._resuming(look, k)

    def advance(self, token_id: int) -> None:
        token = int(token_id)
        self._chosen.append(token)
        node = self._node((*self._walked, token))
        if node is not None:  # the cloud computed this position already: no request
            self._walked.append(token)
            self._view = node
            self._tree_tokens += 1
            return
        self._resuming(lambda: self._step([*self._walked, token], self._first_k), self._first_k)

    def _resuming(self, send: Callable[[], None], k: int | None) -> None:
        """send(), which leaves the view at the session's position with top-k `k`; if the
        server fails in a way a restart would, reopen there instead (which leaves the same view)."""
        try:
            send()
        except (CloudUnreachable, CloudRefused) as exc:
            if self._cloud.retry_for_s <= 0 or _resumable(exc) is None:
                raise
            self._resume(k, exc)

    def _resume(self, k: int | None, failure: CloudUnreachable | CloudRefused) -> None:
        """Try to reopen for retry_for_s seconds, pausing between tries; then give up in one line."""
        self._end_stream()
        self._tree, self._walked = {}, []  # a new session starts with every chosen token sent
        window = self._cloud.retry_for_s
        deadline = time.monotonic() + window
        pause, tries = RESUME_BACKOFF_S[0], 0
        while True:
            reason = _resumable(failure)
            if reason is None:
                raise failure
            left = deadline - time.monotonic()
            if left <= 0 or self._closing.is_set():
                raise UserError(f"the cloud at {self._wire.base_url} stopped answering ({reason}) and did not come "
                                f"back within {window:g} s") from None
            if tries:  # a restarted server answers at once: the first try does not wait
                hint = failure.retry_after if isinstance(failure, CloudRefused) else None
                if self._closing.wait(min(hint or pause, left)):
                    continue
                pause = min(2 * pause, RESUME_BACKOFF_S[1])
            tries += 1
            try:
                self._reopen(k)
                self.resumes += 1
                return
            except (CloudUnreachable, CloudRefused) as exc:
                failure = exc

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
            reply = self._wire.request("POST", f"{API_PREFIX}/sessions/{self._session}/step",
                                       {"tokens": chosen[start:start + size], "top_k": k if last else 1, "lookahead": last})
        self._store(reply, k)
        if self._closing.is_set():  # closed while reopening: leave nothing behind
            self.close()

    def traffic(self) -> dict:
        counters = self._wire.counters.since(self._start)
        counters["lookahead_tokens"] = self._tree_tokens
        counters["resumes"] = self.resumes
        return counters

    def close(self) -> None:
        self._closing.set()
        self._end_stream()
        if self._session:
            session, self._session = self._session, None
            try:
                self._wire.request("DELETE", f"{API_PREFIX}/sessions/{session}")
            except Exception:
                pass  # the server expires it anyway
