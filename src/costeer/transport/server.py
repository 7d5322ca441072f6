"""`costeer serve`: the cloud model behind an HTTP API (FastAPI + uvicorn).

Each session holds one KV-cached stream of the cloud model on the public prompt.
Idle sessions expire; the number of sessions, prompt size and tokens are capped;
every refusal is a 4xx JSON body naming the problem.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..backends.base import LanguageModel, StreamGroup
from ..distribution import LocalNextToken
from ..errors import UserError
from .limits import ServerLimits
from .protocol import API_PREFIX, FLOATS, IDS, Distribution, ErrorBody, ModelInfo, OpenSession, SessionOpened, Step, encode_array


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass
class _Session:
    key: str | None
    group: StreamGroup
    prompt_tokens: int
    budget: int  # tokens the session may still append
    position: int
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _distribution(group: StreamGroup, position: int, top_k: int | None, vocab_size: int) -> Distribution:
    view = LocalNextToken(group.logits()[0])
    if top_k is None or top_k >= vocab_size:
        logits, lse = view.full()
        return Distribution(position=position, lse=lse, full_logits_b64=encode_array(logits, FLOATS))
    ids, logits, lse = view.top(top_k)
    return Distribution(position=position, lse=lse, top_ids_b64=encode_array(ids, IDS), top_logits_b64=encode_array(logits, FLOATS))


def create_app(model: LanguageModel, api_keys: Sequence[str] = (), limits: ServerLimits = ServerLimits()) -> FastAPI:
    """`api_keys` empty: open to anyone who can connect (bind to loopback then)."""
    app = FastAPI(
        title="costeer cloud",
        version="1",
        description="Hosts the cloud LLM for CoSteer. It sees the public prompt and the chosen tokens only.",
    )
    sessions: dict[str, _Session] = {}
    sessions_lock = threading.Lock()
    compute_lock = threading.Lock()  # one forward pass at a time: they share the cores
    info = ModelInfo(
        name=model.name,
        vocab_size=model.vocab_size,
        context_window=model.context_window,
        eos_token_ids=sorted(model.eos_token_ids),
        vocabulary_sha256=model.vocabulary_digest(),
        limits=limits.as_dict(),
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content=ErrorBody(error=exc.kind, message=exc.message).model_dump())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        kind = "malformed_json" if first.get("type") == "json_invalid" else "invalid_request"
        return JSONResponse(status_code=422, content=ErrorBody(error=kind, message=message).model_dump())

    def caller_key(request: Request) -> str | None:
        if not api_keys:
            return None
        header = request.headers.get("authorization", "")
        given = header[7:].encode() if header.lower().startswith("bearer ") else b""
        # compare against every key so the time taken does not depend on which matched
        matches = [k for k in api_keys if hmac.compare_digest(given, k.encode())]
        if not given or not matches:
            raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer KEY)")
        return matches[0]

    def expire_idle() -> None:
        now = time.monotonic()
        with sessions_lock:
            stale = [sid for sid, s in sessions.items() if now - s.last_used > limits.session_ttl_s]
            for sid in stale:
                sessions.pop(sid).group.close()

    def session_for(session_id: str, key: str | None) -> _Session:
        expire_idle()
        with sessions_lock:
            session = sessions.get(session_id)
        # another key's session is reported as unknown: its existence is not disclosed
        if session is None or (session.key is not None and not hmac.compare_digest(session.key, key or "")):
            raise ApiError(404, "unknown_session", "no such session (closed, expired, or never opened)")
        session.last_used = time.monotonic()
        return session

    @app.get(f"{API_PREFIX}/model", response_model=ModelInfo)
    def model_info(key: str | None = Depends(caller_key)) -> ModelInfo:
        return info

    @app.post(f"{API_PREFIX}/sessions", response_model=SessionOpened, responses={401: {"model": ErrorBody}, 413: {"model": ErrorBody}, 429: {"model": ErrorBody}})
    def open_session(body: OpenSession, key: str | None = Depends(caller_key)) -> SessionOpened:
        expire_idle()
        if body.max_new_tokens > limits.max_new_tokens:
            raise ApiError(422, "too_many_new_tokens", f"max_new_tokens {body.max_new_tokens} exceeds the server's limit of {limits.max_new_tokens}")
        with sessions_lock:
            if len(sessions) >= limits.max_sessions:
                raise ApiError(429, "too_many_sessions", f"the server holds its maximum of {limits.max_sessions} sessions; close one or retry later")
        chars = sum(len(m.content) for m in body.messages)
        if chars > 16 * limits.max_prompt_tokens:  # refuse before spending time tokenizing
            raise ApiError(413, "prompt_too_large", f"prompt of {chars} characters exceeds the server's limit of {limits.max_prompt_tokens} tokens")
        try:
            ids = model.encode_chat([m.model_dump() for m in body.messages])
        except UserError as exc:
            raise ApiError(422, "invalid_messages", str(exc)) from None
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(413, "prompt_too_large", f"prompt of {len(ids)} tokens exceeds the server's limit of {limits.max_prompt_tokens}")
        if len(ids) + body.max_new_tokens > model.context_window:
            raise ApiError(413, "prompt_too_large", f"prompt of {len(ids)} tokens plus {body.max_new_tokens} new tokens exceeds the model's window of {model.context_window}")
        with compute_lock:
            group = model.open_streams([ids], body.max_new_tokens)
            first = _distribution(group, len(ids), body.top_k, model.vocab_size)
        session_id = secrets.token_urlsafe(16)
        with sessions_lock:
            sessions[session_id] = _Session(key, group, len(ids), body.max_new_tokens, len(ids))
        return SessionOpened(session_id=session_id, prompt_tokens=len(ids), distribution=first)

    @app.post(f"{API_PREFIX}/sessions/{{session_id}}/step", response_model=Distribution, responses={404: {"model": ErrorBody}, 422: {"model": ErrorBody}})
    def step(session_id: str, body: Step, key: str | None = Depends(caller_key)) -> Distribution:
        session = session_for(session_id, key)
        if len(body.tokens) > limits.max_tokens_per_step:
            raise ApiError(422, "too_many_tokens", f"{len(body.tokens)} tokens in one step exceed the limit of {limits.max_tokens_per_step}")
        bad = [t for t in body.tokens if not 0 <= t < model.vocab_size]
        if bad:
            raise ApiError(422, "token_out_of_range", f"token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})")
        with session.lock:
            if len(body.tokens) > session.budget:
                raise ApiError(422, "session_budget_exhausted", f"the session may append {session.budget} more tokens, not {len(body.tokens)}")
            with compute_lock:
                for token in body.tokens:
                    session.group.advance(token)
                    session.position += 1
                    session.budget -= 1
                return _distribution(session.group, session.position, body.top_k, model.vocab_size)

    @app.delete(f"{API_PREFIX}/sessions/{{session_id}}", status_code=204, responses={404: {"model": ErrorBody}})
    def close_session(session_id: str, key: str | None = Depends(caller_key)) -> None:
        session = session_for(session_id, key)
        with sessions_lock:
            sessions.pop(session_id, None)
        with session.lock:
            session.group.close()

    @app.get("/healthz")
    def health() -> dict[str, object]:
        return {"ok": True, "sessions": len(sessions)}

    return app


def serve(model: LanguageModel, host: str, port: int, api_keys: Sequence[str], limits: ServerLimits) -> None:
    import uvicorn

    uvicorn.run(create_app(model, api_keys, limits), host=host, port=port, log_level="warning")
