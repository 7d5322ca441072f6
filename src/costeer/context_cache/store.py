"""The context cache's files on disk: one folder per model (its store), entries in it,
temporary files of writes under way; bounded in bytes, least recently used first out.

The folder is 0700, files 0600. Writes are atomic (a temporary file named with the
writer's pid, then `os.replace`); temporary files a killed writer left are swept once
they are an hour old and their writer is gone. Only files and folders named as the
cache names its own (and entries that start with MAGIC) are ever evicted or cleared.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
import time
from pathlib import Path

from ..backends.base import LanguageModel
from ..default_models import DIGESTS_FILE, DigestMemo, cache_dir
from ..errors import UserError
from .format import FORMAT_VERSION, MAGIC, SUFFIX, BadEntry, Entry, Store, read_entry

# The names the cache gives its own files: a store folder (model digest, state version),
# an entry (digest of its tokens), a temporary file (writer's pid, mkstemp's 8 characters)
_STORE_NAME = re.compile(r"[0-9a-f]{64}-[0-9a-f]{16}")
_ENTRY_NAME = re.compile(r"[0-9a-f]{32}" + re.escape(SUFFIX))
_TEMP_NAME = re.compile(r"\.tmp-(?:(\d+)-)?[a-z0-9_]{8}")
STALE_TEMP_S = 3600  # a write takes seconds: an hour-old temporary file is a killed writer's
DEFAULT_MAX_BYTES = 2 << 30


def default_folder() -> Path:
    """$COSTEER_CONTEXT_CACHE_DIR, else `context` in costeer's cache folder."""
    configured = os.environ.get("COSTEER_CONTEXT_CACHE_DIR")
    return Path(configured).expanduser() if configured else cache_dir() / "context"


def default_max_bytes() -> int:
    configured = os.environ.get("COSTEER_CONTEXT_CACHE_MAX_BYTES")
    if not configured:
        return DEFAULT_MAX_BYTES
    try:
        return int(configured)
    except ValueError:
        raise UserError(f"COSTEER_CONTEXT_CACHE_MAX_BYTES must be a number of bytes, got {configured!r}") from None


class CacheFiles:
    """The files of a cache in `folder`, bounded to `max_bytes` (ContextCache's own half)."""

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int | None = None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_folder()
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self._stores: dict[tuple, Store] = {}

    def _store(self, model: LanguageModel) -> Store:
        path = Path(model.path).resolve()
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, model.state_version)
        store = self._stores.get(key)
        if store is None:
            digest = self._model_digest(path, st)
            version = hashlib.sha256(f"{model.state_version}; format {FORMAT_VERSION}".encode()).hexdigest()[:16]
            store = self._stores[key] = Store(self.folder / f"{digest}-{version}", digest, model.state_version,
                                               max(1, model.prefix_state_block))
            for folder in (self.folder, store.folder):  # once per model and process: what killed writers left
                self._sweep_stale_temps(folder)
        return store

    def _model_digest(self, path: Path, st: os.stat_result) -> str:
        """SHA-256 of the model file, hashed once per (path, size, mtime, inode)."""
        self._make_dir(self.folder)
        memo = DigestMemo(self.folder / DIGESTS_FILE,
                          write=lambda memo_path, data: self._write_atomic(memo_path, [data]))
        return memo.sha256(path, st)

    def _entries(self, store: Store) -> list[Entry]:
        if not store.folder.is_dir():
            return []
        entries = []
        for path in sorted(store.folder.glob(f"*{SUFFIX}")):
            try:
                entries.append(read_entry(path, store))
            except BadEntry:
                self._discard(path)
            except FileNotFoundError:
                pass  # deleted meanwhile (another process)
        return entries

    def _store_folders(self) -> list[Path]:
        """The cache's own store folders: named by a model digest and a state version."""
        if not self.folder.is_dir():
            return []
        return [p for p in self.folder.iterdir() if _STORE_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]

    def _all_entries(self) -> list[tuple[Path, int, int]]:
        """(path, size, mtime_ns) of every entry, of every model: files named as entries
        are, in store folders, that start with MAGIC."""
        found = []
        for folder in self._store_folders():
            for path in folder.iterdir():
                if not _ENTRY_NAME.fullmatch(path.name):
                    continue
                try:
                    st = os.stat(path, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    with open(path, "rb") as f:
                        if f.read(len(MAGIC)) != MAGIC:
                            continue
                except OSError:  # deleted meanwhile (another process), or unreadable: not ours to judge
                    continue
                found.append((path, st.st_size, st.st_mtime_ns))
        return found

    @staticmethod
    def _temp_files(folder: Path) -> list[Path]:
        try:
            return [p for p in folder.iterdir() if _TEMP_NAME.fullmatch(p.name)]
        except OSError:
            return []

    def _sweep_stale_temps(self, folder: Path) -> None:
        """Delete the temporary files of writers that were killed mid-write (they hold
        private-derived state and would stay forever): an hour old, their writer gone."""
        now = time.time()
        for path in self._temp_files(folder):
            try:
                age = now - path.stat().st_mtime
            except OSError:
                continue
            writer = _TEMP_NAME.fullmatch(path.name).group(1)
            if age >= STALE_TEMP_S and not (writer and _process_alive(int(writer))):
                self._discard(path)

    def _evict(self) -> None:
        """Delete least recently used entries until the cache fits its bound."""
        files = sorted(self._all_entries(), key=lambda f: f[2])
        total = sum(size for _, size, _ in files)
        for path, size, _ in files:
            if total <= self.max_bytes:
                break
            self._discard(path)
            total -= size

    def _make_dir(self, path: Path) -> None:
        """Create `path` (and the cache folder) 0700, tightening them if looser."""
        for folder in (self.folder, path) if path != self.folder else (path,):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if folder.stat().st_mode & 0o077:
                os.chmod(folder, 0o700)

    def _write_atomic(self, path: Path, parts: list[bytes]) -> None:
        # mode 0600; the pid tells a sweep whether the writer may still be at work
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                for part in parts:
                    f.write(part)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    @staticmethod
    def _discard(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: asks only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except (OverflowError, OSError):
        return False
    return True
