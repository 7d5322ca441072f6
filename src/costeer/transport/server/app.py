"""`costeer serve`: the cloud model behind an HTTP API (FastAPI + uvicorn).

Each session holds one KV-cached stream of the cloud model on the public prompt.
The model runs on one compute thread (scheduler.py): where the backend can batch,
a session lives in a slot of one shared cache and the steps of all sessions go
through one forward pass together; a session with a lookahead tree, or too long for
a slot, gets a cache of its own, worked on between batches.

Idle sessions expire, and every session after session_max_age_s however busy; the
number of sessions (in all and per API key), the KV cells they hold together (the
session table: sessions.py), prompt size and tokens are capped; every refusal is a 4xx JSON body naming the problem, and
an unexpected failure a 500 body that names nothing private.

Before the app reads a byte of a body, a guard (guard.py) checks the Host, the Origin,
the key and the declared size; it then reads the body against a size cap and a
deadline. Only /healthz (and the public schema) answer without a key, and /healthz then
says no more than {"ok": true}.

Lifecycle: an open reserves its slot and KV cells before the prefill; a session's
streams are closed (by DELETE, expiry, a failed step or shutdown) only while
holding its lock, and a step holding that lock answers 404 once it is closed, so
no request ever runs on freed model state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Sequence

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ...backends.base import LanguageModel, StreamGroup, check_window
from ...distribution import NextToken
from ...errors import UserError
from .errors import ApiError, error_body, invalid_request, unknown_session
from .limits import ServerLimits
from .scheduler import BatchedStreams, Scheduler, SchedulerClosed, SchedulerDown, describe_failure
from .sessions import Session, SessionTable
from ..protocol import (API_PREFIX, MAX_LOOKAHEAD_NODES, Distribution, ErrorBody, Lookahead, ModelInfo, OpenSession,
                        SessionOpened, Step, Vocabulary, encode_distribution, encode_tree_node)


log = logging.getLogger(__name__)


class _ContainFailures:
    """An exception escaping the app becomes the 500 body, and the log gets its type and
    where it was raised, not its text (which may quote a prompt): Starlette's own
    catch-all passes the exception on to uvicorn, which logs it whole."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001  (any failure: a clean 500, never a traceback in a log)
            route = getattr(scope.get("route"), "path", "?")  # the template: a path may carry anything
            log.error("%s %s failed: %s", scope.get("method"), route, describe_failure(exc))
            if started:  # a stream already under way: uvicorn closes the connection
                return
            body = json.dumps(error_body(500, "internal_error", "the server failed on this request")).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


# Paths served without a key: the health probe of a load balancer, and the API's schema
# (public: the same for every server, and the serve banner points to it).
OPEN_PATHS = frozenset({"/healthz", "/openapi.json"})


def check_exposure(host: str, api_keys: Sequence[str], insecure: bool) -> str | None:
    """Refuse to serve an open (keyless) server beyond this machine unless insecure is
    given; then the warning to print. A keyless server's only defence is that no one
    else can connect."""
    from ..guard import is_loopback

    if api_keys or is_loopback(host):
        return None
    if not insecure:
        raise UserError(f"--host {host} lets other machines connect, and there is no API key: give one with "
                        "--api-key or $COSTEER_API_KEY, or pass --insecure to serve it open to anyone who can reach it")
    return (f"WARNING: serving on {host} with no API key (--insecure): anyone who can reach this port can "
            "use the model and fill its sessions")


@dataclass(frozen=True)
class _TreeAsked:
    """The tree a reply carries: the nodes along a device's draft (top-k `draft_k` each),
    then the session's lookahead tree after the draft, if it has one."""

    draft: tuple[int, ...] = ()
    draft_k: int = 1
    lookahead: Lookahead | None = None

    def nodes(self, group: StreamGroup) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        tree = self.lookahead
        return group.lookahead(tree.width if tree else 1, tree.depth if tree else 0,
                               tree.min_probability if tree else 0.0, draft=self.draft)

    def top_k(self, path: tuple[int, ...]) -> int:
        return self.draft_k if len(path) <= len(self.draft) or self.lookahead is None else self.lookahead.top_k


