"""Rendering a model's own Jinja chat template (as stored in GGUF or HF metadata)."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Sequence

from ..errors import UserError


# For models that ship no template (base models such as the PyPI Gemma 3 270M): the
# family's turn format where we know it, else a plain transcript, which a pretrained
# model continues as the assistant.
PLAIN_TRANSCRIPT_TEMPLATE = (
    "{% for m in messages %}{{ {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}[m['role']] }}: "
    "{{ m['content'] }}\n\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Gemma's turns; it has no system role: the system message opens the first user turn
GEMMA_TURNS_TEMPLATE = (
    "{{ bos_token }}{% set sys = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
    "else 'user') + '\n' + (sys if loop.first else '') + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
_FAMILY_TEMPLATES = {name: GEMMA_TURNS_TEMPLATE for name in ("gemma", "gemma2", "gemma3", "gemma3_text")}


def fallback_template(architecture: str) -> str:
    """The template for a model that ships none, by its architecture's name."""
    return _FAMILY_TEMPLATES.get(architecture.lower(), PLAIN_TRANSCRIPT_TEMPLATE)


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
