"""Model backends behind one interface (`base.LanguageModel`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .base import ChatMessage, LanguageModel, StreamGroup

__all__ = ["ChatMessage", "LanguageModel", "StreamGroup", "load_model", "same_tokenizer"]


def load_model(path: str | os.PathLike, backend: str = "auto") -> LanguageModel:
    """A GGUF file loads with llama.cpp; a folder with config.json with transformers."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model not found: {p}")
    if backend == "auto":
        backend = "transformers" if p.is_dir() else "llama.cpp"
    if backend == "llama.cpp":
        if p.is_dir():
            raise UserError(f"{p} is a folder; llama.cpp needs a .gguf file")
        from .llama_cpp.model import LlamaCppModel

        return LlamaCppModel(p)
    if backend == "transformers":
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is not a Hugging Face model folder (no config.json)")
        from .hf import TransformersModel

        return TransformersModel(p)
    raise UserError(f"unknown backend {backend!r}: choose auto, llama.cpp or transformers")


def same_tokenizer(a: LanguageModel, b: LanguageModel) -> bool:
    """Whether two models (or a model and a remote cloud) spell every token id alike:
    then CoSteer fuses index by index, else on the tokens they share (aligned.py)."""
    return a.vocab_size == b.vocab_size and a.vocabulary_digest() == b.vocabulary_digest()
