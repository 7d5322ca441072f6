"""results.jsonl: the run's rows, appended as they finish, so a run can be resumed.

Each finished row is one line written with a single write, then flushed and fsync'd:
a killed run loses at most the row in progress. On open, a last line without its
newline (the kill came mid-write) is cut off the file before anything is appended, so
it can neither be read as a row nor glued to the next one. Rows are keyed by
(id, method); a key already present is never written again. A lock file keeps two
runs from writing to the same folder at once. A file replaced or removed under a running
store (a git checkout or stash of the folder, say) is noticed at the next append, and the
rows the store holds that it lacks are written into it again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import IO

from ..errors import UserError

Key = tuple[str, str]

log = logging.getLogger(__name__)


def row_key(row: dict) -> Key:
    return str(row["id"]), str(row["method"])


def read_rows(path: Path) -> tuple[list[dict], int]:
    """The complete rows of `path` (first of any duplicate key) and the byte length they span."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # anything after the last newline is a torn write
    rows: list[dict] = []
    seen: set[Key] = set()
    for number, line in enumerate(data[:complete].splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = row_key(row)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
            raise UserError(f"{path} line {number} is not a result row; fix or delete that line to resume") from None
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows, complete


class ResultsStore:
    """Open with `with ResultsStore(path) as store:`; `store.rows` are the rows so far."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []
        self._done: set[Key] = set()
        self._file: IO[bytes] | None = None
        self._lock: IO[bytes] | None = None

    def __enter__(self) -> ResultsStore:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path.with_name(f".{self.path.name}.lock"), "wb")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel if we are killed
        except BlockingIOError:
            self._lock.close()
            raise UserError(f"another costeer eval is writing to {self.path.parent}") from None
        try:
            self.rows, complete = read_rows(self.path)
            self._done = {row_key(r) for r in self.rows}
            self._open(complete)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _open(self, complete: int) -> None:
        self._file = open(self.path, "ab")
        if self._file.tell() > complete:
            self._file.truncate(complete)

    def _follow_replaced_file(self) -> None:
        """If `path` is no longer the file this store writes to, open what is there now and
        write into it the rows it lacks, so that no finished row is only in a deleted file."""
        assert self._file is not None
        try:
            if os.path.samestat(os.fstat(self._file.fileno()), os.stat(self.path)):
                return
        except FileNotFoundError:
            pass
        self._file.close()
        on_disk, complete = read_rows(self.path)
        self._open(complete)
        there = {row_key(r) for r in on_disk}
        missing = [r for r in self.rows if row_key(r) not in there]
        self._write(missing)
        log.warning("costeer eval: %s was replaced while this run wrote to it; %s of its rows were written again",
                    self.path, len(missing))
        for row in on_disk:  # rows the new file brought: kept, and never written twice
            if row_key(row) not in self._done:
                self._done.add(row_key(row))
                self.rows.append(row)

    def _write(self, rows: list[dict]) -> None:
        assert self._file is not None, "store is not open"
        if rows:
            self._file.write(b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in rows))
            self._file.flush()
            os.fsync(self._file.fileno())

    def __exit__(self, *exc: object) -> None:
        for f in (self._file, self._lock):
            if f is not None:
                f.close()
        self._file = self._lock = None

    def done(self, key: Key) -> bool:
        return key in self._done

    def append(self, row: dict) -> None:
        key = row_key(row)
        if key in self._done:
            raise ValueError(f"row {key} is already stored")
        assert self._file is not None, "store is not open"
        self._follow_replaced_file()
        self._write([row])
        self._done.add(key)
        self.rows.append(row)
