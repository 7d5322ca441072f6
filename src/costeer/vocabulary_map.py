"""Where two tokenizers agree: the map CoSteer fuses on when the cloud and device
models come from different families.

Two tokens correspond when they spell the same bytes. Pieces are compared as the
bytes they stand for, so a byte-level BPE's "Ġhello" (GPT-2's space marker), a
SentencePiece "▁hello" and a plain " hello" are one token, and SentencePiece's
byte-fallback "<0xE2>" is the byte 0xE2 (`piece_bytes`). Backends already give
token bytes this way (llama.cpp's token_to_piece does); `piece_bytes` is the one
place that knows the markers, for vocabularies read as raw strings. Control
tokens (end of turn, padding) stand for no text and are never shared.

The device's distribution enters the fusion through the local delta
log p_with - log p_without. On the cloud's vocabulary, for a cloud token s it is
that difference of the device's probability that its next token begins with s's
bytes (its own token spelling s, or a longer one that starts so), and 0 for a token
that begins no device token: no evidence, no steering. `project` gives rows whose
difference is exactly that, up to one constant per row pair, which the fusion
ignores (log_softmax is shift-invariant).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .fusion import FUSION_DTYPE

SENTENCEPIECE_SPACE = "\u2581"  # ▁
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others
    (space, control bytes) for the code points 256 and up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_GPT2 = _gpt2_byte_decoder()


def piece_bytes(piece: str, scheme: str) -> bytes:
    """The bytes a token's vocabulary string stands for. `scheme`: "byte-level"
    (GPT-2 style BPE: Qwen, Llama 3), "sentencepiece" (Gemma, Llama 2) or "bytes"
    (the string is the text)."""
    if scheme == "byte-level":
        if all(ch in _GPT2 for ch in piece):
            return bytes(_GPT2[ch] for ch in piece)
        return piece.encode("utf-8")  # an added token written as text
    if scheme == "sentencepiece":
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return piece.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")
    if scheme == "bytes":
        return piece.encode("utf-8")
    raise ValueError(f"unknown tokenizer scheme {scheme!r}")


@dataclass(frozen=True)
class VocabularyMap:
    """Which device tokens each cloud token stands for.

    `cloud_ids[i]` and `device_ids[i]` spell the same bytes (the intersection: the
    alignment feeds such a token as the device's own). `prefix_cloud[j]` and
    `prefix_device[j]` list every pair where the device token's bytes begin with the
    cloud token's: the device's probability that its next text begins with a cloud
    token is the sum over its pairs. A name that Gemma spells " Thaddeus" and Qwen
    " Th" + "add" + "eus" then steers Qwen's " Th" with the mass of " Thaddeus"."""

    cloud_ids: np.ndarray  # int64, ascending
    device_ids: np.ndarray  # int64, device_ids[i] spells what cloud_ids[i] does
    prefix_cloud: np.ndarray  # int64: pairs (cloud, device) where the device token extends the cloud's
    prefix_device: np.ndarray
    cloud_vocab_size: int
    device_vocab_size: int

    @classmethod
    def between(cls, cloud_pieces: Sequence[bytes], device_pieces: Sequence[bytes],
                cloud_special: frozenset[int] = frozenset(), device_special: frozenset[int] = frozenset()) -> "VocabularyMap":
        """From each vocabulary's token bytes in id order. Where the device spells one
        text with several ids, the lowest stands for it in the intersection."""
        device_by_bytes: dict[bytes, int] = {}
        for i, piece in enumerate(device_pieces):
            if piece and i not in device_special:
                device_by_bytes.setdefault(piece, i)
        cloud_by_bytes: dict[bytes, list[int]] = {}
        for c, piece in enumerate(cloud_pieces):
            if piece and c not in cloud_special:
                cloud_by_bytes.setdefault(piece, []).append(c)
        pairs = sorted((c, device_by_bytes[p]) for p, ids in cloud_by_bytes.items() if p in device_by_bytes for c in ids)
        prefix: list[tuple[int, int]] = []
        for d, piece in enumerate(device_pieces):
            if piece and d not in device_special:
                for n in range(1, len(piece) + 1):
                    prefix.extend((c, d) for c in cloud_by_bytes.get(piece[:n], ()))
        exact = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        covering = np.array(prefix, dtype=np.int64).reshape(-1, 2)  # in device order: project reads p in order
        return cls(exact[:, 0], exact[:, 1], covering[:, 0], covering[:, 1], len(cloud_pieces), len(device_pieces))

    @property
    def shared(self) -> int:
        """Cloud tokens the device spells with one token of its own."""
        return len(self.cloud_ids)

    @property
    def covered(self) -> int:
        """Cloud tokens that begin at least one device token: those that get a delta."""
        return len(np.unique(self.prefix_cloud))

    def device_id(self, cloud_id: int) -> int | None:
        """The device token that spells cloud token `cloud_id`, or None."""
        lookup = self.__dict__.get("_lookup")
        if lookup is None:
            lookup = dict(zip(self.cloud_ids.tolist(), self.device_ids.tolist()))
            object.__setattr__(self, "_lookup", lookup)
        return lookup.get(cloud_id)

    def project(self, device_logits: np.ndarray) -> np.ndarray:
        """Device logits (n, device vocab) as rows over the cloud vocabulary: at each
        covered cloud token, the log of the device's probability that its next token
        begins with that token's bytes; 0 at every other. The difference of two rows is
        the local delta on covered tokens and 0 elsewhere, up to a constant per row."""
        rows = np.atleast_2d(np.asarray(device_logits, dtype=FUSION_DTYPE))
        out = np.zeros((rows.shape[0], self.cloud_vocab_size), dtype=FUSION_DTYPE)
        if not len(self.prefix_cloud):
            return out
        covered = self.__dict__.get("_covered")
        if covered is None:
            covered = np.flatnonzero(np.bincount(self.prefix_cloud, minlength=self.cloud_vocab_size))
            object.__setattr__(self, "_covered", covered)
        for row, target in zip(rows, out):
            top = row.max()
            p = np.exp(row - top)  # relative to the likeliest token: no overflow
            lse = top + np.log(p.sum())
            # one pass over the pairs, reading p in order (5x faster than a random gather here)
            mass = np.bincount(self.prefix_cloud, weights=p[self.prefix_device], minlength=self.cloud_vocab_size)
            with np.errstate(divide="ignore"):
                target[covered] = np.maximum(np.log(mass[covered]) + top - lse, _LOG_FLOOR)  # underflow: unlikeliest
        return out

    @staticmethod
    def unsteered(n_rows: int, cloud_vocab_size: int) -> np.ndarray:
        """Rows whose delta is 0 everywhere: the device is not in step at this position."""
        return np.zeros((n_rows, cloud_vocab_size), dtype=FUSION_DTYPE)


_LOG_FLOOR = -1e4
