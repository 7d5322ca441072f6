"""The cloud server's one compute thread: it batches the sessions' decode steps.

Requests arrive on many threads; the model runs on this one. Each tick it runs,
in order: every pending decode step of the batched sessions in one `BatchEngine`
call (so aggregate throughput grows with load), one block of one pending prefill
(prompts go in blocks, in turn, so a long prompt delays other sessions' steps by
one block, not by its whole length), and one exclusive job (work on a session with
a private cache: a lookahead tree node, a step or a prefill of a backend that
cannot batch). A request thread waits for its own result.

Devices send their next step only once they have the last answer, so steps of one
batch come back a few milliseconds apart; a batch run the moment the first one
arrives would hold only that one, and the sessions would settle into groups that
take turns. So before a batch the thread waits, briefly (GATHER_MAX_S, and at most
a fraction of a pass), for the steps of every session that stepped in the last two
batches.

A failure of the loop itself (not of one job), or a batch whose rows do not match its
steps, leaves the engine in an unknown state: every waiting request then fails at
once (SchedulerFailed, a 500 naming nothing) and later ones are refused
(SchedulerDown, a 503) rather than left to wait on a thread that is gone.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from concurrent.futures import Future
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import numpy as np

from ...backends.base import BatchEngine, StreamGroup

T = TypeVar("T")

GATHER_MAX_S = 0.03
GATHER_FRACTION = 0.3  # of the last decode pass's duration
STOP_TIMEOUT_S = 10.0  # a stop waits this long for the tick in progress, then gives up on it

log = logging.getLogger(__name__)


def describe_failure(exc: BaseException) -> str:
    """An exception's type and where it was raised, for a log, without its text: that
    may quote a prompt (a tokenizer's or a backend's message)."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__} at {where}" if where else type(exc).__name__


class SchedulerClosed(RuntimeError):
    """The server is shutting down."""


class SchedulerFailed(RuntimeError):
    """The compute thread failed while this request waited: its result will never come."""


class SchedulerDown(SchedulerClosed):
    """The compute thread failed earlier: nothing more can be computed (a subclass of
    SchedulerClosed, so that closing a session's streams then is not an error)."""


@dataclass
class _Prefill:
    slot: int
    prompt: Sequence[int]
    done: Future
    start: int = 0


@dataclass
class SchedulerStats:
    """Forward-pass counts, for /healthz and the load benchmark."""

    ticks: int = 0
    decode_calls: int = 0
    decoded_tokens: int = 0
    prefill_blocks: int = 0
    exclusive_jobs: int = 0
    decode_s: float = 0.0  # time in batched forward passes
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)


