"""Sessions of the cloud server batched in one llama.cpp context (a `BatchEngine`).

Exactness rules the layout, as in tree.py. Measured on this CPU with the
default cloud model:
- a unified KV cache puts a sequence's cells after other sequences' cells, and the
  attention's reductions then round differently (up to 0.48 in a logit); so every
  slot gets a cache stream of its own (`kv_unified = False`), whose cells start at 0
  just as in a context of its own;
- ggml's repacked Q4_K kernels switch from a matrix-vector to a 4-column matrix
  product at 4 tokens in a forward pass, which rounds differently (up to 0.6); a
  pass of at most 3 tokens gives every token bit for bit what it gets alone.
And for speed: with separate streams llama.cpp splits a batch into one micro-batch
per run of consecutive sequence ids, so a batch goes in slot order (16 slots in
shuffled order took 3x as long as in order) and the server hands out the lowest
free slot, keeping sessions' slots together.
Prompts are prefilled alone in blocks of PREFIX_BLOCK tokens from position 0, like
every other llama.cpp prefill here, so a slot's numbers equal a private context's.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..base import BatchEngine
from .streams import PREFIX_BLOCK, LlamaContext, LoadedModel

# the largest forward pass whose tokens get the numbers they get alone (CPU kernels)
CPU_EXACT_BATCH = 3


class LlamaCppBatchEngine(LlamaContext, BatchEngine):
    def __init__(self, model: LoadedModel, slots: int, slot_tokens: int, max_batch: int | None) -> None:
        self.slots, self.slot_tokens = slots, slot_tokens
        self.exact_batch = CPU_EXACT_BATCH if model.gpu_layers == 0 else 1
        self.max_batch = max_batch or self.exact_batch
        # n_ctx is split evenly between the slots' streams
        self._create_context(model, slots * slot_tokens, max(PREFIX_BLOCK, self.max_batch), slots, unified=False)
        self._memory = self._lib.llama_get_memory(self._ctx)
        self._positions = [0] * slots

    def _run(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One forward pass over (token, position, slot, wants logits)."""
        self._fill(entries)
        self._decode()

    def _row(self, index: int) -> np.ndarray:
        return self._logits_at(index).copy()

    def prefill(self, slot: int, prompt: Sequence[int], start: int) -> tuple[int, np.ndarray | None]:
        if start != self._positions[slot] or not start % PREFIX_BLOCK == 0 or start >= len(prompt):
            raise ValueError(f"slot {slot} holds {self._positions[slot]} tokens; cannot prefill from {start}")
        if len(prompt) + 1 > self.slot_tokens:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit a slot of {self.slot_tokens}")
        block = prompt[start:start + PREFIX_BLOCK]
        end = start + len(block)
        self._run([(int(t), start + i, slot, end == len(prompt) and i == len(block) - 1) for i, t in enumerate(block)])
        self._positions[slot] = end
        return end, self._row(len(block) - 1) if end == len(prompt) else None

    def decode(self, entries: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        slots = [slot for slot, _ in entries]
        if len(set(slots)) != len(slots):
            raise ValueError("one token a slot per decode")
        if any(self._positions[s] + 1 > self.slot_tokens for s in slots):
            raise ValueError("a slot is full")
        order = sorted(range(len(entries)), key=lambda i: entries[i][0])
        rows: list[np.ndarray] = [np.empty(0)] * len(entries)
        for first in range(0, len(order), self.max_batch):
            group = order[first:first + self.max_batch]
            self._run([(int(entries[i][1]), self._positions[entries[i][0]], entries[i][0], True) for i in group])
            for j, i in enumerate(group):
                rows[i] = self._row(j)
                self._positions[entries[i][0]] += 1
        return rows

    def free(self, slot: int) -> None:
        self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self._positions[slot] = 0

