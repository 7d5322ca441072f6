"""Caps a cloud server enforces (each refusal is a 4xx JSON error naming it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    max_sessions: int = 8
    session_ttl_s: int = 300
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    max_tokens_per_step: int = 256

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)
