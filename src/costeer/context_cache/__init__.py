"""A persistent cache of the device model's private-prompt prefill.

Every request reads the whole private context on the device model first (seconds
for a long context). Requests with the same context share the start of their
private prompt (the context comes first, see `prompts.py`), so the device keeps the
model's state (its KV cache) after that prompt, on disk, and the next request with
a prompt that starts the same way loads it and prefills only the rest.

Exact by construction: an entry holds the token ids its state was computed from;
a request reuses only the longest run of its own first tokens that equals an
entry's, cut to whole blocks of the backend's `prefix_state_block`; the backend
prefills every prompt in batches of that block from position 0 and lays out its
cells the same way with or without a restored prefix, so what follows is computed
exactly as a cold start computes it: the same logits, bit for bit, and the same
tokens.

Entries are derived from private data: the folder is 0700, files 0600. Each file:

    MAGIC | uint32 header length | JSON header | int32 token ids | state bytes

with the header {format, backend, model, n_tokens, state_bytes, sha256 of tokens
and state}. Nothing in an entry is trusted: a file that is truncated, foreign (another
model or backend) or corrupt (digest), or a state the backend refuses, is deleted
and the prompt is prefilled cold (and saved afresh). Writes are atomic (a temporary
file named with the writer's pid, then `os.replace`); temporary files a killed
writer left are swept once they are an hour old and their writer is gone. The folder
is bounded in bytes; the least recently used entries go first. Only files and folders
named as the cache names its own (and entries that start with MAGIC) are ever
evicted or cleared: a cache folder pointed at the wrong place loses nothing else.
Messages name files and sizes only, never their content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends.base import LanguageModel, PrefixRestore, PrefixStateError, StreamGroup
from .default_models import DIGESTS_FILE, DigestMemo, cache_dir
from .errors import UserError

FORMAT_VERSION = 1
MAGIC = b"COSTEER\x01"
SUFFIX = ".ctx"
# The names the cache gives its own files: a store folder (model digest, state version),
# an entry (digest of its tokens), a temporary file (writer's pid, mkstemp's 8 characters)
_STORE_NAME = re.compile(r"[0-9a-f]{64}-[0-9a-f]{16}")
_ENTRY_NAME = re.compile(r"[0-9a-f]{32}" + re.escape(SUFFIX))
_TEMP_NAME = re.compile(r"\.tmp-(?:(\d+)-)?[a-z0-9_]{8}")
STALE_TEMP_S = 3600  # a write takes seconds: an hour-old temporary file is a killed writer's
DEFAULT_MAX_BYTES = 2 << 30
# Shorter shared prefixes are not worth a file read (and are not a context).
MIN_SHARED_TOKENS = 64
_HEADER_LENGTH = struct.Struct("<I")
_MAX_HEADER = 1 << 16


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


class BadEntry(Exception):
    """An entry that must not be used (the message says why, never what it holds)."""


@dataclass(frozen=True)
class CacheInfo:
    folder: Path
    entries: int
    bytes: int


@dataclass
class _Entry:
    path: Path
    tokens: np.ndarray  # int32
    data_offset: int  # where the state starts
    header: dict

    def shared_prefix(self, prompt: np.ndarray) -> int:
        n = min(len(self.tokens), len(prompt))
        differ = np.flatnonzero(self.tokens[:n] != prompt[:n])
        return int(differ[0]) if len(differ) else n


@dataclass(frozen=True)
class _Store:
    """One model's entries: a folder named by the model file's digest and the backend's state version."""

    folder: Path
    model_digest: str
    backend: str
    block: int  # a reused prefix is a multiple of this many tokens


@dataclass(frozen=True)
class _Plan:
    entry: _Entry | None  # the entry to start from
    keep: int  # its tokens reused
    snapshot: int | None  # prompt tokens whose state to save (None: save nothing)
    replaces: _Entry | None  # the entry the saved state replaces


