"""Work a test only waits on (a process that loads models, a server that starts, a site that
builds), begun when the session starts: where the suite runs one test at a time (`-n 0`),
it runs on the machine's other core beside the tests before its own instead of in their
wake. On two xdist workers each job runs when its test asks (tests/conftest.py).

A test marked `early(job)` gets the job's result from the fixture `early_result`; run on
its own (no session start saw its marker), the job runs when asked for. `job(folder)` gets
an empty folder of its own. Jobs run one at a time, in the order of their tests; a result
with a close() that no test took is closed when the session ends.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, ContextManager

Job = Callable[[Path], Any]


class Early:
    def __init__(self, root: Path) -> None:
        self._root = root
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="early")  # the one other core
        self._futures: dict[Job, Future] = {}

    def start(self, job: Job) -> None:
        if job not in self._futures:
            self._futures[job] = self._pool.submit(job, Path(tempfile.mkdtemp(dir=self._root)))

    def result(self, job: Job) -> Any:
        self.start(job)
        return self._futures.pop(job).result()

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        for future in self._futures.values():
            if not future.cancelled() and future.exception() is None and hasattr(future.result(), "close"):
                future.result().close()
        self._futures.clear()


class Entered:
    """A context manager a job has already entered: `with` gives its value and leaves it."""

    def __init__(self, manager: ContextManager) -> None:
        self._manager = manager
        self.value = manager.__enter__()

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc) -> bool | None:
        manager, self._manager = self._manager, None
        return manager.__exit__(*exc) if manager is not None else None

    def close(self) -> None:
        self.__exit__(None, None, None)

