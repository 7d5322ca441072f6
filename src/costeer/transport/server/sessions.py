"""The server's open sessions and what they hold, apart from HTTP and the model.

Each session holds a slot of the shared cache or KV cells of the private budget, and
counts against the caps on sessions in all and per API key; an open reserves them
before its prefill, so concurrent opens cannot overshoot. A session expires when idle
(only appending tokens renews it: a device looking in a loop does not keep its cells
from others), and after session_max_age_s however busy; a session in use by a request
is not idle. Another key's session is reported as unknown: its existence is not disclosed.

Lock order: a session's lock, then the table's; never the reverse.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import numpy as np

from ...backends.base import StreamGroup
from ..protocol import Lookahead
from .errors import ApiError, unknown_session
from .limits import ServerLimits


@dataclass
class Session:
    id: str
    key: str | None
    group: StreamGroup
    prompt_tokens: int
    budget: int  # tokens the session may still append
    position: int
    kv_tokens: int  # KV cells reserved for it: prompt, max_new_tokens and its lookahead tree
    slot: int | None  # its slot in the shared cache; None: a cache of its own
    lookahead: Lookahead | None = None
    speculate: int = 0  # the most draft tokens a step may carry
    last_used: float = 0.0  # when a step last appended tokens (looks do not count); set by the table
    created: float = 0.0  # for session_max_age_s; set by the table
    active: int = 0  # requests using it now (guarded by the table's lock): a session in use is not idle
    closed: bool = False  # set, with the group closed, only while holding `lock`
    steps: int = 0  # requests that moved it: a streaming tree stops once a newer one came
    tree: Iterator | None = None  # a lookahead still being computed (by a stream), only under `lock`
    # logits at the position and at each tree node sent since: a look reads them without
    # the lock, so it neither waits for nor stops a tree being computed
    views: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # held by the step request computing on it; a second one is refused (409) at once
    # rather than holding a worker thread while it waits
    stepping: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Usage:
    """What open sessions and opens still prefilling hold (guarded by the table's lock)."""

    sessions: int = 0
    kv_tokens: int = 0  # reserved by every session
    private_kv_tokens: int = 0  # reserved by sessions with caches of their own
    free_slots: list[int] = field(default_factory=list)
    per_key: collections.Counter = field(default_factory=collections.Counter)  # sessions by API key


class Occupancy(NamedTuple):
    sessions: int
    kv_tokens: int
    free_slots: int


class SessionTable:
    """The open sessions by id, what they hold, and their lifetimes; thread-safe."""

    def __init__(self, limits: ServerLimits, *, slots: int, private_kv_budget: int, per_key_cap: int,
                 close_streams: Callable[[Session], None], clock: Callable[[], float] = time.monotonic) -> None:
        """`slots`: of the shared cache (0: none); `private_kv_budget`: KV cells sessions with
        caches of their own share; `close_streams(session)`: frees a session's model state."""
        self.limits = limits
        self.private_kv_budget = private_kv_budget
        self.per_key_cap = per_key_cap
        self._close_streams = close_streams
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._usage = _Usage(free_slots=list(range(slots)))
        self._lock = threading.Lock()

    def occupancy(self) -> Occupancy:
        with self._lock:
            return Occupancy(len(self._sessions), self._usage.kv_tokens, len(self._usage.free_slots))

    def reserve(self, kv_needed: int, wants_slot: bool, key: str | None) -> int | None:
        """Take a session, and a slot of the shared cache or kv_needed cells of the private
        budget, or refuse with 429; atomic, so concurrent opens cannot overshoot. The slot, if any."""
        limits, usage = self.limits, self._usage
        with self._lock:
            # one key's cap first: a key at its cap is told so, whatever the others hold
            if key is not None and usage.per_key[key] >= self.per_key_cap:
                raise ApiError(429, "too_many_sessions_for_key", f"this API key holds its maximum of {self.per_key_cap} "
                               "sessions (--max-sessions-per-key); close one or retry later",
                               {"Retry-After": self._key_retry_after_s(key)})
            if usage.sessions >= limits.max_sessions:
                raise ApiError(429, "too_many_sessions", f"the server holds its maximum of {limits.max_sessions} sessions; close one or retry later",
                               {"Retry-After": self._retry_after_s(kv_needed, wants_slot)})
            # the lowest free slot: sessions' slots stay together, which batches faster (backends/llama_cpp/batch.py)
            slot = usage.free_slots.pop(usage.free_slots.index(min(usage.free_slots))) \
                if wants_slot and usage.free_slots else None
            if slot is None:
                if usage.private_kv_tokens + kv_needed > self.private_kv_budget:
                    raise ApiError(429, "server_memory_full", f"the server's sessions hold {usage.kv_tokens} of its {limits.max_kv_tokens} "
                                   f"KV tokens; this session needs {kv_needed}; close one or retry later",
                                   {"Retry-After": self._retry_after_s(kv_needed, False)})
                usage.private_kv_tokens += kv_needed
            usage.sessions += 1
            usage.kv_tokens += kv_needed
            if key is not None:
                usage.per_key[key] += 1
            return slot

    def release(self, kv_needed: int, slot: int | None, key: str | None) -> None:
        usage = self._usage
        with self._lock:
            usage.sessions -= 1
            usage.kv_tokens -= kv_needed
            if key is not None:
                usage.per_key[key] -= 1
                if not usage.per_key[key]:
                    del usage.per_key[key]
            if slot is None:
                usage.private_kv_tokens -= kv_needed
            else:
                usage.free_slots.append(slot)

    def add(self, session: Session) -> None:
        """A session opened on a reservation: from now on requests find it, and its lifetime runs."""
        session.created = session.last_used = self._clock()
        with self._lock:
            self._sessions[session.id] = session

    def renew(self, session: Session) -> None:
        """Tokens were appended: the session's idle time starts again (a look does not renew it)."""
        session.last_used = self._clock()

    @contextlib.contextmanager
    def using(self, session_id: str, key: str | None) -> Iterator[Session]:
        """The caller's session, marked in use (so it does not expire) for the request's duration."""
        self.expire_idle()
        with self._lock:
            session = self._sessions.get(session_id)
            # another key's session is reported as unknown: its existence is not disclosed
            if session is None or (session.key is not None and not hmac.compare_digest(session.key, key or "")):
                raise unknown_session()
            aged = self._too_old(session, self._clock())
            if aged:  # past its lifetime while in use: closed now, as if expired
                del self._sessions[session.id]
            else:
                session.active += 1
        if aged:
            self.retire(session)
            raise unknown_session()
        try:
            yield session
        finally:
            with self._lock:
                session.active -= 1

    def expire_idle(self) -> None:
        now = self._clock()
        with self._lock:
            expired = [s for s in self._sessions.values()
                       if s.active == 0 and (now - s.last_used > self.limits.session_ttl_s or self._too_old(s, now))]
            for s in expired:
                del self._sessions[s.id]  # no request can find it from here on
        for s in expired:
            self.retire(s)

    def close_locked(self, session: Session) -> bool:
        """Close the session's streams and free its reservation; the caller holds session.lock.
        False when it was already closed."""
        if session.closed:
            return False
        session.closed = True
        try:
            self._close_streams(session)
        finally:
            with self._lock:
                if self._sessions.get(session.id) is session:
                    del self._sessions[session.id]
            self.release(session.kv_tokens, session.slot, session.key)
        return True

    def retire(self, session: Session) -> bool:
        with session.lock:  # waits for a step that is computing on it
            return self.close_locked(session)

    def retire_all(self) -> None:
        with self._lock:
            remaining = list(self._sessions.values())
        for session in remaining:
            self.retire(session)

    def _too_old(self, session: Session, now: float) -> bool:
        return now - session.created > self.limits.session_max_age_s

    def _retry_after_s(self, kv_needed: int, slotted: bool) -> str:
        """Seconds until enough idle sessions expire to admit this open (a hint); under the lock."""
        limits, usage, now = self.limits, self._usage, self._clock()
        free_sessions = limits.max_sessions - usage.sessions
        free_kv = len(usage.free_slots) if slotted else self.private_kv_budget - usage.private_kv_tokens
        needed = 1 if slotted else kv_needed
        for s in sorted((s for s in self._sessions.values() if s.active == 0), key=lambda s: s.last_used):
            free_sessions += 1
            free_kv += (s.slot is not None) if slotted else (0 if s.slot is not None else s.kv_tokens)
            if free_sessions >= 1 and free_kv >= needed:
                return str(max(1, math.ceil(s.last_used + limits.session_ttl_s - now)))
        return str(max(1, limits.session_ttl_s))  # held by sessions in use or still opening

    def _key_retry_after_s(self, key: str) -> str:
        """Seconds until the first of this key's idle sessions expires (a hint); under the lock."""
        limits, now = self.limits, self._clock()
        ends = [min(s.last_used + limits.session_ttl_s, s.created + limits.session_max_age_s)
                for s in self._sessions.values() if s.key == key and s.active == 0]
        return str(max(1, math.ceil(min(ends) - now))) if ends else str(max(1, limits.session_ttl_s))
