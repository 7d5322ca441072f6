"""A context cache entry's file: what it holds, read back without trusting it.

    MAGIC | uint32 header length | JSON header | int32 token ids | state bytes

with the header {format, backend, model, n_tokens, state_bytes, sha256 of tokens
and state}. A file that is truncated, foreign (another model or backend) or corrupt
(digest) is a BadEntry.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MAGIC = b"COSTEER\x01"
SUFFIX = ".ctx"
_HEADER_LENGTH = struct.Struct("<I")
_MAX_HEADER = 1 << 16


class BadEntry(Exception):
    """An entry that must not be used (the message says why, never what it holds)."""


@dataclass
class Entry:
    path: Path
    tokens: np.ndarray  # int32
    data_offset: int  # where the state starts
    header: dict

    def shared_prefix(self, prompt: np.ndarray) -> int:
        n = min(len(self.tokens), len(prompt))
        differ = np.flatnonzero(self.tokens[:n] != prompt[:n])
        return int(differ[0]) if len(differ) else n


@dataclass(frozen=True)
class Store:
    """One model's entries: a folder named by the model file's digest and the backend's state version."""

    folder: Path
    model_digest: str
    backend: str
    block: int  # a reused prefix is a multiple of this many tokens


def read_entry(path: Path, store: Store) -> Entry:
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
    return Entry(path, tokens, data_offset, header)


def read_state(entry: Entry, store: Store) -> bytes:
    """The entry's state, after checking the file again and its digest."""
    fresh = read_entry(entry.path, store)
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


def encode_entry(store: Store, n_tokens: int, tokens: bytes, state: bytes) -> list[bytes]:
    """An entry's file, in parts: `tokens` (n_tokens int32 ids) and the state after them."""
    h = hashlib.sha256(tokens)
    h.update(state)
    header = json.dumps({
        "format": FORMAT_VERSION, "backend": store.backend, "model": store.model_digest,
        "n_tokens": n_tokens, "state_bytes": len(state), "sha256": h.hexdigest(),
    }).encode()
    return [MAGIC, _HEADER_LENGTH.pack(len(header)), header, tokens, state]
