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
import json
import logging
import math
import os
import secrets
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator
from starlette.exceptions import HTTPException

from ..backends.base import check_window
from ..errors import PrivacyError, UserError
from ..fusion import SteeringParams
from ..generator import CoSteer, Generation
from ..methods import METHODS, PARAMETRIC_METHODS, Fusion, make_policy
from ..prompts import PAPER_SYSTEM_PROMPT, build_prompts
from ..sampling import SamplingConfig
from .guard import Guard, GuardPolicy, check_keys, host_name, local_origins, loopback_hosts, serve_app
from .wire import CloudRefused, CloudUnreachable

log = logging.getLogger(__name__)

DEFAULT_MODEL = "costeer"
MAX_TOKENS = 1 << 20  # beyond any model's window: the window check names the real limit
# While a request waits for its first token (queued or prefilling), how often to look
# whether its client went away: a queued request that nobody awaits is skipped.
DISCONNECT_POLL_S = 0.25


# --- the request, as OpenAI defines it (the fields this server uses) -----------------

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


@dataclass
class ProxyStats:
    """Generations by outcome (app.state.stats): what tests and operators can count."""

    completed: int = 0
    cancelled: int = 0
    failed: int = 0


# --- errors ------------------------------------------------------------------------

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


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


# --- who may ask, and for what -------------------------------------------------------

# The numbers a proxy takes after a parametric method's colon (methods.py reads each as
# below). Far beyond them the steering only turns the answer into noise or copies the
# private text out verbatim, so they are refused. The paper's own weight (costeer's c)
# is about 1.78; auto is mix:1.
PARAMETER_RANGES: dict[str, tuple[float, float]] = {
    "mix": (-8.0, 8.0),  # mix:W, the weight on the device's delta
    "unsure": (-8.0, 8.0),  # unsure:W, the same weight before (1 - p_max)
    "bounded": (0.0, 8.0),  # bounded:B, the clip in nats per token (B > 0)
    "cos": (-8.0, 8.0),  # cos:LAMBDA (He et al. sweep about -1..3)
    "ada": (0.0, 1.0),  # ada:P, a probability (strictly between)
}
assert set(PARAMETER_RANGES) == set(PARAMETRIC_METHODS)


def _range(prefix: str) -> str:
    low, high = PARAMETER_RANGES[prefix]
    return f"{prefix}:NUMBER with {low:g} <= NUMBER <= {high:g}"


@dataclass(frozen=True)
class MethodAllowList:
    """The methods a proxy serves: `names` (shown by /v1/models, in order), and every
    PREFIX:NUMBER within PARAMETER_RANGES for the prefixes in `parametric`."""

    names: tuple[str, ...] = tuple(METHODS)  # the published methods (auto among them)
    parametric: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str | None) -> "MethodAllowList":
        """`--methods`: comma-separated names; `mix`, `unsure`, `bounded` (or PREFIX:*, which
        `cos:*` and `ada:*` need, `cos` and `ada` being methods of their own) allow every
        weight in range; PREFIX:NUMBER allows that one. None: the published methods."""
        if text is None:
            return cls()
        names: list[str] = []
        parametric: set[str] = set()
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            prefix, colon, value = entry.partition(":")
            if (value == "*" and prefix in PARAMETRIC_METHODS) or (not colon and prefix in PARAMETRIC_METHODS
                                                                  and prefix not in METHODS):
                parametric.add(prefix)
            elif colon and prefix in PARAMETRIC_METHODS:
                try:
                    names.append(_parametric_method(entry, prefix))
                except UserError as exc:
                    raise UserError(f"--methods: {exc}") from None
            elif entry in METHODS:
                names.append(entry)
            else:
                raise UserError(f"--methods: unknown method {entry[:60]!r}: choose from {', '.join(METHODS)}, "
                                f"{', '.join(sorted(PARAMETRIC_METHODS))} or PREFIX:NUMBER")
        if not names and not parametric:
            raise UserError("--methods names no method")
        return cls(tuple(dict.fromkeys(names)), frozenset(parametric))

    def allowed(self) -> str:
        return ", ".join([*self.names, *(_range(p) for p in sorted(self.parametric))])

    def resolve(self, name: str) -> str:
        """The method a request's model name selects, or an ApiError: 404 for a name that is
        no method, 400 (model_not_allowed) for one this proxy does not serve."""
        name = name or DEFAULT_MODEL
        shown = name[:60]
        prefix, colon, _ = name.partition(":")
        if colon and prefix in PARAMETRIC_METHODS:
            try:
                method = _parametric_method(name, prefix, check_range=prefix in self.parametric)
            except UserError as exc:
                raise _not_allowed(f"model {exc}; this proxy serves {self.allowed()}") from None
            if prefix in self.parametric or method in self.names:
                return method
        elif name in METHODS:
            if name in self.names:
                return name
        else:
            raise ApiError(404, f"model {shown!r} is not a costeer method: this proxy serves {self.allowed()}",
                           param="model", code="model_not_found")
        raise _not_allowed(f"model {shown!r} is not allowed on this proxy: it serves {self.allowed()}")


