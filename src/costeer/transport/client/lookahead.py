"""The device's walk down the lookahead tree a `costeer serve` reply carries.

The tree holds the distributions after the cloud's own likeliest continuations. While
the device's chosen tokens stay in it, each next distribution is already here and no
request is sent; the tokens walked are sent in one step once a choice leaves it."""

from __future__ import annotations

from typing import Callable, Iterable

from ...distribution import NextToken
from ..wire import CloudUnreachable, LineStream

Path = tuple[int, ...]  # token ids after the server's position


class TreeWalk:
    """The latest tree's nodes and the tokens chosen along it, not yet sent.

    A chain (width 1) comes as a stream, a node a line the moment the cloud has computed
    it: nodes are read as the walk reaches them, so the device works on node 1 while the
    cloud computes node 2."""

    def __init__(self, decode_node: Callable[[object], tuple[Path, NextToken]]) -> None:
        """`decode_node`: a node as the server sent it (parsed JSON) -> its path and distribution."""
        self._decode_node = decode_node
        self._nodes: dict[Path, NextToken] = {}
        self._stream: LineStream | None = None
        self.walked: list[int] = []
        self.tokens = 0  # tokens whose distribution came from a tree, not a request

    def restart(self) -> None:
        """The server moves (or a new session starts): the old tree and walk are done."""
        self.end_stream()
        self._nodes, self.walked = {}, []

    def receive(self, nodes: Iterable[object]) -> None:
        """A reply's whole tree."""
        self._nodes = dict(self._decode_node(node) for node in nodes)

    def receive_stream(self, stream: LineStream) -> None:
        """A tree still coming, a node a line (after the reply's own line, which the caller reads)."""
        self._stream = stream

    def holds(self, token: int) -> bool:
        """Whether the tree has the node after `token` where the walk is (the walk stays)."""
        return self._node((*self.walked, token)) is not None

    def descend(self, token: int) -> NextToken | None:
        """The distribution after `token` where the walk is, if the tree holds it (the walk
        goes on there); None: the token leaves the tree."""
        node = self._node((*self.walked, token))
        if node is not None:
            self.walked.append(token)
            self.tokens += 1
        return node

    def _node(self, path: Path) -> NextToken | None:
        """The node for `path`: received already, or read from the stream as the cloud
        computes it. A chain's nodes come in order, so a node as deep as `path` on
        another branch means `path` will not come."""
        while path not in self._nodes and self._stream is not None:
            try:
                line = self._stream.next()
            except CloudUnreachable:
                line = None  # the stream dropped: the walk ends here; the step that follows resumes if need be
            if line is None:
                self.end_stream()
                break
            got, node = self._decode_node(line)
            self._nodes[got] = node
            if len(got) >= len(path) and got != path:
                break
        return self._nodes.get(path)

    def end_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
