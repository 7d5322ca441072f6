"""The proxy's errors, in OpenAI's shape ({"error": {"message", "type", "param", "code"}}),
and how a failed generation is shown to its client (classify)."""

from __future__ import annotations

import logging
from dataclasses import replace

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import PrivacyError, UserError
from ..transport.errors import invalid_body
from ..transport.wire import CloudRefused, CloudUnreachable

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def render_guard_error(status: int, code: str, message: str) -> dict:
    """guard.py's refusals (Host, Origin, key, content type, body size) in OpenAI's shape."""
    return ApiError(status, message, "invalid_request_error" if status < 500 else "api_error", code=code).body()


def invalid_request(exc: RequestValidationError) -> ApiError:
    """A body that failed validation: 400, naming the field (`param`) and the rule."""
    body = invalid_body(exc)
    if body.malformed_json:
        return ApiError(400, "the body is not valid JSON")
    body = replace(body, reason=body.reason.removeprefix("Value error, "))  # a validator's own message follows
    return ApiError(400, body.message, param=body.param or None)


def one_line(text: str) -> str:
    return " ".join(text.split())[:500]


class Cancelled(Exception):
    """Raised from the text callback: the client went away, or the proxy is stopping."""


def classify(exc: BaseException, remote: bool) -> ApiError:
    """An error of a generation as the client sees it. UserError messages never quote
    the private context (costeer/errors.py); anything else is not shown at all."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Cancelled):
        return ApiError(503, "the request was cancelled (its client left, or the proxy is stopping)", "api_error",
                        code="cancelled")
    if isinstance(exc, CloudUnreachable) or (isinstance(exc, CloudRefused) and exc.status in (429, 503)):
        return ApiError(503, one_line(str(exc)), "api_error", code="cloud_unavailable")
    if isinstance(exc, PrivacyError):
        return ApiError(403, one_line(str(exc)), "permission_error", "model", "private_context_refused")
    if isinstance(exc, UserError):  # a remote cloud's answer, or a request the models cannot take
        return ApiError(502, one_line(str(exc)), "api_error", code="cloud_error") if remote \
            else ApiError(400, one_line(str(exc)))
    log.error("generation failed: %s", type(exc).__name__)  # the type only: a message may quote a prompt
    return ApiError(500, "the proxy failed on this request", "api_error")
