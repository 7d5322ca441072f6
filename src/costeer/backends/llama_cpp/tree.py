"""Lookahead trees on llama.cpp, for the cloud server (`costeer serve`).

Exactness rules the layout. llama.cpp's CPU kernels give other logits (up to 0.5
apart on the default cloud model, measured) for a token decoded in a batch of
several than alone, and also when the KV cache holds any other cell, even one
masked out for its sequence (the attention's reductions run over all used cells).
A node must hold exactly what a per-token step would compute, so every node is
decoded alone, with the cache holding exactly the prompt, the tokens so far and
the node's path, in that order: the tree is walked depth first in one sequence,
and a subtree's cells are removed once it is done.

`lookahead` is lazy: each node is computed when the iteration reaches it, so the
server can send it at once (a chain, width 1, is streamed that way). The likeliest
child's chain is visited last and kept: when the device's tokens
follow it (as they often do), `advance` takes its cells and logits with no
forward pass, so a fully accepted chain costs the server nothing extra. Any other
token drops the rest of the chain and decodes as usual.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ...distribution import top_k, top_probability
from .streams import LlamaCppStreams, LoadedModel


class LlamaCppTreeStreams(LlamaCppStreams):
    """One stream with room for a kept chain of up to `depth` lookahead tokens."""

    restarts = False  # the server's streams: scoring does not use them

    def __init__(self, model: LoadedModel, prompt: Sequence[int], max_new_tokens: int, depth: int,
                 stepwise: bool = False) -> None:
        self.spare_cells = depth + 1  # read by LlamaCppStreams when it sizes the context
        super().__init__(model, [prompt], max_new_tokens, {}, {}, stepwise)
        self._memory = self._lib.llama_get_memory(self._ctx)
        self._chain: list[tuple[int, np.ndarray]] = []  # kept cells after the position: (token, logits after it)

    def lookahead(self, width: int, depth: int, min_probability: float = 0.0) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        if depth + 1 > self.spare_cells:
            raise ValueError(f"a tree of depth {depth} does not fit this group (opened for {self.spare_cells - 1})")
        if width == 1:  # a chain: every node is kept as soon as it is computed
            # what is left of the last chain is this one's beginning: sent again, not computed
            if len(self._chain) > depth:
                self._lib.llama_memory_seq_rm(self._memory, 0, self._positions[0] + depth, -1)
                del self._chain[depth:]
            for i in range(len(self._chain)):
                yield tuple(t for t, _ in self._chain[: i + 1]), self._chain[i][1]
            logits = self._chain[-1][1] if self._chain else self._logits[0]
            while len(self._chain) < depth:
                if top_probability(logits) < min_probability:
                    return  # an unsure cloud: the device's choice would likely leave the chain
                token = int(top_k(logits, 1)[0][0])
                logits = self._decode_alone(token, self._positions[0] + len(self._chain))
                self._chain.append((token, logits))
                yield tuple(t for t, _ in self._chain), logits
            return
        self._drop_chain()
        yield from self._tree(width, depth, min_probability)

    def _tree(self, width: int, depth: int, min_probability: float) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        start = self._positions[0]
        after: dict[tuple[int, ...], np.ndarray] = {}

        def visit(path: tuple[int, ...], logits: np.ndarray) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
            if len(path) == depth or top_probability(logits) < min_probability:
                return
            position = start + len(path)
            children = [int(t) for t in top_k(logits, width)[0]]
            for rank in reversed(range(len(children))):  # the likeliest last: its chain stays
                child = (*path, children[rank])
                after[child] = self._decode_alone(children[rank], position)
                yield child, after[child]
                yield from visit(child, after[child])
                if rank:
                    self._lib.llama_memory_seq_rm(self._memory, 0, position, -1)

        complete = False
        try:
            yield from visit((), self._logits[0].copy())
            complete = True
        finally:
            if not complete:  # stopped early: whatever the cache holds past the position goes
                self._lib.llama_memory_seq_rm(self._memory, 0, start, -1)
        # the cells left are the likeliest child's, its likeliest child's, ...: the chain
        logits, path = self._logits[0], ()
        for _ in range(depth):
            path = (*path, int(top_k(logits, 1)[0][0]))
            if path not in after:  # the tree stopped short here
                break
            logits = after[path]
            self._chain.append((path[-1], logits))

    def _decode_alone(self, token: int, position: int) -> np.ndarray:
        self._fill([(token, position, 0, True)])
        self._decode()
        return self._logits_at(0).copy()

    def advance(self, token_id: int) -> None:
        if self._chain and self._chain[0][0] == token_id:  # computed by the lookahead: no pass
            _, logits = self._chain.pop(0)
            self._logits[0] = logits
            self._positions[0] += 1
            return
        self._drop_chain()
        super().advance(token_id)

    def _drop_chain(self) -> None:
        if self._chain:
            self._lib.llama_memory_seq_rm(self._memory, 0, self._positions[0], -1)
            self._chain = []
