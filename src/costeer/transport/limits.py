"""Caps a cloud server enforces (each refusal is a 4xx JSON error naming it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    max_sessions: int = 16
    session_ttl_s: int = 300
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    max_tokens_per_step: int = 256
    # KV cells all sessions may hold together: each open session (and each open still
    # prefilling) reserves its prompt tokens plus its max_new_tokens. The default
    # cloud model (Qwen2.5-Coder-1.5B: 28 layers, 2 KV heads of 128 dims) keeps
    # 2 * 28 * 2 * 128 * 2 bytes = 28,672 bytes a token in f16, so 65,536 tokens
    # are 1.75 GiB of KV cache.
    max_kv_tokens: int = 65536
    # Cells of each slot of the shared, batched cache (max_sessions slots, allocated at
    # start out of max_kv_tokens): a session that needs more, or has a lookahead
    # tree, gets a cache of its own from what is left of the budget.
    batch_slot_tokens: int = 2048

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)