def _not_allowed(message: str) -> ApiError:
    return ApiError(400, _one_line(message), param="model", code="model_not_allowed")


def _parametric_method(name: str, prefix: str, check_range: bool = True) -> str:
    """PREFIX:NUMBER's canonical name (mix:0.50 is mix:0.5), or a UserError: a number out
    of PARAMETER_RANGES (with `check_range`) or one that methods.py refuses."""
    try:
        value = float(name.partition(":")[2])
    except ValueError:
        value = math.nan
    low, high = PARAMETER_RANGES[prefix]
    if check_range and math.isfinite(value) and not low <= value <= high:
        raise UserError(f"{name[:60]!r} is out of range: this proxy takes {_range(prefix)}")
    try:
        return make_policy(name).name  # a policy object only: no model work
    except UserError as exc:
        raise UserError(_one_line(f"{name[:60]!r}: {exc}")) from None


@dataclass(frozen=True)
class ProxyAccess:
    """Who may ask the proxy, from where, and for how much: `costeer proxy`'s flags.

    `api_key`: the key every request must carry (Authorization: Bearer KEY); None asks
    none (the command allows that on a loopback bind only). `host` and `port`: the bind;
    Host names allowed are the loopback ones, the bound name (unless 0.0.0.0 or ::) and
    `allow_hosts`; origins allowed are the proxy's own pages at those names and
    `allow_origins`: a browser page of any other origin is refused."""

    api_key: str | None
    host: str = "127.0.0.1"
    port: int = 8008
    allow_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    max_body_bytes: int = 2 * 2**20
    methods: MethodAllowList = MethodAllowList()
    max_queue: int = 8

    def __post_init__(self) -> None:  # refused at start, as one line
        if self.api_key is not None:
            check_keys([self.api_key], label="the proxy's API key")
        if self.max_queue < 1 or self.max_body_bytes < 1:
            raise UserError("--max-queue and --max-body-bytes must be >= 1")
        for origin in self.allow_origins:
            scheme, sep, rest = origin.partition("://")
            if scheme.lower() not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/"):
                raise UserError(f"--allow-origin takes scheme://host[:port] (such as http://localhost:3000), "
                                f"got {origin[:80]!r}")

    def hosts(self) -> frozenset[str]:
        bound = {host_name(self.host)} - {"0.0.0.0", "::", ""}
        return loopback_hosts() | bound | {host_name(h) for h in self.allow_hosts}

    def guard_policy(self) -> GuardPolicy:
        origins = local_origins(self.hosts(), self.port) | {o.lower().rstrip("/") for o in self.allow_origins}
        return GuardPolicy(api_keys=(self.api_key,) if self.api_key else (), open_paths=frozenset(),
                           allowed_hosts=self.hosts(), allowed_origins=origins, require_json=True,
                           max_body_bytes=self.max_body_bytes, max_in_flight=max(64, 4 * self.max_queue),
                           host_hint=" (allow it with --allow-host)", origin_hint=" (allow an origin with --allow-origin)")


