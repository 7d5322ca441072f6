"""The server's session table on its own: no HTTP, no model, a clock the test moves.
Reservations and their caps (in all, per key, KV cells), idle expiry that only appending
renews, the absolute lifetime, sessions in use, and other keys' sessions."""

from __future__ import annotations

import itertools
from typing import Callable

import pytest

from costeer.transport.server.errors import ApiError
from costeer.transport.server.limits import ServerLimits
from costeer.transport.server.sessions import Occupancy, Session, SessionTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Table:
    """A SessionTable with a fake clock, and the sessions whose streams it closed."""

    def __init__(self, slots: int = 0, private_kv_budget: int = 1000, per_key_cap: int = 8,
                 close_streams: Callable[[Session], None] | None = None, **limits) -> None:
        self.clock = Clock()
        self.closed: list[str] = []
        self.limits = ServerLimits(**{"max_sessions": 8, "session_ttl_s": 300, "session_max_age_s": 3600, **limits})
        self.table = SessionTable(self.limits, slots=slots, private_kv_budget=private_kv_budget, per_key_cap=per_key_cap,
                                  close_streams=close_streams or (lambda s: self.closed.append(s.id)), clock=self.clock)
        self._ids = itertools.count()

    def open(self, key: str | None = None, kv_tokens: int = 10, wants_slot: bool = False) -> Session:
        slot = self.table.reserve(kv_tokens, wants_slot, key)
        session = Session(f"s{next(self._ids)}", key, group=None, prompt_tokens=4, budget=8, position=4,
                          kv_tokens=kv_tokens, slot=slot)
        self.table.add(session)
        return session

    def refusal(self, key: str | None = None, kv_tokens: int = 10, wants_slot: bool = False) -> ApiError:
        with pytest.raises(ApiError) as caught:
            self.table.reserve(kv_tokens, wants_slot, key)
        return caught.value

    def is_open(self, session: Session, key: str | None = None) -> bool:
        try:
            with self.table.using(session.id, key):
                return True
        except ApiError as exc:
            assert (exc.status, exc.kind) == (404, "unknown_session")
            return False


def test_reserve_takes_the_lowest_free_slot_then_the_private_budget_and_release_gives_both_back():
    t = Table(slots=2, private_kv_budget=100)
    assert t.table.reserve(10, True, None) == 0
    assert t.table.reserve(10, True, None) == 1
    assert t.table.reserve(30, True, None) is None  # no slot left: the private budget
    assert t.table.occupancy() == Occupancy(sessions=0, kv_tokens=50, free_slots=0)  # reserved, none opened yet
    t.table.release(10, 0, None)
    assert t.table.reserve(10, True, None) == 0
    t.table.release(30, None, None)
    assert t.table.reserve(100, False, None) is None  # the whole private budget is free again
    t.table.release(100, None, None)
    t.table.release(10, 0, None)
    t.table.release(10, 1, None)
    assert t.table.occupancy() == Occupancy(sessions=0, kv_tokens=0, free_slots=2)


def test_the_session_cap_refuses_with_the_time_until_an_idle_session_expires():
    t = Table(max_sessions=2)
    t.open()
    t.clock.advance(100)
    t.open()
    refusal = t.refusal()
    assert (refusal.status, refusal.kind) == (429, "too_many_sessions")
    assert refusal.message == "the server holds its maximum of 2 sessions; close one or retry later"
    assert refusal.headers == {"Retry-After": "200"}  # the first session idles out 300 s after it was opened


def test_the_session_cap_says_the_whole_ttl_when_every_session_is_in_use():
    t = Table(max_sessions=1)
    first = t.open()
    with t.table.using(first.id, None):
        assert t.refusal().headers == {"Retry-After": "300"}


def test_one_key_at_its_cap_is_refused_and_others_are_not():
    t = Table(per_key_cap=2)
    t.open("key-a")
    t.clock.advance(50)
    t.open("key-a")
    refusal = t.refusal("key-a")
    assert (refusal.status, refusal.kind) == (429, "too_many_sessions_for_key")
    assert refusal.message == ("this API key holds its maximum of 2 sessions (--max-sessions-per-key); "
                               "close one or retry later")
    assert refusal.headers == {"Retry-After": "250"}
    t.open("key-b")
    t.open()  # a keyless session counts against no key


def test_a_key_at_its_cap_is_told_so_even_when_the_server_is_full():
    t = Table(max_sessions=2, per_key_cap=2)
    t.open("key-a"), t.open("key-a")
    assert t.refusal("key-a").kind == "too_many_sessions_for_key"
    assert t.refusal("key-b").kind == "too_many_sessions"