def _plan(entries: list[_Entry], prompt: np.ndarray, block: int) -> _Plan:
    """The entry sharing the longest prefix with `prompt`, and what to save after.

    Entries converge to what requests share: when most of the prompt is reused, the
    rest is a request, and an entry that goes on differently is cut back to the shared
    part (an entry that is the prompt's start, or holds all of it, is left alone).
    When most of the prompt is new (another context after a shared system prompt),
    the prompt is saved whole beside the entry, which other requests may still need.
    """
    n = len(prompt)
    best, shared = None, 0
    for entry in entries:  # ties: the shorter entry (a prefix of the prompt needs no rewrite)
        s = entry.shared_prefix(prompt)
        if s > shared or (s == shared and best is not None and len(entry.tokens) < len(best.tokens)):
            best, shared = entry, s
    # at least one prompt token is computed (its logits start the answer), and whole
    # blocks only (so what follows is computed in the batches a cold start uses)
    keep = min(shared, n - 1) // block * block
    whole = n if n > MIN_SHARED_TOKENS else None  # a shorter prompt could not serve another
    if best is None or keep < MIN_SHARED_TOKENS:
        return _Plan(None, 0, whole, None)  # a miss
    if 2 * keep < n:
        return _Plan(best, keep, whole, None)
    if shared < len(best.tokens) and shared < n:
        return _Plan(best, keep, keep, best)
    return _Plan(best, keep, None, None)


def _snapshots(plans: dict[int, _Plan]) -> dict[int, int]:
    return {i: p.snapshot for i, p in plans.items() if p.snapshot is not None}


