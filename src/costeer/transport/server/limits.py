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
    # Sessions one API key may hold at once, so that one user cannot take every slot
    # from the others. None: half of max_sessions (at least 1) when the server has two
    # or more keys, all of them with one key; an open server (no key) is not capped per key.
    max_sessions_per_key: int | None = None
    # Seconds a session may live however busy it is (session_ttl_s bounds idleness only):
    # a device that keeps stepping or looking cannot hold its KV cells for ever.
    session_max_age_s: int = 3600
    # Bytes of one request body; a larger one is refused (413) before it is read.
    max_body_bytes: int = 2 * 2**20

    def per_key_cap(self, keys: int) -> int:
        """Sessions one key may hold on a server with `keys` keys."""
        if self.max_sessions_per_key is not None:
            return min(self.max_sessions_per_key, self.max_sessions)
        return max(1, self.max_sessions // 2) if keys >= 2 else self.max_sessions

    def as_dict(self, keys: int = 0) -> dict[str, int]:
        """Every cap as a number (the per-key one as it applies with `keys` keys)."""
        values = dict(self.__dict__)
        values["max_sessions_per_key"] = self.per_key_cap(keys)
        return values
