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

from ...errors import UserError
from ..base import ChatMessage, LanguageModel, PrefixRestore, StreamGroup
from ..chat_template import fallback_template, render_chat_template
from .batch import LlamaCppBatchEngine
from .lib import default_threads, load_llama_cpp
from .streams import PREFIX_BLOCK, LlamaCppStreams
from .tree import LlamaCppTreeStreams


class LlamaCppModel(LanguageModel):
    supports_prefix_state = True
    prefix_state_block = PREFIX_BLOCK
    supports_lookahead = True  # tree.py

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None) -> None:
        self._lib = lib = load_llama_cpp()
        self.path = Path(path)
        self.name = self.path.name
        self.n_threads = n_threads or default_threads()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = self._gpu_layers = int(os.environ.get("COSTEER_GPU_LAYERS", "0"))
        # -1 auto, 0 off, 1 on; off by default on the CPU (see streams.LlamaCppStreams)
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
            if len(prompts) != 1 or restore or snapshot:
                raise ValueError("a lookahead group holds one stream opened cold")
            return LlamaCppTreeStreams(self, prompts[0], max_new_tokens, lookahead_depth, stepwise)
        return LlamaCppStreams(self, prompts, max_new_tokens, restore or {}, snapshot or {}, stepwise)

    def open_streams_stepwise(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs) -> tuple[StreamGroup, Iterator[None]]:
        group = self.open_streams(prompts, max_new_tokens, stepwise=True, **kwargs)
        return group, group.opening

    def batch_engine(self, slots: int, slot_tokens: int, max_batch: int | None = None):
        return LlamaCppBatchEngine(self, slots, slot_tokens, max_batch)

    @property
    def lib(self):
        """The llama_cpp module (llama.cpp's C API), for the contexts opened on this model."""
        return self._lib

    @property
    def handle(self):
        """The llama_model pointer (None once closed)."""
        return self._model

    @property
    def gpu_layers(self) -> int:
        return self._gpu_layers

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
