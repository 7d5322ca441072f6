"""Every log record of this process, captured at the lowest level: for the tests that look
for private text in logs at their most verbose (support.servers.verbose_in_thread serves an
app so that uvicorn's records come here too)."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

# loggers that may not pass their records up to the root: they get the handler themselves
_MAY_NOT_PROPAGATE = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "fastapi", "costeer")


class Captured(logging.Handler):
    """Every record any logger emits, formatted with its traceback as it would be written.
    Kept are the texts `keep` picks, and every error (cut to `clip` characters if given);
    `markers` counts the records that hold `marker`."""

    def __init__(self, keep: Callable[[str], object], marker: str | None = None, clip: int | None = None) -> None:
        super().__init__(level=1)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._keep, self._marker, self._clip = keep, marker, clip
        self.kept: list[str] = []
        self.count, self.names, self.markers = 0, set(), 0

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        self.count += 1
        self.names.add(record.name)
        if self._marker is not None:
            self.markers += self._marker in text
        if self._keep(text) or record.levelno >= logging.ERROR:
            self.kept.append(text[: self._clip])


@contextlib.contextmanager
def capturing_every_log(handler: Captured) -> Iterator[Captured]:
    """`handler` on the root logger, which is set to its lowest level, and on the loggers
    that do not pass records up; all as it was again after."""
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(1)
    own = [logging.getLogger(n) for n in _MAY_NOT_PROPAGATE if not logging.getLogger(n).propagate]
    for logger in own:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for logger in own:
            logger.removeHandler(handler)