class ContextCache:
    """Saved device-model states of private prompts, reused by prompts that start the same way."""

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int | None = None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_folder()
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self._stores: dict[tuple, _Store] = {}
        self._warned = False

    # -- the one call decoding makes ---------------------------------------------------

    def open_streams(self, model: LanguageModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     cached: Sequence[bool]) -> tuple[StreamGroup, int]:
        """`model.open_streams(prompts, max_new_tokens)`, with the streams where `cached[i]`
        is true started from the longest matching saved prefix; also how many prompt
        tokens were reused rather than prefilled."""
        if not model.supports_prefix_state or not any(cached):
            return model.open_streams(prompts, max_new_tokens), 0
        try:
            store = self._store(model)
            entries = self._entries(store)
        except OSError as exc:
            self._warn(f"not used ({exc.strerror or type(exc).__name__})")
            return model.open_streams(prompts, max_new_tokens), 0
        arrays = [np.asarray(p, dtype=np.int32) for p in prompts]
        plans = {i: _plan(entries, arrays[i], store.block) for i, c in enumerate(cached) if c}
        restore: dict[int, PrefixRestore] = {}
        for i, plan in list(plans.items()):
            if plan.entry is None:
                continue
            try:
                restore[i] = PrefixRestore(self._read_state(plan.entry, store), len(plan.entry.tokens), plan.keep)
                os.utime(plan.entry.path)  # used: last in line for eviction
            except (BadEntry, OSError):
                self._discard(plan.entry.path)
                plans[i] = _plan([], arrays[i], store.block)
        try:
            group = model.open_streams(prompts, max_new_tokens, restore=restore, snapshot=_snapshots(plans))
        except PrefixStateError:  # the backend refused a state: forget it, start cold
            for i in restore:
                self._discard(plans[i].entry.path)
            plans = {i: _plan([], arrays[i], store.block) for i in plans}
            restore = {}
            group = model.open_streams(prompts, max_new_tokens, snapshot=_snapshots(plans))
        try:
            self._save(store, plans, arrays, group.snapshots)
        except OSError as exc:
            self._warn(f"not written ({exc.strerror or type(exc).__name__})")
        return group, sum(r.keep for r in restore.values())

    # -- user commands -----------------------------------------------------------------

    def info(self) -> CacheInfo:
        files = self._all_entries()
        return CacheInfo(self.folder, len(files), sum(size for _, size, _ in files))

    def clear(self) -> CacheInfo:
        """Delete every entry, the cache's temporary files, its digest memo and its store
        folders once empty; what was freed. Nothing not named as the cache names its own
        is touched (the cache folder itself is kept)."""
        entries = total = 0
        stores = self._store_folders()
        ours = [(path, True) for path, _, _ in self._all_entries()]
        ours += [(p, False) for folder in (self.folder, *stores) for p in self._temp_files(folder)]
        ours.append((self.folder / DIGESTS_FILE, False))
        for path, entry in ours:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            total += size
            entries += entry
        for folder in stores:
            try:
                folder.rmdir()  # only if empty: a foreign file inside keeps it
            except OSError:
                pass
        self._stores.clear()
        return CacheInfo(self.folder, entries, total)

    # -- files -------------------------------------------------------------------------

    def _store(self, model: LanguageModel) -> _Store:
        path = Path(model.path).resolve()
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, model.state_version)
        store = self._stores.get(key)
        if store is None:
            digest = self._model_digest(path, st)
            version = hashlib.sha256(f"{model.state_version}; format {FORMAT_VERSION}".encode()).hexdigest()[:16]
            store = self._stores[key] = _Store(self.folder / f"{digest}-{version}", digest, model.state_version,
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

    def _entries(self, store: _Store) -> list[_Entry]:
        if not store.folder.is_dir():
            return []
        entries = []
        for path in sorted(store.folder.glob(f"*{SUFFIX}")):
            try:
                entries.append(self._read_entry(path, store))
            except BadEntry:
                self._discard(path)
            except FileNotFoundError:
                pass  # deleted meanwhile (another process)
        return entries

    def _read_entry(self, path: Path, store: _Store) -> _Entry:
        """Header and token ids, checked against the file's size and this model."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(len(MAGIC) + _HEADER_LENGTH.size)
            if len(head) < len(MAGIC) + _HEADER_LENGTH.size or head[: len(MAGIC)] != MAGIC:
                raise BadEntry("not a context cache entry")
            (length,) = _HEADER_LENGTH.unpack(head[len(MAGIC):])
            if length > _MAX_HEADER:
                raise BadEntry("header too long")
            try:
                header = json.loads(f.read(length))
                n_tokens, state_bytes = int(header["n_tokens"]), int(header["state_bytes"])
            except (ValueError, KeyError, TypeError):
                raise BadEntry("unreadable header") from None
            if (header.get("format") != FORMAT_VERSION or header.get("backend") != store.backend
                    or header.get("model") != store.model_digest or n_tokens < 1 or state_bytes < 1):
                raise BadEntry("foreign entry")
            data_offset = len(head) + length + 4 * n_tokens
            if size != data_offset + state_bytes:
                raise BadEntry("truncated entry")
            tokens = np.frombuffer(f.read(4 * n_tokens), dtype="<i4").astype(np.int32)
        return _Entry(path, tokens, data_offset, header)

    def _read_state(self, entry: _Entry, store: _Store) -> bytes:
        """The entry's state, after checking the file again and its digest."""
        fresh = self._read_entry(entry.path, store)
        if not np.array_equal(fresh.tokens, entry.tokens):
            raise BadEntry("entry changed")
        with open(entry.path, "rb") as f:
            f.seek(fresh.data_offset)
            state = f.read()
        if len(state) != fresh.header["state_bytes"]:
            raise BadEntry("truncated entry")
        h = hashlib.sha256(fresh.tokens.astype("<i4").tobytes())
        h.update(state)
        if h.hexdigest() != fresh.header.get("sha256"):
            raise BadEntry("corrupt entry")
        return state

    def _save(self, store: _Store, plans: dict[int, _Plan], prompts: list[np.ndarray],
              snapshots: dict[int, bytes]) -> None:
        wrote = False
        for i, plan in plans.items():
            state = snapshots.get(i)
            if plan.snapshot is None or state is None:
                continue
            tokens = prompts[i][: plan.snapshot].astype("<i4").tobytes()
            h = hashlib.sha256(tokens)
            h.update(state)
            header = json.dumps({
                "format": FORMAT_VERSION, "backend": store.backend, "model": store.model_digest,
                "n_tokens": plan.snapshot, "state_bytes": len(state), "sha256": h.hexdigest(),
            }).encode()
            if len(MAGIC) + 4 + len(header) + len(tokens) + len(state) > self.max_bytes:
                continue  # would evict itself
            path = store.folder / (hashlib.sha256(tokens).hexdigest()[:32] + SUFFIX)
            self._make_dir(store.folder)
            self._write_atomic(path, [MAGIC, _HEADER_LENGTH.pack(len(header)), header, tokens, state])
            wrote = True
            if plan.replaces is not None and plan.replaces.path != path:
                self._discard(plan.replaces.path)
        if wrote:
            self._sweep_stale_temps(store.folder)
            self._evict()

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

    def _warn(self, what: str) -> None:
        if not self._warned:
            print(f"costeer: private-context cache {what}", file=sys.stderr)
            self._warned = True


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
