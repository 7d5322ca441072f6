"""GGUF models through llama.cpp's C API (llama-cpp-python), the default backend.

We use the low-level API rather than `llama_cpp.Llama` because CoSteer needs
several sequences of one model decoded in lockstep: one context with
`n_seq_max` sequences and a unified KV cache lets the device model's two
streams (with and without the private context) share one forward pass.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import UserError
from .base import check_window, ChatMessage, LanguageModel, PrefixRestore, PrefixStateError, StreamGroup
from .chat_template import fallback_template, render_chat_template

_PREFILL_CHUNK = 512
# Prompts are prefilled in batches of this many tokens from position 0, and a saved
# state is restored only up to a multiple of it: a restored prefix is followed by
# the very batches a cold prefill computes, so the numbers are the same bit for bit
# (ggml's kernels round differently for differently shaped batches). 64 measured
# within noise of 512-token batches on the CPU.
PREFIX_BLOCK = 64


def _llama():
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UserError("llama-cpp-python is not installed: pip install llama-cpp-python") from exc
    _init_once(llama_cpp)
    return llama_cpp


_initialized = False
_log_callback = None  # kept referenced so ctypes does not free it


def _init_once(llama_cpp) -> None:
    global _initialized, _log_callback
    if _initialized:
        return
    if not os.environ.get("COSTEER_LLAMA_LOGS"):
        _log_callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    if os.environ.get("COSTEER_ALLOW_AMX") != "1":
        _drop_amx_buffer_type(llama_cpp)
    _initialized = True


def _drop_amx_buffer_type(llama_cpp) -> None:
    """Remove ggml's AMX weight buffer from the CPU's extra buffer types.

    On Sapphire Rapids CPUs ggml stores Q4_K weights in AMX buffers, and decoding
    then crashes in ggml_backend_amx_mul_mat (llama.cpp issue #20824, open). Turning
    all extra buffers off (use_extra_bufts=False) avoids it but also drops the
    CPU_REPACK layouts, which measured 2.2x slower here. So we edit the
    NULL-terminated list ggml hands to llama.cpp, keeping CPU_REPACK.
    """
    try:
        libdir = Path(llama_cpp.__file__).parent / "lib"
        ggml = ctypes.CDLL(str(libdir / "libggml.so"))
        base = ctypes.CDLL(str(libdir / "libggml-base.so"))
    except OSError:
        return  # a build without separate ggml libraries: nothing to patch
    vp = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.restype, ggml.ggml_backend_dev_by_type.argtypes = vp, [ctypes.c_int]
    base.ggml_backend_dev_backend_reg.restype, base.ggml_backend_dev_backend_reg.argtypes = vp, [vp]
    base.ggml_backend_reg_get_proc_address.restype = vp
    base.ggml_backend_reg_get_proc_address.argtypes = [vp, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype, base.ggml_backend_buft_name.argtypes = ctypes.c_char_p, [vp]
    cpu_device = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not cpu_device:
        return
    registry = base.ggml_backend_dev_backend_reg(cpu_device)
    address = base.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return
    buffers = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(address)(cpu_device)
    if not buffers:
        return
    kept, i = [], 0
    while buffers[i]:
        if base.ggml_backend_buft_name(buffers[i]) != b"AMX":
            kept.append(buffers[i])
        i += 1
    for j in range(i):
        buffers[j] = kept[j] if j < len(kept) else None


def default_threads() -> int:
    configured = os.environ.get("COSTEER_THREADS")
    if configured:
        return max(1, int(configured))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class LlamaCppModel(LanguageModel):
    supports_prefix_state = True
    prefix_state_block = PREFIX_BLOCK
    supports_lookahead = True  # llama_cpp_tree.py

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None) -> None:
        self._lib = lib = _llama()
        self.path = Path(path)
        self.name = self.path.name
        self.n_threads = n_threads or default_threads()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = self._gpu_layers = int(os.environ.get("COSTEER_GPU_LAYERS", "0"))
        # -1 auto, 0 off, 1 on; off by default on the CPU (see _LlamaCppStreams)
        default_fa = "0" if params.n_gpu_layers == 0 else "-1"
        self.flash_attention = int(os.environ.get("COSTEER_FLASH_ATTN", default_fa))
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise UserError(f"llama.cpp could not load {self.path} (is it a GGUF model file?)")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self._piece_cache: dict[int, bytes] = {}
        self.vocab_size = int(lib.llama_vocab_n_tokens(self._vocab))
        self.context_window = int(lib.llama_model_n_ctx_train(self._model))
        self.eos_token_ids = frozenset(
            t for t in range(self.vocab_size) if lib.llama_vocab_is_eog(self._vocab, t)
        )
        template = lib.llama_model_chat_template(self._model, None)
        self._chat_template = template.decode("utf-8") if template else fallback_template(self._metadata("general.architecture"))
        self._special_ids: frozenset[int] | None = None
        self._bos = self._special_text(lib.llama_vocab_bos(self._vocab))
        self._eos = self._special_text(lib.llama_vocab_eos(self._vocab))

    def _metadata(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    def _special_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", "replace") if token_id >= 0 else ""

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buf = (self._lib.llama_token * capacity)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, capacity, False, special)
        if n < 0:  # buffer too small: -n is the size needed
            capacity = -n
            buf = (self._lib.llama_token * capacity)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, capacity, False, special)
        return list(buf[:n])

    def special_token_ids(self) -> frozenset[int]:
        if self._special_ids is None:
            is_control = self._lib.llama_vocab_is_control
            self._special_ids = frozenset(t for t in range(self.vocab_size) if is_control(self._vocab, t)) | self.eos_token_ids
        return self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._piece_cache.get(token_id)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, True)
        piece = buf.raw[:n]
        self._piece_cache[token_id] = piece
        return piece

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return render_chat_template(self._chat_template, messages, self._bos, self._eos)

    def open_streams(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        restore: dict[int, PrefixRestore] | None = None,
        snapshot: dict[int, int] | None = None,
        lookahead_depth: int = 0,
        stepwise: bool = False,
    ) -> StreamGroup:
        if lookahead_depth:
            from .llama_cpp_tree import LlamaCppTreeStreams

            if len(prompts) != 1 or restore or snapshot:
                raise ValueError("a lookahead group holds one stream opened cold")
            return LlamaCppTreeStreams(self, prompts[0], max_new_tokens, lookahead_depth, stepwise)
        return _LlamaCppStreams(self, prompts, max_new_tokens, restore or {}, snapshot or {}, stepwise)

    def open_streams_stepwise(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs) -> tuple[StreamGroup, Iterator[None]]:
        group = self.open_streams(prompts, max_new_tokens, stepwise=True, **kwargs)
        return group, group.opening

    def batch_engine(self, slots: int, slot_tokens: int, max_batch: int | None = None):
        from .llama_cpp_batch import LlamaCppBatchEngine

        return LlamaCppBatchEngine(self, slots, slot_tokens, max_batch)

    @property
    def state_version(self) -> str:
        """Everything besides the model file that a saved sequence state (and the
        numbers computed from it) depends on."""
        return (f"llama-cpp-python {self._lib.__version__}, gpu layers {self._gpu_layers}, "
                f"flash attention {self.flash_attention}, amx {os.environ.get('COSTEER_ALLOW_AMX') == '1'}")

    def close(self) -> None:
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


class LlamaContext:
    """A llama.cpp context and its token batch: filled, decoded, read and freed the same
    way by a stream group and by the server's batch engine (llama_cpp_batch.py)."""

    _ctx = None

    def _create_context(self, model: LlamaCppModel, n_ctx: int, n_batch: int, n_seq: int, unified: bool) -> None:
        lib = self._lib = model._lib
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
        self._ctx = lib.llama_init_from_model(model._model, cparams)
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


class _LlamaCppStreams(LlamaContext, StreamGroup):
    """`restore[s]` starts stream s from a saved state, kept up to its `keep` tokens
    (which must be the prompt's first tokens); `snapshot[s] = m` captures stream s's
    state when it holds its prompt's first m tokens, into `snapshots[s]`."""

    spare_cells = 0  # cells beyond the prompts and new tokens (LlamaCppTreeStreams)

    def __init__(self, model: LlamaCppModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 restore: dict[int, PrefixRestore], snapshot: dict[int, int], stepwise: bool = False) -> None:
        self._positions = [len(p) for p in prompts]
        self._prompt_lengths = list(self._positions)
        self.snapshots: dict[int, bytes] = {}
        for p in prompts:
            if not p:
                raise ValueError("empty prompt")
            check_window(model.name, model.context_window, len(p), max_new_tokens)
        for s, saved in restore.items():
            if not 0 < saved.keep < len(prompts[s]) or saved.keep > saved.n_tokens or saved.keep % PREFIX_BLOCK:
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
                mark = snapshot.get(seq)
                if mark is not None:
                    if not done <= mark <= len(prompt) or (mark % PREFIX_BLOCK and mark != len(prompt)):
                        raise ValueError(f"stream {seq}: no snapshot at {mark} tokens")
                    yield from self._prefill(seq, prompt, done, mark)
                    done = mark
                    self.snapshots[seq] = self._state(seq)
                yield from self._prefill(seq, prompt, done, len(prompt))
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