def proxy_key_path() -> Path:
    """Where `costeer proxy` keeps its key: $XDG_CONFIG_HOME (or ~/.config)/costeer/proxy-key."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path(os.path.expanduser("~")) / ".config"
    return root / "costeer" / "proxy-key"


def proxy_key(path: Path | None = None) -> tuple[str, Path, bool]:
    """The proxy's key from its file, and whether it was made now: a missing file is made
    with a new key (secrets.token_urlsafe(32)), mode 0600, in a folder made 0700. A file
    other users could read or change, or a folder they could write to, is refused (not
    fixed: the key may have leaked; a new one is one delete away)."""
    path = path or proxy_key_path()
    folder = path.parent
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        mode = folder.stat()
    except OSError as exc:
        raise UserError(f"cannot make the proxy key's folder {folder}: {exc.strerror}") from None
    if mode.st_uid != os.getuid() or mode.st_mode & 0o022:
        raise UserError(f"the proxy key's folder {folder} is not yours alone (others can write to it): "
                        f"chmod 700 {folder}, or pass --api-key")
    created = False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:  # another proxy made it just now
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        else:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
                out.flush()
                os.fsync(out.fileno())
            created = True
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:  # a symbolic link (ELOOP), a folder, no permission
        raise UserError(f"cannot read the proxy key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise UserError(f"the proxy key file {path} is not a file of yours: delete it to make a new key")
        if info.st_mode & 0o077:
            raise UserError(f"the proxy key file {path} is open to other users (mode {stat.S_IMODE(info.st_mode):o}), "
                            f"so it is refused: chmod 600 {path} if nobody else could have read it, else delete "
                            "it to make a new key")
        text = file.read(4096).decode("ascii", "replace").strip()
    try:
        (key,) = check_keys([text])
    except UserError as exc:
        raise UserError(f"the proxy key file {path}: {exc} (delete it to make a new key)") from None
    return key, path, created


class _Cancelled(Exception):
    """Raised from the text callback: the client went away, or the proxy is stopping."""


def classify(exc: BaseException, remote: bool) -> ApiError:
    """An error of a generation as the client sees it. UserError messages never quote
    the private context (errors.py); anything else is not shown at all."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, _Cancelled):
        return ApiError(503, "the request was cancelled (its client left, or the proxy is stopping)", "api_error",
                        code="cancelled")
    if isinstance(exc, CloudUnreachable) or (isinstance(exc, CloudRefused) and exc.status in (429, 503)):
        return ApiError(503, _one_line(str(exc)), "api_error", code="cloud_unavailable")
    if isinstance(exc, PrivacyError):
        return ApiError(403, _one_line(str(exc)), "permission_error", "model", "private_context_refused")
    if isinstance(exc, UserError):  # a remote cloud's answer, or a request the models cannot take
        return ApiError(502, _one_line(str(exc)), "api_error", code="cloud_error") if remote \
            else ApiError(400, _one_line(str(exc)))
    log.error("generation failed: %s", type(exc).__name__)  # the type only: a message may quote a prompt
    return ApiError(500, "the proxy failed on this request", "api_error")


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
            raise _Cancelled
        self.post("text", piece)


def _usage(g: Generation, public_tokens: int) -> dict:
    prompt = g.prompt_tokens.get("llm_public", g.prompt_tokens.get("slm_public", public_tokens))
    return {"prompt_tokens": prompt, "completion_tokens": g.new_tokens, "total_tokens": prompt + g.new_tokens}


