"""What the HTTP surfaces share about refusing a request body: both read a failed
validation the same way, and each renders it in its own shape (the server's ErrorBody,
422; the proxy's OpenAI error, 400)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError


@dataclass(frozen=True)
class InvalidBody:
    """The first problem pydantic found in a body."""

    param: str  # the field, dotted (messages.0.role); "" for the body as a whole
    reason: str  # pydantic's message: it names the field and the rule, never the value
    malformed_json: bool  # the body is not JSON at all

    @property
    def message(self) -> str:
        return f"{self.param}: {self.reason}" if self.param else self.reason


def invalid_body(exc: RequestValidationError) -> InvalidBody:
    first = exc.errors()[0] if exc.errors() else {}
    return InvalidBody(param=".".join(str(p) for p in first.get("loc", ()) if p != "body"),
                       reason=first.get("msg", "invalid request"), malformed_json=first.get("type") == "json_invalid")
