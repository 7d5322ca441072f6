"""`costeer proxy`: an OpenAI-compatible chat endpoint on the device (FastAPI + uvicorn).

Any OpenAI client talks to it as to a chat model, and every answer is CoSteer's,
personalized with the private context configured at start, which only the device
model reads. A request's messages are the public conversation: the cloud model
(embedded, or remote with `--cloud`) sees them and the chosen tokens, nothing else;
`CoSteer.generate` keeps the context out of everything sent (prompts.PublicChat).

The proxy holds the private context, and any answer can repeat it, so it answers only
whom it must (`ProxyAccess`): every request passes guard.py's checks before a body byte
is read (a key, by default kept in the user's config folder; loopback Host names and the
proxy's own origins only; JSON bodies up to a cap), the `model` field must name a method
of the allow-list (parametric weights within `PARAMETER_RANGES`), and at most
`max_queue` requests wait or run. A refused request does no model work.

The `model` field picks the method. The models are not thread-safe, so one worker
thread runs one generation at a time and requests queue. A client that goes away
stops its generation at the next token: the text callback raises, and the decoding
loop closes its streams and a remote cloud's session as it unwinds.

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: a bad
request or a method not allowed a 400, no key 401, a foreign Host or Origin 403, an
unknown model 404, a body not JSON 415, a full queue 429 (with Retry-After), a cloud
that refuses or fails a 502 or 503. No message quotes the private context, and nothing
about a request is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..api import CoSteer, Generation, GenerationRequest
from ..backends.base import check_window
from ..errors import UserError
from ..methods import DEFAULT_TOP_K, make_policy
from ..prompts import ContextSource, PublicChat, build_prompts, join_context
from ..sampling import SamplingConfig
from ..transport.guard import Guard, serve_app
from .access import ProxyAccess
from .crossing import embedded_record, split_record
from .errors import ApiError, Cancelled, classify, invalid_request, one_line, render_guard_error
from .page import PAGE_ASSETS
from .schema import ChatRequest, ProxyDefaults

# While a request waits for its first token (queued or prefilling), how often to look
# whether its client went away: a queued request that nobody awaits is skipped.
DISCONNECT_POLL_S = 0.25


_T = TypeVar("_T")


@dataclass
class ProxyStats:
    """Generations by outcome (app.state.stats): what tests and operators can count."""

    completed: int = 0
    cancelled: int = 0
    failed: int = 0


# --- one generation on the worker thread --------------------------------------------

@dataclass(eq=False)  # hashed by identity: the set of live jobs
class _Job:
    """A generation's events, passed from the worker thread to the request's coroutine:
    ("text", str) per piece, then ("done", Generation) or ("error", exception)."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, value: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def on_text(self, piece: str) -> None:
        if self.cancelled.is_set():
            raise Cancelled
        self.post("text", piece)


@dataclass(frozen=True)
class _Answer:
    """A finished generation, and what the request's costeer options asked for besides."""

    g: Generation
    public_tokens: int
    wire: dict | None = None  # with costeer.wire: what crossed to the cloud (crossing.py)

    def usage(self) -> dict:
        g = self.g
        prompt = g.prompt_tokens.get("llm_public", g.prompt_tokens.get("slm_public", self.public_tokens))
        return {"prompt_tokens": prompt, "completion_tokens": g.new_tokens, "total_tokens": prompt + g.new_tokens}

    def extension(self) -> dict:
        """The `costeer` field: what OpenAI's response has no place for; `steps` and `wire`
        only when the request asked for them."""
        g = self.g
        fields = {"method": g.method, "traffic": g.traffic, "context_tokens_reused": g.context_cache_tokens,
                  "context_truncated": g.context_truncated, "prompt_tokens": g.prompt_tokens,
                  "elapsed_s": round(g.elapsed_s, 4), "time_to_first_token_s": round(g.time_to_first_token_s, 4),
                  "tokens_per_second": round(g.tokens_per_second, 2)}
        if g.steps is not None:
            fields["steps"] = [step.to_dict() for step in g.steps]
        if self.wire is not None:
            fields["wire"] = self.wire
        return fields


def _finish_reason(g: Generation) -> str:
    return "length" if g.finish_reason == "length" else "stop"  # "eos" and a stop string are both OpenAI's "stop"


