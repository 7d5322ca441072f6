"""A clock for the server's sessions (create_app's `clock`) that a test moves on at will,
or runs fast: idle time and age pass without being slept through."""

from __future__ import annotations

import threading
import time


class SkippingClock:
    """time.monotonic, run `rate` times as fast, plus every skip so far: `skip(s)` ages
    every session by s seconds at once, as sleeping s seconds would (the sessions' own
    timers see no difference)."""

    def __init__(self, rate: float = 1.0) -> None:
        self.rate = rate
        self.skipped = 0.0
        self._origin = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._origin + (time.monotonic() - self._origin) * self.rate + self.skipped

    def skip(self, seconds: float) -> None:
        with self._lock:
            self.skipped += seconds
