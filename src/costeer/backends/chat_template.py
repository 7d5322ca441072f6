"""Rendering a model's own Jinja chat template (as stored in GGUF or HF metadata)."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Sequence

from ..errors import UserError


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UserError(f"chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(
    template: str, messages: Sequence[dict[str, str]], bos_token: str = "", eos_token: str = ""
) -> str:
    return _compile(template).render(
        messages=list(messages), add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token
    )