class _Worker:
    """One thread that runs one generation at a time (the models are not thread-safe),
    started when first needed, so an app whose lifespan ended and began again (as test
    clients do) still works."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.live: set[_Job] = set()  # queued or running

    def _started(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="costeer-proxy")
        return self._pool

    def submit(self, job: _Job, work: Callable[[], None]) -> None:
        with self._lock:
            self.live.add(job)
            job.loop.run_in_executor(self._started(), work)

    async def call(self, work: Callable[[], _T]) -> _T:
        """`work` on the generation thread, after the generations queued before it (the
        models are not thread-safe); not counted in the queue."""
        with self._lock:
            pool = self._started()
        return await asyncio.get_running_loop().run_in_executor(pool, work)

    def done(self, job: _Job) -> None:
        with self._lock:
            self.live.discard(job)

    def stop(self) -> None:
        """Cancel every job (each ends at its next token, a queued one at once) and wait."""
        with self._lock:
            pool, self._pool = self._pool, None
            for job in self.live:
                job.cancelled.set()
        if pool is not None:
            pool.shutdown(wait=True)


class _ClosingStream(StreamingResponse):
    """Runs `on_close` however the response ends: finished, failed or the client gone."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def create_proxy_app(costeer: CoSteer, context: str | Sequence[ContextSource] = "",
                     defaults: ProxyDefaults = ProxyDefaults(), *, access: ProxyAccess) -> Guard:
    """The proxy's app behind its guard: `costeer` generates (the caller closes it),
    `context` (text, or its sources by name: load_context_sources) is added to every
    request on the device, `defaults` fill what a request leaves out, `access` says who
    may ask. The guard passes attributes through to the FastAPI app (app.state.stats);
    its own refusals are counted in app.stats."""
    sources = _context_sources(context)
    context = join_context(sources)
    worker = _Worker()
    methods = access.methods
    remote = costeer.cloud_url is not None
    stats = ProxyStats()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.stop)

    # no /docs page: it would load scripts from a CDN, and a browser cannot send the key to it
    app = FastAPI(title="costeer proxy", version="1", description="An OpenAI-compatible chat endpoint: CoSteer with "
                  "a private context that stays on this device. The model field names the method; every request "
                  "needs the proxy's key (Authorization: Bearer KEY).", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.stats = stats

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_request(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:  # unknown routes and methods, in OpenAI's shape
        return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return classify(exc, remote).response()

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "costeer"}

    @app.get("/v1/models")
    def list_models() -> dict:
        """The methods this proxy serves by name (parametric ones allowed by prefix are not listed)."""
        return {"object": "list", "data": [model_card(name) for name in methods.names]}

    @app.get("/v1/models/{name}", responses={400: {}, 404: {}})
    def get_model(name: str) -> dict:
        return model_card(methods.resolve(name))

    for path, asset in PAGE_ASSETS.items():  # the chat page (page.py): served without the key
        app.add_api_route(path, asset.response, methods=["GET"], include_in_schema=False)

    @functools.cache
    def context_summary() -> dict:
        device = costeer.model("slm")
        listed = [{"name": s.name, "bytes": s.size_bytes, "tokens": len(device.tokenize(s.text, special=False))}
                  for s in sources]
        return {"object": "costeer.context", "sources": listed, "sent_to_cloud": False,
                "tokens": sum(s["tokens"] for s in listed), "bytes": sum(s["bytes"] for s in listed)}

    @app.get("/v1/costeer/context")
    async def private_context() -> dict:
        """The private context's sources by name and size (bytes, the device model's tokens):
        never its text. It goes into no request to the cloud."""
        return await worker.call(context_summary)  # the tokenizer is the device model's: on its thread

    def generate(body: ChatRequest, method: str, job: _Job) -> _Answer:
        """On the worker thread: check the request against the device model, then generate."""
        if job.cancelled.is_set():  # its client left while it was queued
            raise Cancelled
        messages = [m.turn() for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens or defaults.max_tokens
        try:
            sampling = SamplingConfig(defaults.temperature if body.temperature is None else body.temperature,
                                      defaults.top_p if body.top_p is None else body.top_p, defaults.top_k,
                                      defaults.seed if body.seed is None else body.seed)
            # the public prompt must fit the device model (which reads it too) with the new tokens;
            # refused here, before a remote cloud is asked, so it is the client's 400, not a cloud error
            device = costeer.model("slm")
            public = build_prompts(messages, "", defaults.system_prompt).public
            public_tokens = len(device.encode_chat(public))
            check_window(device.name, device.context_window, public_tokens, max_tokens)
        except UserError as exc:
            raise ApiError(400, one_line(str(exc)), param="messages") from None
        stop = defaults.stop if body.stop is None else [body.stop] if isinstance(body.stop, str) else body.stop
        options = body.costeer
        request = GenerationRequest(method=method, max_new_tokens=max_tokens, sampling=sampling,
                                    steering=defaults.params, fusion=defaults.fusion, stop=stop,
                                    system_prompt=defaults.system_prompt, max_context_tokens=defaults.max_context_tokens,
                                    explain=bool(options and options.steps))
        if not (options and options.wire):
            return _Answer(costeer.generate(messages, context, request, on_text=job.on_text), public_tokens)
        if remote:
            with costeer.model("llm").recording() as records:
                g = costeer.generate(messages, context, request, on_text=job.on_text)
            return _Answer(g, public_tokens, split_record(records))
        g = costeer.generate(messages, context, request, on_text=job.on_text)
        return _Answer(g, public_tokens, would_cross(request, public, g))

    def would_cross(request: GenerationRequest, public: PublicChat, g: Generation) -> dict:
        """Embedded: what a split client would have sent (crossing.py), with the first
        top-k it would ask for, as `CoSteer` and the split session make it."""
        policy = make_policy(request.method, request.steering, request.fusion, DEFAULT_TOP_K)
        k = policy.first_cloud_k(request.sampling) if "llm" in policy.roles else None  # not loaded if unused
        k = k if k is not None and k < costeer.model("llm").vocab_size else None
        return embedded_record(policy, public, request.max_new_tokens, k, g.token_ids, g.finish_reason)

    def run(body: ChatRequest, method: str, job: _Job) -> None:
        try:
            done = generate(body, method, job)
            stats.completed += 1
            job.post("done", done)
        except Cancelled as exc:
            stats.cancelled += 1
            job.post("error", exc)  # for a request still waiting: the proxy is stopping
        except BaseException as exc:
            stats.failed += 1
            job.post("error", exc)
        finally:
            worker.done(job)

    async def next_event(job: _Job, request: Request) -> tuple[str, object]:
        """The job's next event; a client that leaves meanwhile cancels it. Not while a
        response streams: StreamingResponse itself listens for the disconnect then."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()

    @app.post("/v1/chat/completions", responses={400: {}, 401: {}, 403: {}, 404: {}, 413: {}, 415: {}, 429: {},
                                                  502: {}, 503: {}})
    async def chat_completions(body: ChatRequest, request: Request):
        method = methods.resolve(body.model)
        # checked and taken with no await between: the event loop runs one request's code at a time
        if len(worker.live) >= access.max_queue:
            raise ApiError(429, f"the proxy already has {access.max_queue} requests waiting or running, its "
                           "limit (--max-queue): retry shortly", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        job = _Job(asyncio.get_running_loop())
        worker.submit(job, lambda: run(body, method, job))
        ident, include_usage = f"chatcmpl-{secrets.token_hex(12)}", bool(body.stream_options and body.stream_options.include_usage)

        def reply(kind: str, choice: dict, **extra: object) -> dict:
            return {"id": ident, "object": kind, "created": int(time.time()), "model": method,
                    "system_fingerprint": None, **extra, "choices": [{"index": 0, "logprobs": None, **choice}] if choice else []}

        event = await next_event(job, request)
        if not body.stream:
            while event[0] == "text":
                event = await next_event(job, request)
        if event[0] == "error":
            raise classify(event[1], remote)
        if not body.stream:
            answer = event[1]
            return reply("chat.completion", {"message": {"role": "assistant", "content": answer.g.text},
                                             "finish_reason": _finish_reason(answer.g)},
                         usage=answer.usage(), costeer=answer.extension())

        def chunk(delta: dict, finish: str | None = None, **extra: object) -> str:
            usage = {"usage": None} if include_usage else {}
            return _sse(reply("chat.completion.chunk", {"delta": delta, "finish_reason": finish}, **usage, **extra))

        async def events(first: tuple[str, object]) -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            kind, value = first
            while kind == "text":
                yield chunk({"content": value})
                kind, value = await job.events.get()
            if kind == "error":  # the status is sent already: OpenAI's error event, as its SDK reads it
                yield _sse(classify(value, remote).body())
            else:
                # the chunk with finish_reason carries the costeer field; usage comes last, as OpenAI sends it
                yield chunk({}, _finish_reason(value.g), costeer=value.extension())
                if include_usage:
                    yield _sse(reply("chat.completion.chunk", {}, usage=value.usage()))
            yield _sse("[DONE]")

        return _ClosingStream(events(event), job.cancelled.set)

    return Guard(app, access.guard_policy(), render_guard_error)


def _context_sources(context: str | Sequence[ContextSource]) -> list[ContextSource]:
    if isinstance(context, str):  # text given whole (the Python API, tests): one source
        return [ContextSource("context text", len(context.encode()), context)] if context else []
    return list(context)


def serve_proxy(costeer: CoSteer, context: str | Sequence[ContextSource], defaults: ProxyDefaults,
                access: ProxyAccess) -> None:
    serve_app(create_proxy_app(costeer, context, defaults, access=access), access.host, access.port)
