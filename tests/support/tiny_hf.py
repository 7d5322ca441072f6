"""Tiny Hugging Face models built on the spot: a byte-level BPE tokenizer trained on a
few sentences and a Qwen2 config with random weights. No download."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest

from support.workers import TORCH_WORKER

# the marks of a test that builds and runs these models in its own process
TORCH_IN_PROCESS = [
    pytest.mark.skipif(not all(find_spec(m) for m in ("torch", "transformers", "tokenizers")),
                       reason="needs the hf extra (torch, transformers)"),
    TORCH_WORKER,
]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Write a short note to my friend about the weather in the mountains.",
    "I live in Tromsø and I love ice sculpting, skiing and reindeer stew.",
    "Birthday party invitations should be warm, short and playful.",
] * 20


def make_tokenizer(vocab_size: int, corpus: list[str] = CORPUS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    import transformers

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def make_model_folder(path, tokenizer, seed: int, layers: int = 2, window: int = 256):
    import transformers

    transformers.set_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=window,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_model_pair(root: Path) -> tuple[Path, Path]:
    """A cloud (3 layers) and a device (2) that share one tokenizer of 300 tokens: their folders."""
    tok = make_tokenizer(300)
    return make_model_folder(root / "llm", tok, seed=1, layers=3), make_model_folder(root / "slm", tok, seed=2)
