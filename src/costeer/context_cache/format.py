"""A context cache entry's file: what it holds, read back without trusting it.

    MAGIC | uint32 header length | JSON header | int32 token ids | state bytes | logits

with the header {format, backend, model, n_tokens, state_bytes, logits_bytes, sha256
of tokens, state and logits}. The logits (float32, little-endian) are the next-token
logits after the last token, kept where the entry holds a whole prompt: a prompt equal
to it then starts with no prefill at all (logits_bytes 0: none). A file that is truncated, foreign (another model or backend) or corrupt
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

FORMAT_VERSION = 2  # 2: the logits after a whole prompt
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

    @property
    def has_logits(self) -> bool:
        return int(self.header.get("logits_bytes", 0)) > 0

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
            logits_bytes = int(header.get("logits_bytes", 0))
        except (ValueError, KeyError, TypeError):
            raise BadEntry("unreadable header") from None
        if (header.get("format") != FORMAT_VERSION or header.get("backend") != store.backend
                or header.get("model") != store.model_digest or n_tokens < 1 or state_bytes < 1
                or logits_bytes < 0 or logits_bytes % 4):
            raise BadEntry("foreign entry")
        data_offset = len(head) + length + 4 * n_tokens
        if size != data_offset + state_bytes + logits_bytes:
            raise BadEntry("truncated entry")
        tokens = np.frombuffer(f.read(4 * n_tokens), dtype="<i4").astype(np.int32)
    return Entry(path, tokens, data_offset, header)


def read_state(entry: Entry, store: Store) -> tuple[bytes, np.ndarray | None]:
    """The entry's state and its logits (None: it keeps none), after checking the file
    again and its digest."""
    fresh = read_entry(entry.path, store)
    if not np.array_equal(fresh.tokens, entry.tokens):
        raise BadEntry("entry changed")
    with open(entry.path, "rb") as f:
        f.seek(fresh.data_offset)
        data = f.read()
    state_bytes, logits_bytes = fresh.header["state_bytes"], int(fresh.header.get("logits_bytes", 0))
    if len(data) != state_bytes + logits_bytes:
        raise BadEntry("truncated entry")
    h = hashlib.sha256(fresh.tokens.astype("<i4").tobytes())
    h.update(data)
    if h.hexdigest() != fresh.header.get("sha256"):
        raise BadEntry("corrupt entry")
    logits = np.frombuffer(data[state_bytes:], dtype="<f4").astype(np.float32) if logits_bytes else None
    return data[:state_bytes], logits


def encode_entry(store: Store, n_tokens: int, tokens: bytes, state: bytes,
                 logits: np.ndarray | None = None) -> list[bytes]:
    """An entry's file, in parts: `tokens` (n_tokens int32 ids), the state after them, and
    the logits after them where the entry holds a whole prompt."""
    after = np.ascontiguousarray(logits, dtype="<f4").tobytes() if logits is not None else b""
    h = hashlib.sha256(tokens)
    h.update(state)
    h.update(after)
    header = json.dumps({
        "format": FORMAT_VERSION, "backend": store.backend, "model": store.model_digest,
        "n_tokens": n_tokens, "state_bytes": len(state), "logits_bytes": len(after), "sha256": h.hexdigest(),
    }).encode()
    return [MAGIC, _HEADER_LENGTH.pack(len(header)), header, tokens, state, after]
