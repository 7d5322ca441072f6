"""Hugging Face checkpoints through transformers (and a GPU where present)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError
from ..vocabulary_map import SENTENCEPIECE_SPACE, piece_bytes
from .base import check_window, ChatMessage, LanguageModel, StreamGroup
from .chat_template import fallback_template, render_chat_template


def _import_hf():
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise UserError("the transformers backend needs: pip install 'costeer[hf]'") from exc
    return torch, transformers


class TransformersModel(LanguageModel):
    def __init__(self, path: str | os.PathLike, device: str | None = None) -> None:
        torch, transformers = _import_hf()
        self._torch = torch
        self.path = Path(path)
        self.name = self.path.name
        self.device = device or os.environ.get("COSTEER_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self._model = transformers.AutoModelForCausalLM.from_pretrained(
                self.path, local_files_only=True, dtype=dtype
            ).to(self.device)
        except (OSError, ValueError) as exc:
            raise UserError(f"transformers could not load {self.path}: {str(exc).splitlines()[0]}") from None
        self._model.eval()
        # transformers renamed `past_key_values` to `cache` in 5.x; accept both
        import inspect

        forward_params = inspect.signature(self._model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        config = self._model.config
        self.vocab_size = int(self._model.get_output_embeddings().weight.shape[0])
        self.context_window = int(getattr(config, "max_position_embeddings", 0) or 1 << 20)
        eos = set()
        for source in (getattr(self._model, "generation_config", None), config, self.tokenizer):
            ids = getattr(source, "eos_token_id", None)
            eos.update([ids] if isinstance(ids, int) else (ids or []))
        self.eos_token_ids = frozenset(eos)
        self._scheme = self._piece_scheme()
        self._special = set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab())

    def _piece_scheme(self) -> str:
        """How the vocabulary writes bytes (see vocabulary_map.piece_bytes)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return "bytes"
        decoder = json.dumps(json.loads(backend.to_str()).get("decoder") or {}, ensure_ascii=False)
        if '"ByteLevel"' in decoder:
            return "byte-level"
        return "sentencepiece" if SENTENCEPIECE_SPACE in decoder else "bytes"

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"])

    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids) | frozenset(self.tokenizer.get_added_vocab().values())

    def token_bytes(self, token_id: int) -> bytes:
        token = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if token is None:
            return b""  # padding rows of the embedding beyond the tokenizer
        if token in self._special:
            return token.encode("utf-8")
        return piece_bytes(token, self._scheme)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        if not self.tokenizer.chat_template:
            template = fallback_template(getattr(self._model.config, "model_type", "") or "")
            return render_chat_template(template, messages, self.tokenizer.bos_token or "", self.tokenizer.eos_token or "")
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def open_streams(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> StreamGroup:
        for p in prompts:
            check_window(self.name, self.context_window, len(p), max_new_tokens)
        return _TransformersStreams(self, prompts)


class _TransformersStreams(StreamGroup):
    """One KV cache per stream; streams run one after another (prompts differ in length)."""

    def __init__(self, model: TransformersModel, prompts: Sequence[Sequence[int]]) -> None:
        self._m = model
        self._caches: list[object] = [None] * len(prompts)
        self._prompt_lengths = [len(p) for p in prompts]
        self._logits = np.empty((len(prompts), model.vocab_size), dtype=np.float32)
        for i, prompt in enumerate(prompts):
            self._forward(i, list(prompt))

    def _forward(self, i: int, ids: list[int]) -> None:
        torch = self._m._torch
        with torch.inference_mode():
            out = self._m._model(
                input_ids=torch.tensor([ids], device=self._m.device),
                use_cache=True,
                logits_to_keep=1,
                **{self._m._cache_arg: self._caches[i]},
            )
        self._caches[i] = getattr(out, self._m._cache_arg)
        self._logits[i] = out.logits[0, -1].float().cpu().numpy()

    def logits(self) -> np.ndarray:
        return self._logits

    def advance(self, token_id: int) -> None:
        for i in range(len(self._caches)):
            self._forward(i, [token_id])

    def close(self) -> None:
        self._caches = []