def test_the_key_cap_counts_sessions_until_they_are_released():
    t = Table(per_key_cap=1)
    session = t.open("key-a")
    assert t.refusal("key-a").kind == "too_many_sessions_for_key"
    assert t.table.retire(session)
    t.open("key-a")


def test_the_kv_budget_refuses_what_does_not_fit():
    t = Table(private_kv_budget=100, max_kv_tokens=100)
    t.open(kv_tokens=60)
    t.clock.advance(20)
    refusal = t.refusal(kv_tokens=50)
    assert (refusal.status, refusal.kind) == (429, "server_memory_full")
    assert refusal.message == ("the server's sessions hold 60 of its 100 KV tokens; this session needs 50; "
                               "close one or retry later")
    assert refusal.headers == {"Retry-After": "280"}
    t.open(kv_tokens=40)  # what fits is admitted


def test_sessions_idle_past_their_ttl_expire_and_free_what_they_held():
    t = Table(slots=1)
    session = t.open(wants_slot=True)
    t.clock.advance(300)
    assert t.is_open(session)  # exactly the ttl: not yet
    t.clock.advance(1)
    t.table.expire_idle()
    assert t.closed == [session.id] and session.closed
    assert not t.is_open(session)
    assert t.table.occupancy() == Occupancy(sessions=0, kv_tokens=0, free_slots=1)


def test_looks_do_not_refresh_the_idle_timer_and_appending_does():
    t = Table()
    looked, stepped = t.open(), t.open()
    for _ in range(3):  # every 100 s: a look at one, a step on the other
        t.clock.advance(100)
        with t.table.using(looked.id, None):
            pass
        with t.table.using(stepped.id, None) as session:
            t.table.renew(session)
    t.clock.advance(1)
    assert not t.is_open(looked) and t.is_open(stepped)
    assert t.closed == [looked.id]


def test_a_session_is_closed_at_its_absolute_lifetime_however_busy():
    t = Table(session_max_age_s=1000)
    session = t.open()
    for _ in range(10):
        t.clock.advance(100)
        with t.table.using(session.id, None) as s:
            t.table.renew(s)
    t.clock.advance(1)
    assert not t.is_open(session) and t.closed == [session.id]


def test_a_session_past_its_lifetime_while_in_use_is_closed_on_its_next_request():
    t = Table(session_max_age_s=1000)
    session = t.open()
    with t.table.using(session.id, None):
        t.clock.advance(1001)
        t.table.expire_idle()
        assert t.closed == []  # a request is using it: it stays
        with pytest.raises(ApiError) as caught:
            with t.table.using(session.id, None):
                pass
        assert caught.value.kind == "unknown_session" and t.closed == [session.id]


def test_a_busy_session_does_not_expire_until_its_request_ends():
    t = Table()
    session = t.open()
    with t.table.using(session.id, None):
        t.clock.advance(1000)
        t.table.expire_idle()
        assert not session.closed
    t.table.expire_idle()
    assert session.closed and t.closed == [session.id]


def test_another_keys_session_is_reported_as_unknown():
    t = Table()
    session = t.open("key-a")
    assert not t.is_open(session, "key-b") and not t.is_open(session, None)
    assert t.is_open(session, "key-a")
    keyless = t.open(None)  # a server without keys: anyone who can connect
    assert t.is_open(keyless, "key-b")
    assert not t.is_open(Session("never-opened", None, None, 1, 1, 1, 1, None))


def test_closing_twice_closes_and_releases_once():
    t = Table()
    session = t.open(kv_tokens=25)
    assert t.table.retire(session) and not t.table.retire(session)
    assert t.closed == [session.id] and t.table.occupancy() == Occupancy(0, 0, 0)


def test_a_failing_close_still_frees_the_reservation():
    def failing(_: Session) -> None:
        raise RuntimeError("the model failed")
    t = Table(close_streams=failing)
    session = t.open(kv_tokens=25)
    with pytest.raises(RuntimeError):
        t.table.retire(session)
    assert session.closed and t.table.occupancy() == Occupancy(0, 0, 0) and not t.is_open(session)


def test_retire_all_closes_every_session():
    t = Table(slots=1)
    sessions = [t.open(wants_slot=True), t.open("key-a"), t.open("key-b", kv_tokens=40)]
    t.table.retire_all()
    assert sorted(t.closed) == sorted(s.id for s in sessions)
    assert t.table.occupancy() == Occupancy(sessions=0, kv_tokens=0, free_slots=1)