class Scheduler:
    def __init__(self, engine: BatchEngine | None) -> None:
        self.engine = engine
        self.stats = SchedulerStats()
        self._wake = threading.Condition()
        self._decodes: dict[int, tuple[int, Future]] = {}  # slot -> (token, its logits)
        self._prefills: collections.deque[_Prefill] = collections.deque()
        self._jobs: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()
        self._recent: list[set[int]] = [set(), set()]  # slots in the last two batches: expected back
        self._last_pass_s = 0.0
        self._stopping = False
        self._closed = False
        self._failed = False  # the loop failed: nothing more is computed
        self._thread: threading.Thread | None = None  # started by the first request after a stop

    @property
    def healthy(self) -> bool:
        return not self._failed

    # --- what request threads call -------------------------------------------------
    def run(self, job: Callable[[], T]) -> T:
        """Run job on the compute thread, alone, and return its result."""
        return self._submit(lambda f: self._jobs.append((job, f)))

    def prefill(self, slot: int, prompt: Sequence[int]) -> np.ndarray:
        """Fill an empty slot with prompt, block by block; the logits after it."""
        return self._submit(lambda f: self._prefills.append(_Prefill(slot, prompt, f)))

    def decode(self, slot: int, token: int) -> np.ndarray:
        """Append one token to a slot in the next batch; the logits after it."""
        def enqueue(f: Future) -> None:
            if slot in self._decodes:
                raise RuntimeError(f"slot {slot} already has a step pending")
            self._decodes[slot] = (token, f)
        return self._submit(enqueue)

    def free(self, slot: int) -> None:
        assert self.engine is not None

        def free_slot() -> None:
            self.engine.free(slot)
            for batch in self._recent:  # not expected back
                batch.discard(slot)
        self.run(free_slot)

    def _submit(self, enqueue: Callable[[Future], None]):
        done: Future = Future()
        with self._wake:
            if self._failed:
                raise SchedulerDown("the server's compute thread failed; it must be restarted")
            if self._closed or self._stopping:
                raise SchedulerClosed("the server is shutting down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="costeer-scheduler", daemon=True)
                self._thread.start()
            enqueue(done)
            self._wake.notify()
        return done.result()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """End the compute thread after the tick in progress; whatever still waits fails.
        A later request starts it again (an app's lifespan may run more than once).
        Waits at most timeout_s for the tick (a shutdown must not hang on a stuck
        forward pass); False when the thread was still running then."""
        with self._wake:
            thread, self._stopping = self._thread, True
            self._wake.notify()
        stopped = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            stopped = not thread.is_alive()
        with self._wake:
            if not stopped:  # the stuck thread exits on its own once it is no longer self._thread
                log.warning("the compute thread did not stop within %.0f s", timeout_s)
                self._fail_pending(SchedulerClosed("the server is shutting down"))
            self._thread, self._stopping = None, False
        return stopped

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop for good and free the engine's cache."""
        stopped = self.stop(timeout_s)
        with self._wake:
            self._closed = True
        # a thread still inside the engine would use freed memory: leave it to the process's exit
        if self.engine is not None and stopped:
            self.engine.close()

    # --- the compute thread ---------------------------------------------------------
    def _loop(self) -> None:
        me = threading.current_thread()
        taken: list[Future] = []  # taken off the queues this tick, not settled yet
        try:
            while True:
                with self._wake:
                    # a thread a timed-out stop gave up on has been replaced: it must not go on
                    while not (self._stopping or self._thread is not me or self._decodes or self._prefills or self._jobs):
                        self._wake.wait()
                    expected = len(self._recent[0] | self._recent[1] | set(self._decodes))
                    if self._decodes and len(self._decodes) < expected:
                        deadline = time.monotonic() + min(GATHER_MAX_S, GATHER_FRACTION * self._last_pass_s)
                        while len(self._decodes) < expected and not self._stopping and time.monotonic() < deadline:
                            self._wake.wait(max(0.0, deadline - time.monotonic()))
                    if self._thread is not me:
                        return
                    if self._stopping:
                        self._fail_pending(SchedulerClosed("the server is shutting down"))
                        return
                    decodes, self._decodes = self._decodes, {}
                    prefill = self._prefills.popleft() if self._prefills else None
                    job = self._jobs.popleft() if self._jobs else None
                    taken = [f for _, f in decodes.values()] + ([prefill.done] if prefill else []) + ([job[1]] if job else [])
                self._tick(decodes, prefill, job)
                taken = []
        except BaseException as exc:  # noqa: BLE001  (the loop itself failed: no request may wait for it)
            log.error("the compute thread failed; the server can compute nothing more: %s", describe_failure(exc))
            with self._wake:
                self._failed = True
                failed = SchedulerFailed("the server's compute thread failed")
                for future in taken:
                    _fail(future, failed)
                self._fail_pending(failed)

    def _tick(self, decodes: dict[int, tuple[int, Future]], prefill: _Prefill | None,
              job: tuple[Callable[[], object], Future] | None) -> None:
        self.stats.ticks += 1
        if decodes:
            self._run_decodes(decodes)
        if prefill is not None:
            self._run_prefill_block(prefill)
        if job is not None:
            self.stats.exclusive_jobs += 1
            _settle(job[1], job[0])

    def _run_decodes(self, decodes: dict[int, tuple[int, Future]]) -> None:
        assert self.engine is not None
        entries = [(slot, token) for slot, (token, _) in decodes.items()]
        self._recent = [self._recent[1], set(decodes)]
        start = time.monotonic()
        try:
            rows = self.engine.decode(entries)
        except BaseException as exc:  # every session in the batch is in an unknown state
            for _, future in decodes.values():
                future.set_exception(exc)
            return
        if len(rows) != len(entries):  # which row is whose is unknown: no session's state can be trusted
            raise RuntimeError(f"the batch engine returned {len(rows)} rows for {len(entries)} steps")
        self._last_pass_s = time.monotonic() - start
        self.stats.decode_s += self._last_pass_s
        self.stats.decode_calls += 1
        self.stats.decoded_tokens += len(entries)
        self.stats.batch_sizes[len(entries)] += 1
        for (_, future), row in zip(decodes.values(), rows):
            future.set_result(row)

    def _run_prefill_block(self, work: _Prefill) -> None:
        assert self.engine is not None
        try:
            work.start, logits = self.engine.prefill(work.slot, work.prompt, work.start)
        except BaseException as exc:
            work.done.set_exception(exc)
            return
        self.stats.prefill_blocks += 1
        if logits is not None:
            work.done.set_result(logits)
        else:
            with self._wake:  # to the back of the line: prompts take turns
                self._prefills.append(work)

    def _fail_pending(self, error: BaseException) -> None:
        """Fail every queued request; under self._wake."""
        for _, future in self._decodes.values():
            _fail(future, error)
        for work in self._prefills:
            _fail(work.done, error)
        for _, future in self._jobs:
            _fail(future, error)
        self._decodes.clear()
        self._prefills.clear()
        self._jobs.clear()


def _fail(future: Future, error: BaseException) -> None:
    if not future.done():  # a future settled already keeps its result
        future.set_exception(error)


def _settle(future: Future, job: Callable[[], object]) -> None:
    try:
        future.set_result(job())
    except BaseException as exc:
        future.set_exception(exc)


class BatchedStreams(StreamGroup):
    """One session's stream in a slot of the scheduler's engine: `advance` waits for
    the next batch. Closing frees the slot (the server then returns it to its pool)."""

    def __init__(self, scheduler: Scheduler, slot: int, prompt: Sequence[int]) -> None:
        self._scheduler, self.slot = scheduler, slot
        self._prompt_lengths = [len(prompt)]
        self._closed = False
        try:
            self._logits = scheduler.prefill(slot, prompt)[None, :]
        except BaseException:
            self.close()
            raise

    def logits(self) -> np.ndarray:
        return self._logits

    def advance(self, token_id: int) -> None:
        if self._closed:
            raise RuntimeError("stream group used after close")
        self._logits = self._scheduler.decode(self.slot, int(token_id))[None, :]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._scheduler.free(self.slot)
            except SchedulerClosed:
                pass  # the engine and its slots go as a whole
