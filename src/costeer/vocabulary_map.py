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
log p_with - log p_without. On the cloud's vocabulary it is that difference for a
shared token and 0 for a token the device cannot say in one piece: no evidence, no
steering. `project` gives rows whose difference is exactly that, up to one
constant per row pair, which the fusion ignores (log_softmax is shift-invariant).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .fusion import FUSION_DTYPE, log_softmax

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
    """Cloud token ids and the device token ids that spell the same bytes."""

    cloud_ids: np.ndarray  # int64, ascending
    device_ids: np.ndarray  # int64, device_ids[i] spells what cloud_ids[i] does
    cloud_vocab_size: int
    device_vocab_size: int

    @classmethod
    def between(cls, cloud_pieces: Sequence[bytes], device_pieces: Sequence[bytes],
                cloud_special: frozenset[int] = frozenset(), device_special: frozenset[int] = frozenset()) -> "VocabularyMap":
        """From each vocabulary's token bytes in id order. Where a vocabulary spells
        one text with several ids, the lowest id stands for it."""
        device_by_bytes: dict[bytes, int] = {}
        for i, piece in enumerate(device_pieces):
            if piece and i not in device_special:
                device_by_bytes.setdefault(piece, i)
        pairs = [(c, device_by_bytes[p]) for c, p in enumerate(cloud_pieces)
                 if p and c not in cloud_special and p in device_by_bytes]
        cloud_ids = np.array([c for c, _ in pairs], dtype=np.int64)
        device_ids = np.array([d for _, d in pairs], dtype=np.int64)
        return cls(cloud_ids, device_ids, len(cloud_pieces), len(device_pieces))

    @property
    def shared(self) -> int:
        return len(self.cloud_ids)

    def device_id(self, cloud_id: int) -> int | None:
        """The device token that spells cloud token `cloud_id`, or None."""
        lookup = self.__dict__.get("_lookup")
        if lookup is None:
            lookup = dict(zip(self.cloud_ids.tolist(), self.device_ids.tolist()))
            object.__setattr__(self, "_lookup", lookup)
        return lookup.get(cloud_id)

    def project(self, device_logits: np.ndarray) -> np.ndarray:
        """Device logits (n, device vocab) as rows over the cloud vocabulary: the
        device's log-probability at each shared token, 0 at every other. The
        difference of two rows is the local delta on shared tokens and 0 elsewhere,
        up to a constant."""
        rows = log_softmax(np.atleast_2d(device_logits))
        out = np.zeros((rows.shape[0], self.cloud_vocab_size), dtype=FUSION_DTYPE)
        out[:, self.cloud_ids] = rows[:, self.device_ids]
        return out

    @staticmethod
    def unsteered(n_rows: int, cloud_vocab_size: int) -> np.ndarray:
        """Rows whose delta is 0 everywhere: the device is not in step at this position."""
        return np.zeros((n_rows, cloud_vocab_size), dtype=FUSION_DTYPE)
