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
    rewinds = False  # nor speculation: its chain owns the cells past the position

    def __init__(self, model: LoadedModel, prompt: Sequence[int], max_new_tokens: int, depth: int,
                 stepwise: bool = False) -> None:
        self.spare_cells = depth + 1  # read by LlamaCppStreams when it sizes the context
        super().__init__(model, [prompt], max_new_tokens, {}, {}, stepwise)
        self._memory = self._lib.llama_get_memory(self._ctx)
        self._chain: list[tuple[int, np.ndarray]] = []  # kept cells after the position: (token, logits after it)

    def lookahead(self, width: int, depth: int, min_probability: float = 0.0,
                  draft: Sequence[int] = ()) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        if len(draft) + depth + 1 > self.spare_cells:
            raise ValueError(f"a draft of {len(draft)} and a tree of depth {depth} do not fit this group "
                             f"(opened for {self.spare_cells - 1})")
        if width == 1:  # a chain: every node is kept as soon as it is computed
            yield from self._follow(draft, depth, min_probability)
            return
        yield from self._follow(draft, 0, min_probability)  # which keeps the draft's cells, no more
        yield from self._tree(width, depth, min_probability, tuple(draft))

    def _follow(self, draft: Sequence[int], depth: int, min_probability: float) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """A chain: the draft's tokens, then up to `depth` of the cloud's own likeliest,
        while it is sure enough. What is left of the last chain is this one's beginning
        where the tokens agree: sent again, not computed."""
        logits = self._logits[0]
        kept = 0
        for i in range(len(draft) + depth):
            if i < len(draft):
                token = int(draft[i])
            elif top_probability(logits) < min_probability:
                break  # an unsure cloud: the device's choice would likely leave the chain
            else:
                token = int(top_k(logits, 1)[0][0])
            if i < len(self._chain) and self._chain[i][0] == token:
                logits = self._chain[i][1]
            else:
                self._cut_chain(i)
                logits = self._decode_alone(token, self._positions[0] + i)
                self._chain.append((token, logits))
            kept = i + 1
            yield tuple(t for t, _ in self._chain[:kept]), logits
        self._cut_chain(kept)

    def _tree(self, width: int, depth: int, min_probability: float,
              base: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """The tree under `base` (the kept chain's tokens), which stays."""
        start = self._positions[0] + len(base)
        after: dict[tuple[int, ...], np.ndarray] = {}
        base_logits = self._chain[-1][1] if base else self._logits[0]

        def visit(path: tuple[int, ...], logits: np.ndarray) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
            if len(path) == depth or top_probability(logits) < min_probability:
                return
            position = start + len(path)
            children = [int(t) for t in top_k(logits, width)[0]]
            for rank in reversed(range(len(children))):  # the likeliest last: its chain stays
                child = (*path, children[rank])
                after[child] = self._decode_alone(children[rank], position)
                yield (*base, *child), after[child]
                yield from visit(child, after[child])
                if rank:
                    self._lib.llama_memory_seq_rm(self._memory, 0, position, -1)

        complete = False
        try:
            yield from visit((), base_logits.copy())
            complete = True
        finally:
            if not complete:  # stopped early: whatever the cache holds past the base goes
                self._lib.llama_memory_seq_rm(self._memory, 0, start, -1)
        # the cells left are the likeliest child's, its likeliest child's, ...: the chain
        logits, path = base_logits, ()
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
        self._cut_chain(0)

    def _cut_chain(self, keep: int) -> None:
        """Keep the chain's first `keep` tokens; their cells stay, the rest go."""
        if len(self._chain) > keep:
            self._lib.llama_memory_seq_rm(self._memory, 0, self._positions[0] + keep, -1)
            del self._chain[keep:]
