"""The proxy's request, as OpenAI defines it (the fields the proxy uses), and what a
request leaves out (ProxyDefaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from ..errors import UserError
from ..fusion import SteeringParams
from ..methods import Fusion
from ..prompts import PAPER_SYSTEM_PROMPT
from ..sampling import SamplingConfig

DEFAULT_MODEL = "costeer"
MAX_TOKENS = 1 << 20  # beyond any model's window: the window check names the real limit


def _whole(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON Schema's integer: 2.0 is one (Python's json writes floats so), "2" and 2.5 are not
Whole = Annotated[int, BeforeValidator(_whole)]


class _Lenient(BaseModel):
    # other fields are ignored, as OpenAI-compatible servers do; values are not coerced
    model_config = ConfigDict(extra="ignore", strict=True)


# checked by Message's validator, for a clearer message than a failed Literal's; the schema says what is valid
TEXT_PARTS = Annotated[list[dict], WithJsonSchema({"type": "array", "items": {
    "type": "object", "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}})]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | TEXT_PARTS

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: str | list[dict]) -> str | list[dict]:
        for part in value if isinstance(value, list) else ():
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts ({{\"type\": \"text\", \"text\": ...}}) are supported, "
                                 f"got type {str(part.get('type'))[:40]!r}")
        return value

    def turn(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for a system message; parts are joined as vLLM does
        text = self.content if isinstance(self.content, str) else "\n".join(p["text"] for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Lenient):
    include_usage: bool = False


class CosteerOptions(_Lenient):
    """costeer's extension of the request (the chat page asks for it): what to add to the
    answer's `costeer` field. Off by default, so OpenAI clients get the same answer shape."""

    steps: bool = Field(default=False, description="per picked token: the cloud's own choice, probabilities, "
                        "the steering term and whether it changed the pick (costeer.steps)")
    wire: bool = Field(default=False, description="what crossed to the cloud for this answer, or with an embedded "
                       "cloud what would have (costeer.wire); never the private context")


class ChatRequest(_Lenient):
    messages: list[Message] = Field(min_length=1, description="the public conversation; the private context is added "
                                    "on the device, in the first user turn")
    model: str = Field(default=DEFAULT_MODEL, description="the method (see /v1/models); empty: costeer")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: Whole | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_tokens: Whole | None = Field(default=None, ge=1, le=MAX_TOKENS, description="max_completion_tokens' older name")
    temperature: float | None = Field(default=None, ge=0, le=2, description="default: the server's (0: greedy)")
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: Whole | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(default=None, description="up to 4 stop strings")
    n: Whole | None = Field(default=None, ge=1, le=1, description="one choice per request")
    costeer: CosteerOptions | None = Field(default=None, description="costeer's extension: ask for steps and wire")

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop strings")
        return value


@dataclass(frozen=True)
class ProxyDefaults:
    """What a request does not say: `costeer generate`'s defaults unless the command line changes them."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    params: SteeringParams | None = None
    fusion: Fusion = "closed"
    system_prompt: str | None = PAPER_SYSTEM_PROMPT
    max_context_tokens: int | None = None

    def __post_init__(self) -> None:  # refused at start, not in every request
        SamplingConfig(self.temperature, self.top_p, self.top_k, self.seed)
        if self.max_context_tokens is not None and self.max_context_tokens < 0:
            raise UserError(f"max-context-tokens must be >= 0, got {self.max_context_tokens}")
