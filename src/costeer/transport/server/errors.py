"""The server's refusals, as ErrorBody JSON ({"error": kind, "message": ...})."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import invalid_body
from ..protocol import ErrorBody


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=error_body(self.status, self.kind, self.message),
                            headers=self.headers)


def error_body(status: int, kind: str, message: str) -> dict[str, str]:
    """A refusal's body; also the guard's refusals in the app's own shape."""
    return ErrorBody(error=kind, message=message).model_dump()


def unknown_session() -> ApiError:
    return ApiError(404, "unknown_session", "no such session (closed, expired, or never opened)")


def invalid_request(exc: RequestValidationError) -> ApiError:
    """A body that failed validation: 422, naming the field and the rule."""
    body = invalid_body(exc)
    return ApiError(422, "malformed_json" if body.malformed_json else "invalid_request", body.message)