def _distribution(group: StreamGroup, position: int, top_k: int | None, tree: _TreeAsked | None,
                  views: dict[tuple[int, ...], np.ndarray]) -> Distribution:
    """The next-token distribution, and the tree after it when asked for;
    `views` gets the logits of both."""
    views[()] = group.logits()[0].copy()
    reply = encode_distribution(NextToken.local(views[()]), position, top_k)
    if tree is not None:
        reply.tree = []
        for path, logits in tree.nodes(group):
            views[path] = logits
            reply.tree.append(encode_tree_node(path, NextToken.local(logits), tree.top_k(path)))
    return reply


def create_app(model: LanguageModel, api_keys: Sequence[str] = (), limits: ServerLimits = ServerLimits(),
               max_batch: int | None = None, *, host: str = "127.0.0.1", body_timeout_s: float = 30.0,
               clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """`api_keys` empty: open to anyone who can connect (bind to loopback then).
    `max_batch`: tokens in one batched forward pass (default: the most that keeps every
    session's numbers independent of the others'; more is faster).
    `host`: the address it is bound to; a keyless server on loopback answers only
    requests naming a loopback host or it (a web page that rebinds its own name to
    127.0.0.1 cannot reach it). `body_timeout_s`: the time a request body may take.
    `clock`: the seconds sessions' idle time and age are counted in (a test moves it on)."""
    api_keys = tuple(api_keys)
    # the shared cache holds max_sessions slots and is allocated now; sessions with
    # caches of their own share what is left of the KV budget
    engine = model.batch_engine(limits.max_sessions, limits.batch_slot_tokens, max_batch) \
        if limits.max_sessions * limits.batch_slot_tokens <= limits.max_kv_tokens else None
    scheduler = Scheduler(engine)

    def on_compute(group: StreamGroup, work):
        """Work on a session's streams: a slot's calls queue for the batch themselves; a
        cache of its own is worked on the compute thread, between batches."""
        return work() if isinstance(group, BatchedStreams) else scheduler.run(work)

    def close_group(group: StreamGroup) -> None:
        try:
            group.close() if isinstance(group, BatchedStreams) else scheduler.run(group.close)
        except SchedulerDown:
            pass  # nothing runs on the compute thread any more: the cache goes with the process

    def close_streams(session: Session) -> None:
        stop_tree(session)
        close_group(session.group)

    table = SessionTable(limits, slots=engine.slots if engine else 0,
                         private_kv_budget=limits.max_kv_tokens - (engine.slots * engine.slot_tokens if engine else 0),
                         per_key_cap=limits.per_key_cap(len(api_keys)), close_streams=close_streams, clock=clock)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        table.retire_all()  # free every KV cache while the model is still loaded (not in arbitrary order at exit)
        scheduler.stop()

    app = FastAPI(
        title="costeer cloud",
        version="1",
        description="Hosts the cloud LLM for CoSteer. It sees the public prompt and the chosen tokens only.",
        lifespan=lifespan,
        docs_url=None, redoc_url=None,  # pages for a browser (scripts from a CDN): no browser is served
    )
    app.state.scheduler = scheduler  # serve() frees its engine once the server is done
    _guard(app, api_keys, limits, host, body_timeout_s)
    info = ModelInfo(
        name=model.name,
        vocab_size=model.vocab_size,
        context_window=model.context_window,
        eos_token_ids=sorted(model.eos_token_ids),
        vocabulary_sha256=model.vocabulary_digest(),
        limits=limits.as_dict(len(api_keys)),
        features=["lookahead", "speculate"] if model.supports_lookahead else [],
    )

    vocabulary_reply: list[Vocabulary] = []

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(SchedulerClosed)
    async def _shutting_down(_: Request, exc: SchedulerClosed) -> JSONResponse:
        return ApiError(503, "shutting_down", str(exc), {"Retry-After": "5"}).response()

    @app.exception_handler(SchedulerDown)
    async def _down(_: Request, exc: SchedulerDown) -> JSONResponse:
        return ApiError(503, "unavailable", str(exc)).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_request(exc).response()

    def caller_key(request: Request) -> str | None:
        """The key the guard matched; it refused the request, unread, if none did."""
        key = getattr(request.state, "api_key", None)
        if api_keys and key is None:  # only if the guard were taken away: still no way in
            raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer KEY)")
        return key

    def fits_slot(kv_needed: int, trees: bool) -> bool:
        return engine is not None and not trees and kv_needed + 1 <= engine.slot_tokens

    @app.get(f"{API_PREFIX}/model", response_model=ModelInfo)
    def model_info(key: str | None = Depends(caller_key)) -> ModelInfo:
        return info

    @app.get(f"{API_PREFIX}/vocabulary", response_model=Vocabulary)
    def vocabulary(key: str | None = Depends(caller_key)) -> Vocabulary:
        """Every token's bytes, for a device model of another tokenizer."""
        if not vocabulary_reply:  # built once, on first request (a second or so for 150k tokens)
            vocabulary_reply.append(Vocabulary.of(model.vocabulary_fingerprint(), model.special_token_ids(),
                                                  info.vocabulary_sha256))
        return vocabulary_reply[0]

    @app.post(f"{API_PREFIX}/sessions", response_model=SessionOpened, responses={401: {"model": ErrorBody}, 413: {"model": ErrorBody}, 429: {"model": ErrorBody}})
    def open_session(body: OpenSession, key: str | None = Depends(caller_key)) -> SessionOpened:
        table.expire_idle()
        if body.max_new_tokens > limits.max_new_tokens:
            raise ApiError(422, "too_many_new_tokens", f"max_new_tokens {body.max_new_tokens} exceeds the server's limit of {limits.max_new_tokens}")
        chars = sum(len(m.content) for m in body.messages)
        if chars > 16 * limits.max_prompt_tokens:  # refuse before spending time tokenizing
            raise ApiError(413, "prompt_too_large", f"prompt of {chars} characters exceeds the server's limit of {limits.max_prompt_tokens} tokens")
        try:
            ids = model.encode_chat([m.model_dump() for m in body.messages])
        except UserError as exc:
            raise ApiError(422, "invalid_messages", str(exc)) from None
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(413, "prompt_too_large", f"prompt of {len(ids)} tokens exceeds the server's limit of {limits.max_prompt_tokens}")
        try:
            check_window(model.name, model.context_window, len(ids), body.max_new_tokens)
        except UserError as exc:
            raise ApiError(413, "prompt_too_large", str(exc)) from None
        if (body.lookahead is not None or body.speculate) and not model.supports_lookahead:
            raise ApiError(422, "lookahead_unsupported", f"this server's backend cannot compute lookahead trees or "
                           f"drafts for {model.name}")
        if body.lookahead is not None and body.lookahead.nodes() > MAX_LOOKAHEAD_NODES:
            raise ApiError(422, "lookahead_too_large", f"a lookahead tree of depth {body.lookahead.depth} and width "
                           f"{body.lookahead.width} has {body.lookahead.nodes()} nodes; the limit is {MAX_LOOKAHEAD_NODES}")
        # room past the new tokens for the longest draft and the tree after it
        tree_depth = (body.lookahead.depth if body.lookahead else 0) + body.speculate
        kv_needed = len(ids) + body.max_new_tokens + (tree_depth + 1 if tree_depth else 0)
        slotted = fits_slot(kv_needed, tree_depth > 0)
        if not slotted and kv_needed > table.private_kv_budget:  # could never be admitted: not worth a retry
            raise ApiError(413, "prompt_too_large", f"prompt of {len(ids)} tokens plus {body.max_new_tokens} new tokens exceeds "
                           f"the server's KV budget of {table.private_kv_budget} for a session of this size")
        slot = table.reserve(kv_needed, slotted, key)
        session: Session | None = None
        try:
            if slot is not None:
                group: StreamGroup = BatchedStreams(scheduler, slot, ids)
            else:
                depth = {"lookahead_depth": tree_depth} if tree_depth else {}
                group, prefill = scheduler.run(lambda: model.open_streams_stepwise([ids], body.max_new_tokens, **depth))
            try:
                if slot is None:  # a block at a time, between other sessions' batches
                    while scheduler.run(lambda: next(prefill, StopIteration)) is not StopIteration:
                        pass
                views: dict = {}
                opening_tree = _TreeAsked(lookahead=body.lookahead) if body.lookahead else None
                first = on_compute(group, lambda: _distribution(group, len(ids), body.top_k, opening_tree, views))
            except BaseException:
                close_group(group)
                raise
            session = Session(secrets.token_urlsafe(16), key, group, len(ids), body.max_new_tokens, len(ids), kv_needed,
                              slot, lookahead=body.lookahead, speculate=body.speculate, views=views)
            table.add(session)
        finally:
            if session is None:  # the prefill failed: give the reservation back
                table.release(kv_needed, slot, key)
        return SessionOpened(session_id=session.id, prompt_tokens=len(ids), distribution=first)

    @app.post(f"{API_PREFIX}/sessions/{{session_id}}/step", response_model=Distribution, responses={404: {"model": ErrorBody}, 422: {"model": ErrorBody}})
    def step(session_id: str, body: Step, key: str | None = Depends(caller_key)) -> Distribution:
        with table.using(session_id, key) as session:
            if len(body.tokens) > limits.max_tokens_per_step:
                raise ApiError(422, "too_many_tokens", f"{len(body.tokens)} tokens in one step exceed the limit of {limits.max_tokens_per_step}")
            bad = [t for t in (*body.tokens, *body.draft) if not 0 <= t < model.vocab_size]
            if bad:
                raise ApiError(422, "token_out_of_range", f"token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})")
            check_draft(session, body)
            if not body.tokens:  # a look: no lock, so a tree being streamed goes on
                logits = session.views.get(tuple(body.path))
                if logits is None or session.closed:
                    raise ApiError(404, "unknown_node", "no such node in the session's latest lookahead tree") \
                        if body.path and not session.closed else unknown_session()
                return encode_distribution(NextToken.local(logits), session.position + len(body.path), body.top_k)
            if body.path:
                raise ApiError(422, "invalid_request", "path goes with a look (no tokens), not with tokens to append")
            if not session.stepping.acquire(blocking=False):
                raise ApiError(409, "session_busy", "the session is computing another step; send the next one "
                               "once that one has answered")
            try:
                return append_step(session, body)
            finally:
                session.stepping.release()

    def append_step(session: Session, body: Step) -> Distribution | StreamingResponse:
        """Append the step's tokens; under session.stepping. The session's lock is waited
        for: a stream may hold it for one tree node, a close to free the streams."""
        with session.lock:
            if session.closed:  # deleted or expired while this request waited for the lock
                raise unknown_session()
            if len(body.tokens) > session.budget:
                raise ApiError(422, "session_budget_exhausted", f"the session may append {session.budget} more tokens, not {len(body.tokens)}")
            session.steps += 1
            lookahead = session.lookahead if body.lookahead else None
            tree = _TreeAsked(tuple(body.draft), body.top_k or 1, lookahead) if body.draft or lookahead else None
            with failing_closes(session):
                stop_tree(session)

                def append() -> Distribution:
                    for token in body.tokens:
                        session.group.advance(token)
                        session.position += 1
                        session.budget -= 1
                    session.views = {}
                    return _distribution(session.group, session.position, body.top_k, None if body.stream else tree,
                                         session.views)
                reply = on_compute(session.group, append)
            table.renew(session)  # only appending renews a session's idle time
            if not (body.stream and tree):
                return reply
            session.tree = tree.nodes(session.group)  # computed as the stream goes
            return StreamingResponse(stream_tree(session, reply, tree, session.steps), media_type="application/x-ndjson")

    def check_draft(session: Session, body: Step) -> None:
        """A draft goes with tokens to append, as top-k nodes, no longer than the session
        allows (its ids are checked with the tokens')."""
        if not body.draft:
            return
        if len(body.draft) > session.speculate:
            raise ApiError(422, "draft_too_long", f"a draft of {len(body.draft)} tokens; the session was opened for "
                           f"{session.speculate} (speculate)")
        if not body.tokens or body.top_k is None:
            raise ApiError(422, "invalid_request", "a draft goes with tokens to append and a top_k (its nodes are top-k)")

    def stop_tree(session: Session) -> None:
        """End a lookahead still being computed, so the group drops its partial work; under session.lock."""
        if session.tree is not None:
            tree, session.tree = session.tree, None
            try:
                scheduler.run(tree.close)
            except SchedulerDown:
                pass  # nothing computes any more: the partial tree goes with the process

    @contextlib.contextmanager
    def failing_closes(session: Session) -> Iterator[None]:
        """A failure while computing leaves the session in an unknown state: it is closed, not served."""
        try:
            yield
        except SchedulerClosed:
            raise  # the server is going down: a 503, not a failure of this session
        except Exception as exc:
            log.error("step failed; session closed: %s", describe_failure(exc))
            table.close_locked(session)
            raise ApiError(500, "internal_error", "the step failed on the server; the session is closed") from None

    def stream_tree(session: Session, reply: Distribution, tree: _TreeAsked, step: int) -> Iterator[str]:
        """The distribution, then each tree node as it is computed. The session's lock is
        held while a node is computed, never across a yield (a client that goes away
        leaves the stream suspended), and a newer request on the session stops it."""
        yield reply.model_dump_json(exclude_none=True) + "\n"
        while True:
            with session.lock:
                if session.closed or session.steps != step or session.tree is None:
                    return
                try:
                    node = scheduler.run(lambda: next(session.tree, None))
                    if node is None:
                        session.tree = None
                        return
                    path, logits = node
                except Exception as exc:
                    log.error("lookahead failed; session closed: %s", describe_failure(exc))
                    session.tree = None
                    table.close_locked(session)
                    return
                session.views[path] = logits
            yield encode_tree_node(path, NextToken.local(logits), tree.top_k(path)).model_dump_json() + "\n"

    @app.delete(f"{API_PREFIX}/sessions/{{session_id}}", status_code=204, responses={404: {"model": ErrorBody}})
    def close_session(session_id: str, key: str | None = Depends(caller_key)) -> None:
        with table.using(session_id, key) as session:
            if not table.retire(session):  # a concurrent DELETE (or a failed step) closed it first
                raise unknown_session()

    @app.get("/healthz", response_model=None)
    def health(request: Request) -> dict[str, object] | JSONResponse:
        """{"ok": true} to anyone (a load balancer's probe); the figures to a key holder
        only, or to anyone on a keyless server. 503 {"ok": false} once nothing can be
        computed any more."""
        if not scheduler.healthy:
            return JSONResponse(status_code=503, content={"ok": False})
        if api_keys and getattr(request.state, "api_key", None) is None:
            return {"ok": True}
        held = table.occupancy()
        return {"ok": True, "sessions": held.sessions, "kv_tokens": held.kv_tokens,
                "max_sessions": limits.max_sessions, "max_kv_tokens": limits.max_kv_tokens,
                "batch_slots": engine.slots if engine else 0, "batch_slots_free": held.free_slots,
                "max_batch": engine.max_batch if engine else 1, "forward_passes": scheduler.stats.decode_calls,
                "batched_tokens": scheduler.stats.decoded_tokens, "decode_s": round(scheduler.stats.decode_s, 3)}

    return app


