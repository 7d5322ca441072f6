"""llama.cpp contexts (LlamaContext) and the stream group over one (LlamaCppStreams).

One context with `n_seq_max` sequences and a unified KV cache lets the device model's
two streams (with and without the private context) share one forward pass.
"""

from __future__ import annotations

import ctypes
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from ..base import check_window, PrefixRestore, PrefixStateError, StreamGroup

_PREFILL_CHUNK = 512
# Prompts are prefilled in batches of this many tokens from position 0, and a saved
# state is restored only up to a multiple of it: a restored prefix is followed by
# the very batches a cold prefill computes, so the numbers are the same bit for bit
# (ggml's kernels round differently for differently shaped batches). 64 measured
# within noise of 512-token batches on the CPU.
PREFIX_BLOCK = 64


class LoadedModel(Protocol):
    """What a context needs of the model it runs on (model.LlamaCppModel)."""

    lib: Any  # the llama_cpp module: llama.cpp's C API
    handle: Any  # the llama_model pointer
    gpu_layers: int
    name: str
    vocab_size: int
    context_window: int
    n_threads: int
    flash_attention: int


class LlamaContext:
    """A llama.cpp context and its token batch: filled, decoded, read and freed the same
    way by a stream group and by the server's batch engine (batch.py)."""

    _ctx = None

    def _create_context(self, model: LoadedModel, n_ctx: int, n_batch: int, n_seq: int, unified: bool) -> None:
        lib = self._lib = model.lib
        self._model = model
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = model.n_threads
        # llama.cpp's automatic choice enables flash attention, which on this CPU made
        # each device step 1.5x slower with a 2,000-token private context (77 vs 51 ms).
        cparams.flash_attn_type = model.flash_attention
        if hasattr(cparams, "kv_unified"):
            cparams.kv_unified = unified  # True: sequences share one cache of n_ctx cells
        self._ctx = lib.llama_init_from_model(model.handle, cparams)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self._batch = lib.llama_batch_init(max(n_batch, n_seq), 0, 1)

    def _fill(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """The batch: (token, position, sequence, wants logits) each."""
        b = self._batch
        for i, (token, pos, seq, want_logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want_logits
        b.n_tokens = len(entries)

    def _decode(self) -> None:
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def _logits_at(self, batch_index: int) -> np.ndarray:
        """The logits after the batch's entry batch_index: a view, valid until the next decode."""
        ptr = self._lib.llama_get_logits_ith(self._ctx, batch_index)
        return np.ctypeslib.as_array(ptr, shape=(self._model.vocab_size,))

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


class LlamaCppStreams(LlamaContext, StreamGroup):
    """`restore[s]` starts stream s from a saved state, kept up to its `keep` tokens
    (which must be the prompt's first tokens); `snapshot[s] = m` captures stream s's
    state when it holds its prompt's first m tokens, into `snapshots[s]` (and, where m is
    the whole prompt, the logits after it into `snapshot_logits[s]`). A restore that holds
    the whole prompt and its logits starts the stream with no prefill at all."""

    spare_cells = 0  # cells beyond the prompts and new tokens (tree.LlamaCppTreeStreams)

    def __init__(self, model: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 restore: dict[int, PrefixRestore], snapshot: dict[int, int], stepwise: bool = False) -> None:
        self._positions = [len(p) for p in prompts]
        self._prompt_lengths = list(self._positions)
        self.snapshots: dict[int, bytes] = {}
        self.snapshot_logits: dict[int, np.ndarray] = {}
        for p in prompts:
            if not p:
                raise ValueError("empty prompt")
            check_window(model.name, model.context_window, len(p), max_new_tokens)
        for s, saved in restore.items():
            whole = saved.keep == saved.n_tokens == len(prompts[s]) and saved.logits is not None
            if not whole and (not 0 < saved.keep < len(prompts[s]) or saved.keep > saved.n_tokens
                              or saved.keep % PREFIX_BLOCK):
                raise ValueError(f"stream {s}: cannot keep {saved.keep} of a saved state's {saved.n_tokens} tokens")
        needed = sum(len(p) + max_new_tokens + 1 for p in prompts) + self.spare_cells
        # a saved state loads whole before it is cut: room for it beside the streams before it
        loading = max((sum(len(p) for p in prompts[:s]) + r.n_tokens for s, r in restore.items()), default=0)
        self._create_context(model, (max(needed, loading) + 255) // 256 * 256, _PREFILL_CHUNK, len(prompts), unified=True)
        self._logits = np.empty((len(prompts), model.vocab_size), dtype=np.float32)
        # with stepwise, the caller runs the prefill, one block per step, before using the group
        self.opening = self._open(prompts, restore, snapshot)
        if not stepwise:
            for _ in self.opening:
                pass

    def _open(self, prompts: Sequence[Sequence[int]], restore: dict[int, PrefixRestore],
              snapshot: dict[int, int]) -> Iterator[None]:
        try:
            # streams in order, each whole before the next: the cells (and so the
            # arithmetic) are laid out the same with or without a restored prefix
            for seq, prompt in enumerate(prompts):
                done = self._restore(seq, restore[seq]) if seq in restore else 0
                if done == len(prompt):  # the whole prompt, and the logits after it
                    logits = restore[seq].logits
                    if logits.shape != (self._model.vocab_size,):
                        raise PrefixStateError(f"a saved state's logits have shape {logits.shape}")
                    self._logits[seq] = logits
                    continue
                mark = snapshot.get(seq)
                if mark is not None:
                    if not done <= mark <= len(prompt) or (mark % PREFIX_BLOCK and mark != len(prompt)):
                        raise ValueError(f"stream {seq}: no snapshot at {mark} tokens")
                    yield from self._prefill(seq, prompt, done, mark)
                    done = mark
                    self.snapshots[seq] = self._state(seq)
                    if mark == len(prompt):
                        self.snapshot_logits[seq] = self._logits[seq].copy()
                yield from self._prefill(seq, prompt, done, len(prompt))
            self._after_prompts = self._logits.copy()  # for restart
        except BaseException:
            self.close()
            raise

    def _prefill(self, seq: int, prompt: Sequence[int], begin: int, end: int) -> Iterator[None]:
        """Feed prompt[begin:end] at its positions, in batches that start at multiples
        of PREFIX_BLOCK, one a step; the last prompt token's logits are kept."""
        for start in range(begin, end, PREFIX_BLOCK):
            chunk = prompt[start : min(start + PREFIX_BLOCK, end)]
            last = start + len(chunk) == len(prompt)
            self._fill([(tok, start + i, seq, last and i == len(chunk) - 1) for i, tok in enumerate(chunk)])
            self._decode()
            if last:
                self._copy_logits(len(chunk) - 1, seq)
            yield

    def _state(self, seq: int) -> bytes:
        size = self._lib.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        written = self._lib.llama_state_seq_get_data(self._ctx, buf, size, seq)
        if written == 0:
            raise RuntimeError("llama.cpp could not copy a sequence state")
        return bytes(memoryview(buf)[:written])

    def _restore(self, seq: int, saved: PrefixRestore) -> int:
        """Load a saved state into `seq` and cut it to `saved.keep` tokens."""
        lib = self._lib
        memory = lib.llama_get_memory(self._ctx)
        buf = (ctypes.c_uint8 * len(saved.state)).from_buffer_copy(saved.state)
        loaded = lib.llama_state_seq_set_data(self._ctx, buf, len(saved.state), seq) != 0
        if (not loaded or lib.llama_memory_seq_pos_min(memory, seq) != 0
                or lib.llama_memory_seq_pos_max(memory, seq) != saved.n_tokens - 1
                or not lib.llama_memory_seq_rm(memory, seq, saved.keep, -1)):
            raise PrefixStateError(f"llama.cpp refused a saved state of {saved.n_tokens} tokens")
        return saved.keep

    def _copy_logits(self, batch_index: int, seq: int) -> None:
        self._logits[seq] = self._logits_at(batch_index)

    def logits(self) -> np.ndarray:
        return self._logits

    def advance(self, token_id: int) -> None:
        n = len(self._positions)
        self._fill([(token_id, self._positions[s], s, True) for s in range(n)])
        self._decode()
        for s in range(n):
            self._copy_logits(s, s)
            self._positions[s] += 1

    def advance_many(self, token_ids: Sequence[int]) -> None:
        """Several tokens in one forward pass per block (a paused device catching up)."""
        if len(token_ids) <= 1:
            for t in token_ids:
                self.advance(t)
            return
        n = len(self._positions)
        block = max(1, _PREFILL_CHUNK // n)
        for start in range(0, len(token_ids), block):
            chunk = token_ids[start:start + block]
            self._fill([(t, self._positions[s] + i, s, i == len(chunk) - 1)
                        for s in range(n) for i, t in enumerate(chunk)])
            self._decode()
            for s in range(n):
                self._copy_logits((s + 1) * len(chunk) - 1, s)
                self._positions[s] += len(chunk)

    # Teacher forcing feeds at most this many tokens a pass: llama.cpp keeps every
    # output's logits (150k floats each), and on a CPU larger batches gain little.
    SCORE_BATCH_TOKENS = 32
    restarts = True

    def logits_along(self, token_ids: Sequence[int], batched: bool = False) -> Iterator[np.ndarray]:
        if not batched:
            yield from super().logits_along(token_ids)
            return
        tokens = list(token_ids)
        if not tokens:
            return
        yield self._logits
        n = len(self._positions)
        rows = np.empty_like(self._logits)
        feed = tokens[:-1]
        block = max(1, self.SCORE_BATCH_TOKENS // n)
        for start in range(0, len(feed), block):
            chunk = feed[start:start + block]
            self._fill([(t, self._positions[s] + i, s, True) for s in range(n) for i, t in enumerate(chunk)])
            self._decode()
            for s in range(n):
                self._positions[s] += len(chunk)
                self._copy_logits(s * len(chunk) + len(chunk) - 1, s)
            for i in range(len(chunk)):
                for s in range(n):
                    rows[s] = self._logits_at(s * len(chunk) + i)
                yield rows

    def restart(self) -> None:
        self._drop_after(self._prompt_lengths)
        self._logits[:] = self._after_prompts

    # Dropping a stream's last cells frees them, and llama.cpp places the next tokens
    # in the lowest free cells: the cache is laid out as if they had never been fed.
    rewinds = True

    def checkpoint(self) -> tuple[tuple[int, ...], np.ndarray]:
        return tuple(self._positions), self._logits.copy()

    def rewind(self, mark: object) -> None:
        positions, logits = mark
        self._drop_after(positions)
        self._logits[:] = logits

    def _drop_after(self, positions: Sequence[int]) -> None:
        memory = self._lib.llama_get_memory(self._ctx)
        for s, n in enumerate(positions):
            if self._positions[s] > n and not self._lib.llama_memory_seq_rm(memory, s, n, -1):
                raise RuntimeError("llama.cpp could not drop a stream's tokens")
        self._positions = list(positions)
