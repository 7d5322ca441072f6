"""The cloud model behind `costeer serve`, as the device sees it."""

from __future__ import annotations

import numpy as np

from ..backends.base import LanguageModel
from ..cloud import CloudSession, RemoteCloud
from ..distribution import NextToken
from ..errors import UserError
from ..prompts import PublicChat
from .protocol import API_PREFIX, FLOATS, IDS, Lookahead, decode_array
from .wire import WireClient


class ServedCloud(RemoteCloud):
    """`costeer serve`: sends any k up to the full vector, so every step can be certified.

    With `lookahead`, each reply also carries the distributions after the cloud's own
    likeliest continuations (a tree computed from the public prefix alone); the
    session then walks that tree and sends the tokens it chose in one request when
    the choice leaves it. The output is the same token for token."""

    def __init__(self, wire: WireClient, tokenizer: LanguageModel, lookahead: Lookahead | None = None) -> None:
        super().__init__(tokenizer)
        self._wire = wire
        info = wire.request("GET", f"{API_PREFIX}/model")
        self.name = f"{info['name']} at {wire.base_url}"
        self.vocab_size = int(info["vocab_size"])
        self.context_window = int(info["context_window"])
        self.eos_token_ids = frozenset(info["eos_token_ids"])
        self._digest = info["vocabulary_sha256"]
        if lookahead is not None and "lookahead" not in info.get("features", []):
            raise UserError(f"the cloud at {wire.base_url} does not offer lookahead (an older costeer serve, or a "
                            "backend without lookahead trees); run without --lookahead")
        self.lookahead = lookahead

    def vocabulary_digest(self) -> str:
        return self._digest

    def open_session(self, chat: PublicChat, max_new_tokens: int, first_k: int | None) -> CloudSession:
        # a tree node holds a top-k: methods that need the full vector every step go without
        lookahead = self.lookahead.model_copy(update={"top_k": min(first_k, 1024)}) if self.lookahead and first_k else None
        return ServedSession(self._wire, self.encode_chat(chat), max_new_tokens, first_k, self.vocab_size, lookahead)

    def close(self) -> None:
        self._wire.close()


class ServedSession(CloudSession):
    def __init__(self, wire: WireClient, chat: PublicChat, max_new_tokens: int, first_k: int | None, vocab_size: int,
                 lookahead: Lookahead | None = None) -> None:
        self._wire = wire
        self._first_k = first_k if first_k is not None and first_k < vocab_size else None
        self.vocab_size = vocab_size
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
        request = {"messages": list(chat), "max_new_tokens": max_new_tokens, "top_k": self._first_k}
        if lookahead is not None:
            request["lookahead"] = lookahead.model_dump()
        opened = wire.request("POST", f"{API_PREFIX}/sessions", request)
        self._session = opened["session_id"]
        self.prompt_tokens = int(opened["prompt_tokens"])
        self._store(opened["distribution"], self._first_k)

    def _top(self, dist: dict, asked: int | None) -> NextToken:
        lse = float(dist["lse"])
        if dist.get("full_logits_b64"):
            return NextToken(decode_array(dist["full_logits_b64"], FLOATS).astype(np.float32), lse, self.vocab_size)
        ids = decode_array(dist["top_ids_b64"], IDS).astype(np.int64)
        logits = decode_array(dist["top_logits_b64"], FLOATS).astype(np.float32)
        if asked is None or len(ids) < asked:
            self._capped = True  # never ask this server for more than it sends
        return NextToken(logits, lse, self.vocab_size, ids=ids, can_widen=not self._capped)

    def _store(self, dist: dict, asked: int | None) -> None:
        self._view = self._top(dist, asked)
        if dist.get("tree") is not None:
            self._tree = {tuple(node["path"]): self._top(node, self._tree_k) for node in dist["tree"]}

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
            line = self._stream.next()
            if line is None:
                self._end_stream()
                break
            got = tuple(line["path"])
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
        request = {"tokens": [], "top_k": k, **({"path": self._walked} if self._walked else {})}
        reply = self._wire.request("POST", f"{API_PREFIX}/sessions/{self._session}/step", request)
        self._view = self._top(reply, k)

    def advance(self, token_id: int) -> None:
        path = (*self._walked, int(token_id))
        node = self._node(path)
        if node is not None:  # the cloud computed this position already: no request
            self._walked.append(int(token_id))
            self._view = node
            self._tree_tokens += 1
            return
        self._step([*self._walked, int(token_id)], self._first_k)

    def traffic(self) -> dict:
        counters = self._wire.counters.since(self._start)
        counters["lookahead_tokens"] = self._tree_tokens
        return counters

    def close(self) -> None:
        self._end_stream()
        if self._session:
            session, self._session = self._session, None
            try:
                self._wire.request("DELETE", f"{API_PREFIX}/sessions/{session}")
            except Exception:
                pass  # the server expires it anyway
