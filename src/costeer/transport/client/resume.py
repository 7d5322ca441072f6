"""When a session on a `costeer serve` that failed or restarted is reopened, and how
often it is tried: which failures may be a server going away, how long to keep trying,
and the pauses between tries. What a try sends is the session's (served.py)."""

from __future__ import annotations

import threading
import time
from typing import Callable

from ...errors import UserError
from ..wire import CloudRefused, CloudUnreachable

RESUME_BACKOFF_S = (0.5, 4.0)  # first pause between tries to reopen a session, doubling up to the second


def resumable(exc: Exception) -> str | None:
    """Why `exc` may be a server going away (a reason to report), or None: it is not,
    so it fails at once (a bad key, a bad request, a cap)."""
    if isinstance(exc, CloudUnreachable):
        return exc.reason
    if isinstance(exc, CloudRefused):
        if exc.status == 404 and exc.kind == "unknown_session":
            return "it no longer knows the session"
        if exc.status in (429, 502, 503, 504):  # busy, or a proxy in front of a server that is down
            return f"HTTP {exc.status}"
    return None


class Resumer:
    """Tries to reopen a session for `retry_for_s` seconds after a failure that may be a
    restart (0: never), pausing between tries; then gives up in one line."""

    def __init__(self, retry_for_s: float, sender: str) -> None:
        """`sender`: the server in messages ("the cloud at URL")."""
        self.retry_for_s = retry_for_s
        self._sender = sender
        self.resumes = 0
        self.closing = threading.Event()  # set when the session closes: ends a wait between tries

    def applies_to(self, failure: Exception) -> bool:
        return self.retry_for_s > 0 and resumable(failure) is not None

    def reopen(self, try_once: Callable[[], None], failure: CloudUnreachable | CloudRefused) -> None:
        """try_once() until it succeeds, a failure is not a restart's, or the window ends."""
        window = self.retry_for_s
        deadline = time.monotonic() + window
        pause, tries = RESUME_BACKOFF_S[0], 0
        while True:
            reason = resumable(failure)
            if reason is None:
                raise failure
            left = deadline - time.monotonic()
            if left <= 0 or self.closing.is_set():
                raise UserError(f"{self._sender} stopped answering ({reason}) and did not come "
                                f"back within {window:g} s") from None
            if tries:  # a restarted server answers at once: the first try does not wait
                hint = failure.retry_after if isinstance(failure, CloudRefused) else None
                if self.closing.wait(min(hint or pause, left)):
                    continue
                pause = min(2 * pause, RESUME_BACKOFF_S[1])
            tries += 1
            try:
                try_once()
                self.resumes += 1
                return
            except (CloudUnreachable, CloudRefused) as exc:
                failure = exc