def _extension(g: Generation) -> dict:
    """The `costeer` field: what OpenAI's response has no place for."""
    return {"method": g.method, "traffic": g.traffic, "context_tokens_reused": g.context_cache_tokens,
            "context_truncated": g.context_truncated, "prompt_tokens": g.prompt_tokens,
            "elapsed_s": round(g.elapsed_s, 4), "time_to_first_token_s": round(g.time_to_first_token_s, 4),
            "tokens_per_second": round(g.tokens_per_second, 2)}


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

    def submit(self, job: _Job, work: Callable[[], None]) -> None:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="costeer-proxy")
            self.live.add(job)
            job.loop.run_in_executor(self._pool, work)

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


def create_proxy_app(costeer: CoSteer, context: str = "", defaults: ProxyDefaults = ProxyDefaults(), *,
                     access: ProxyAccess) -> Guard:
    """The proxy's app behind its guard: `costeer` generates (the caller closes it),
    `context` is added to every request on the device, `defaults` fill what a request
    leaves out, `access` says who may ask. The guard passes attributes through to the
    FastAPI app (app.state.stats); its own refusals are counted in app.stats."""
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
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, "the body is not valid JSON").response()
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        # pydantic's message: it names the field, not its value
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return ApiError(400, f"{where}: {message}" if where else message, param=where).response()

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

    def generate(body: ChatRequest, method: str, job: _Job) -> tuple[Generation, int]:
        """On the worker thread: check the request against the device model, then generate."""
        if job.cancelled.is_set():  # its client left while it was queued
            raise _Cancelled
        messages = [m.turn() for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens or defaults.max_tokens
        try:
            sampling = SamplingConfig(defaults.temperature if body.temperature is None else body.temperature,
                                      defaults.top_p if body.top_p is None else body.top_p, defaults.top_k,
                                      defaults.seed if body.seed is None else body.seed)
            # the public prompt must fit the device model (which reads it too) with the new tokens;
            # refused here, before a remote cloud is asked, so it is the client's 400, not a cloud error
            device = costeer.model("slm")
            public_tokens = len(device.encode_chat(build_prompts(messages, "", defaults.system_prompt).public))
            check_window(device.name, device.context_window, public_tokens, max_tokens)
        except UserError as exc:
            raise ApiError(400, _one_line(str(exc)), param="messages") from None
        stop = defaults.stop if body.stop is None else [body.stop] if isinstance(body.stop, str) else body.stop
        g = costeer.generate(messages, context, method=method, max_new_tokens=max_tokens,
                             temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                             seed=sampling.seed, params=defaults.params, fusion=defaults.fusion, stop=stop,
                             system_prompt=defaults.system_prompt, max_context_tokens=defaults.max_context_tokens,
                             on_text=job.on_text)
        return g, public_tokens

    def run(body: ChatRequest, method: str, job: _Job) -> None:
        try:
            done = generate(body, method, job)
            stats.completed += 1
            job.post("done", done)
        except _Cancelled as exc:
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
            g, public_tokens = event[1]
            return reply("chat.completion", {"message": {"role": "assistant", "content": g.text},
                                             "finish_reason": _finish_reason(g)},
                         usage=_usage(g, public_tokens), costeer=_extension(g))

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
                g, public_tokens = value
                # the chunk with finish_reason carries the costeer field; usage comes last, as OpenAI sends it
                yield chunk({}, _finish_reason(g), costeer=_extension(g))
                if include_usage:
                    yield _sse(reply("chat.completion.chunk", {}, usage=_usage(g, public_tokens)))
            yield _sse("[DONE]")

        return _ClosingStream(events(event), job.cancelled.set)

    return Guard(app, access.guard_policy(), render_guard_error)


def serve_proxy(costeer: CoSteer, context: str, defaults: ProxyDefaults, access: ProxyAccess) -> None:
    serve_app(create_proxy_app(costeer, context, defaults, access=access), access.host, access.port)
