"""Model backends behind one interface (`base.LanguageModel`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .base import ChatMessage, LanguageModel, StreamGroup

__all__ = ["ChatMessage", "LanguageModel", "StreamGroup", "load_model", "check_same_tokenizer"]


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
        from .llama_cpp_backend import LlamaCppModel

        return LlamaCppModel(p)
    if backend == "transformers":
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is not a Hugging Face model folder (no config.json)")
        from .hf_backend import TransformersModel

        return TransformersModel(p)
    raise UserError(f"unknown backend {backend!r}: choose auto, llama.cpp or transformers")


def check_same_tokenizer(a: LanguageModel, b: LanguageModel) -> None:
    """CoSteer fuses distributions index by index, so both models must share the vocabulary."""
    if a.vocab_size != b.vocab_size:
        raise UserError(
            f"{a.name} and {b.name} have different vocabularies ({a.vocab_size} vs {b.vocab_size} tokens); "
            "CoSteer needs the cloud and device models to share a tokenizer"
        )
    if a.vocabulary_digest() == b.vocabulary_digest():
        return
    if not (a.local and b.local):
        raise UserError(
            f"{a.name} and {b.name} have different tokenizers (the token strings differ); "
            "CoSteer needs the cloud and device models to share a tokenizer"
        )
    fa, fb = a.vocabulary_fingerprint(), b.vocabulary_fingerprint()
    differing = sum(x != y for x, y in zip(fa, fb))
    if differing:
        first = next(i for i, (x, y) in enumerate(zip(fa, fb)) if x != y)
        raise UserError(
            f"{a.name} and {b.name} have different tokenizers ({differing} token strings differ, first at id {first}); "
            "CoSteer needs the cloud and device models to share a tokenizer"
        )