def _guard(app: FastAPI, api_keys: tuple[str, ...], limits: ServerLimits, host: str, body_timeout_s: float) -> None:
    """Put the guard in front of the app: key, Host, Origin, content type and size are
    checked before the app reads any byte of a body (FastAPI reads a whole body before
    its first line of code runs)."""
    from ..guard import Guard, GuardPolicy, is_loopback, loopback_hosts

    if api_keys:
        hosts = None  # a key is the defence: the server may be reached under any name
    elif is_loopback(host):
        hosts = loopback_hosts() | {host.lower().strip("[]")}  # against DNS rebinding from a web page
    else:
        hosts = None  # open to the network already (--insecure): a Host check adds nothing
    policy = GuardPolicy(api_keys=api_keys, open_paths=OPEN_PATHS, allowed_hosts=hosts, allowed_origins=frozenset(),
                         require_json=True, max_body_bytes=limits.max_body_bytes, body_timeout_s=body_timeout_s)
    app.add_middleware(_ContainFailures)
    app.add_middleware(Guard, policy=policy, render=error_body)  # added last: outside the other, first to run
    app.state.guard_policy = policy


def serve(model: LanguageModel, host: str, port: int, api_keys: Sequence[str], limits: ServerLimits,
          max_batch: int | None = None, *, insecure: bool = False, header_timeout_s: float = 10.0,
          max_connections: int = 1000) -> None:
    """Serve until interrupted. Requests' heads must arrive within header_timeout_s
    (slow clients cannot hold connections), and a shutdown waits a bounded time."""
    from ..guard import check_keys, serve_app

    keys = check_keys(api_keys) if api_keys else ()
    check_exposure(host, keys, insecure)
    app = create_app(model, keys, limits, max_batch, host=host)
    try:
        serve_app(app, host, port, header_timeout_s=header_timeout_s, keep_alive_s=5.0,
                  max_connections=max_connections, shutdown_timeout_s=5.0)
    finally:
        app.state.scheduler.close(timeout_s=5.0)
