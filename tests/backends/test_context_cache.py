"""The device's private-context cache (context_cache/), on a NumPy model that can
save and restore its state: reuse, exactness, integrity, privacy, eviction, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from costeer import CoSteer, ContextCache
from costeer.cli import main
from costeer.context_cache import DIGESTS_FILE, MAGIC, SUFFIX
from support.fakes import NumpyModel, PrefixModel

CONTEXT = "I am Ada. I live in Lisbon and keep bees. " * 4  # about 170 byte tokens
REQUEST_A, REQUEST_B = "Plan my weekend.", "Write me a short poem."


@pytest.fixture
def device(tmp_path):
    weights = tmp_path / "device.bin"
    weights.write_bytes(b"pretend weights")
    return PrefixModel(weights)


def pair(device, cache) -> CoSteer:
    return CoSteer(llm=NumpyModel(1, "numpy-cloud"), slm=device, context_cache=cache)


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*/*{SUFFIX}"))


def context_entries(folder: Path) -> list[Path]:
    """The entries of private prompts (the context is about 170 byte tokens), not of the
    public ones (about 70)."""
    return [e for e in entries(folder) if _split(e)[0]["n_tokens"] >= 150]


def generate(cs: CoSteer, request: str, context: str = CONTEXT, method: str = "costeer"):
    return cs.generate(request, context, method=method, max_new_tokens=12)


def test_requests_with_one_context_reuse_its_prefill_and_give_the_cold_tokens(tmp_path, device):
    cold = pair(device, False)
    cold_a, cold_b = generate(cold, REQUEST_A), generate(cold, REQUEST_B)
    assert cold_a.context_cache_tokens == 0 and not (tmp_path / "cache").exists()
    warm = pair(device, ContextCache(tmp_path / "cache"))

    first = generate(warm, REQUEST_A)  # a miss: both of the device's prompts are saved whole
    n_a, n_public = first.prompt_tokens["slm_private"], first.prompt_tokens["slm_public"]
    assert first.context_cache_tokens == 0 and device.prefilled[-1] == n_a + n_public
    assert sorted(saved_tokens(tmp_path / "cache").values()) == sorted([n_a, n_public])

    again = generate(warm, REQUEST_A)  # the same request: both restored whole, with their logits
    assert again.context_cache_tokens == n_a and device.prefilled[-1] == 0
    other = generate(warm, REQUEST_B)  # the same context: its shared part is reused
    assert 150 < other.context_cache_tokens < n_a and other.context_cache_tokens % 4 == 0
    assert [g.token_ids for g in (first, again, other)] == [cold_a.token_ids, cold_a.token_ids, cold_b.token_ids]
    # the whole entry of A was cut back to what the two prompts share
    assert n_a not in saved_tokens(tmp_path / "cache").values()
    assert other.context_cache_tokens in saved_tokens(tmp_path / "cache").values()

    # the shared entry serves A without a rewrite, and A is saved whole beside it
    shared = [e for e, n in saved_tokens(tmp_path / "cache").items() if n == other.context_cache_tokens]
    third = generate(warm, REQUEST_A)
    assert third.context_cache_tokens == other.context_cache_tokens and third.token_ids == cold_a.token_ids
    assert set(shared) <= set(entries(tmp_path / "cache")) and n_a in saved_tokens(tmp_path / "cache").values()
    fourth = generate(warm, REQUEST_A)
    assert fourth.context_cache_tokens == n_a and device.prefilled[-1] == 0 and fourth.token_ids == cold_a.token_ids


def saved_tokens(folder: Path) -> dict[Path, int]:
    return {e: _split(e)[0]["n_tokens"] for e in entries(folder)}


def test_public_prompts_are_saved_whole_for_a_repeat_and_methods_share_the_private_entry(tmp_path, device):
    warm = pair(device, ContextCache(tmp_path / "cache"))
    alone = generate(warm, REQUEST_A, method="slm")  # the public prompt only
    assert alone.context_cache_tokens == 0 and len(entries(tmp_path / "cache")) == 1
    again = generate(warm, REQUEST_A, method="slm")  # restored whole: no prefill, and no context tokens
    assert device.prefilled[-1] == 0 and again.context_cache_tokens == 0 and again.token_ids == alone.token_ids
    generate(warm, REQUEST_A, method="slm-context")
    assert generate(warm, REQUEST_A, method="light").context_cache_tokens > 0


def test_the_cache_folder_and_files_are_private(tmp_path, device):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    generate(pair(device, ContextCache(folder)), REQUEST_A)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # tightened
    saved = entries(folder)
    assert len(saved) == 2 and len(context_entries(folder)) == 1  # the private prompt and the public one
    assert {stat.S_IMODE(e.parent.stat().st_mode) for e in saved} == {0o700}
    for path in (*saved, folder / DIGESTS_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for entry in saved:
        assert CONTEXT.encode() not in entry.read_bytes()  # token ids, state and logits, not text


def _split(path: Path) -> tuple[dict, bytes]:
    """An entry's JSON header, and the token ids and state after it."""
    data = path.read_bytes()
    start = len(MAGIC) + 4
    end = start + int.from_bytes(data[len(MAGIC):start], "little")
    return json.loads(data[start:end]), data[end:]


def _write(path: Path, header: dict, rest: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(MAGIC + len(raw).to_bytes(4, "little") + raw + rest)


def _flip_state(path: Path) -> None:
    header, _ = _split(path)
    data = bytearray(path.read_bytes())
    data[-header["logits_bytes"] - 5] ^= 0xFF  # in the state, before the logits
    path.write_bytes(bytes(data))


def _flip_logits(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _foreign(path: Path) -> None:
    header, rest = _split(path)
    _write(path, {**header, "model": "f" * 64}, rest)


def _garbage(path: Path) -> None:
    path.write_bytes(b"not an entry at all")


def _refused(path: Path) -> None:
    """A well-formed entry with a matching digest whose state the backend refuses."""
    header, rest = _split(path)
    tokens, state = rest[: 4 * header["n_tokens"]], b"\0" * 8
    _write(path, {**header, "state_bytes": len(state), "logits_bytes": 0,
                  "sha256": hashlib.sha256(tokens + state).hexdigest()}, tokens + state)


@pytest.mark.parametrize("damage", [_flip_state, _flip_logits, _truncate, _foreign, _garbage, _refused])
def test_a_damaged_entry_is_dropped_and_rebuilt_with_the_same_tokens(tmp_path, device, damage):
    expected = generate(pair(device, False), REQUEST_A).token_ids
    warm = pair(device, ContextCache(tmp_path / "cache"))
    generate(warm, REQUEST_A)
    (entry,) = context_entries(tmp_path / "cache")
    damage(entry)
    rebuilt = generate(warm, REQUEST_A)
    assert rebuilt.context_cache_tokens == 0 and rebuilt.token_ids == expected
    assert len(context_entries(tmp_path / "cache")) == 1  # a fresh entry, which serves the next request
    assert generate(warm, REQUEST_A).context_cache_tokens > 0


def test_least_recently_used_entries_go_first_beyond_the_byte_bound(tmp_path, device):
    folder = tmp_path / "cache"
    contexts = [f"Profile {i}: " + CONTEXT for i in range(3)]
    saved = []
    for i, bound in ((0, None), (1, 2.5), (0, 2.5), (2, 2.5)):
        before = set(context_entries(folder))
        size = None if bound is None else int(bound * context_entries(folder)[0].stat().st_size)
        g = generate(pair(device, ContextCache(folder, max_bytes=size)), REQUEST_A, contexts[i])
        saved.append((g.context_cache_tokens, set(context_entries(folder)) - before))
    # 0 and 1 are saved; 0 is used again (now the newest); 2 pushes out the least recently used, 1
    # (the public prompt's small entry, the same request each time, is used every time)
    (entry_0,), (entry_1,), (entry_2,) = saved[0][1], saved[1][1], saved[3][1]
    assert saved[2][0] > 200 and set(context_entries(folder)) == {entry_0, entry_2}
    assert len(entries(folder)) == 3


def test_no_cache_and_unsupported_backends_write_nothing(tmp_path, device):
    generate(pair(device, False), REQUEST_A)
    generate(CoSteer(llm=NumpyModel(1), slm=NumpyModel(2), context_cache=ContextCache(tmp_path / "c2")), REQUEST_A)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "c2").exists()


def test_the_model_digest_is_hashed_once_per_file_version(tmp_path, device):
    folder = tmp_path / "cache"
    generate(pair(device, ContextCache(folder)), REQUEST_A)
    memo_path = folder / DIGESTS_FILE
    memo = json.loads(memo_path.read_text())
    (key,) = memo
    memo[key]["sha256"] = "0" * 64  # a warm start trusts the memo while size, mtime and inode agree
    memo_path.write_text(json.dumps(memo))
    generate(pair(device, ContextCache(folder)), REQUEST_A)
    assert any(p.name.startswith("0" * 64) for p in folder.iterdir())
    os.utime(device.path, ns=(1, 1))  # the file changed: hashed again
    generate(pair(device, ContextCache(folder)), REQUEST_A)
    assert json.loads(memo_path.read_text())[key]["sha256"] != "0" * 64


def test_an_unusable_cache_folder_warns_once_without_private_text(tmp_path, device, library_stderr):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    warm = pair(device, ContextCache(blocker / "cache"))
    expected = generate(pair(device, False), REQUEST_A).token_ids
    assert generate(warm, REQUEST_A).token_ids == expected
    generate(warm, REQUEST_B)
    err = library_stderr()
    assert err.count("context cache") == 1 and "Lisbon" not in err


def test_cache_info_and_clear_commands(tmp_path, device, monkeypatch, capsys):
    folder = tmp_path / "cache"
    monkeypatch.setenv("COSTEER_CONTEXT_CACHE_DIR", str(folder))
    generate(pair(device, ContextCache()), REQUEST_A)
    generate(pair(device, ContextCache()), REQUEST_A, "Another profile. " + CONTEXT)
    (folder / "notes.txt").write_text("not the cache's")
    size = sum(p.stat().st_size for p in entries(folder))
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    # two contexts, and the public prompt they share (the same request)
    assert f"{folder}" in out and "entries\t3" in out and f"bytes\t{size}" in out
    assert main(["cache", "clear"]) == 0
    out = capsys.readouterr().out
    assert "deleted 3 entries" in out and "models are kept" in out
    assert not entries(folder) and [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert main(["cache", "info"]) == 0 and "entries\t0" in capsys.readouterr().out


# --- the default models ------------------------------------------------------------

OTHER_PROMPT = "Suggest three gifts I would like."


@pytest.fixture
def warm_costeer(default_costeer, tmp_path):
    """The session's models (cold: no cache), with a cache in a fresh folder."""
    return CoSteer(llm=default_costeer.model("llm"), slm=default_costeer.model("slm"),
                   context_cache=ContextCache(tmp_path / "cache"))


@pytest.mark.models
def test_default_models_warm_cache_gives_the_cold_tokens(default_costeer, warm_costeer, profile_text):
    from support.example_profile import BIRTHDAY_PROMPT

    kwargs = dict(max_new_tokens=24)
    cold = [default_costeer.generate(p, profile_text, **kwargs) for p in (BIRTHDAY_PROMPT, OTHER_PROMPT)]
    miss, repeated, other = (warm_costeer.generate(p, profile_text, **kwargs)
                             for p in (BIRTHDAY_PROMPT, BIRTHDAY_PROMPT, OTHER_PROMPT))
    assert miss.context_cache_tokens == 0 and cold[0].context_cache_tokens == 0
    # the same request again starts from its whole saved prompt; another from the shared part
    assert repeated.context_cache_tokens == miss.prompt_tokens["slm_private"] and other.context_cache_tokens >= 128
    assert [miss.token_ids, repeated.token_ids, other.token_ids] == [cold[0].token_ids, cold[0].token_ids, cold[1].token_ids]


@pytest.mark.models
def test_default_models_restored_prefix_gives_bitwise_cold_logits(default_costeer, profile_text):
    """The backend's guarantee under the cache: a restored prefix, cut to whole blocks,
    then the rest prefilled, gives the cold logits bit for bit (also from a longer entry)."""
    from costeer.backends.base import PrefixRestore
    from costeer.prompts import build_prompts

    slm = default_costeer.model("slm")
    block = slm.prefix_state_block
    long_request = "Summarize: " + " ".join(f"item{i}" for i in range(200))
    prompts = [[slm.encode_chat(getattr(build_prompts(r, profile_text), kind)) for kind in ("private", "public")]
               for r in ("Hi", OTHER_PROMPT, long_request)]

    def run(streams, **kw):
        with slm.open_streams(streams, 4, **kw) as group:
            first = group.logits().copy()
            group.advance(int(np.argmax(first[0])))
            return [first, group.logits().copy()], getattr(group, "snapshots", {})

    for target in prompts[:2]:
        cold, _ = run(target)
        for source in prompts:
            _, snaps = run(source, snapshot={0: len(source[0])})
            shared = next(i for i, (a, b) in enumerate(zip(target[0] + [-1], source[0] + [-2])) if a != b)
            keep = min(shared, len(target[0]) - 1) // block * block
            warm, _ = run(target, restore={0: PrefixRestore(snaps[0], len(source[0]), keep)})
            assert keep >= 64 and all(np.array_equal(c, w) for c, w in zip(cold, warm)), (len(source[0]), keep)
        # both streams saved whole with the logits after them: restored with no prefill at all
        with slm.open_streams(target, 4, snapshot={0: len(target[0]), 1: len(target[1])}) as group:
            saved = {s: PrefixRestore(group.snapshots[s], len(target[s]), len(target[s]), group.snapshot_logits[s])
                     for s in (0, 1)}
        whole, _ = run(target, restore=saved)
        assert all(np.array_equal(c, w) for c, w in zip(cold, whole))


@pytest.mark.models
@pytest.mark.parametrize("damage", [_flip_state, _truncate, _foreign])
def test_default_models_rebuild_a_damaged_entry_with_the_same_tokens(default_costeer, warm_costeer, profile_text,
                                                                    tmp_path, damage):
    kwargs = dict(method="slm-context", max_new_tokens=8)
    expected = default_costeer.generate(OTHER_PROMPT, profile_text, **kwargs).token_ids
    warm_costeer.generate(OTHER_PROMPT, profile_text, **kwargs)
    (entry,) = entries(tmp_path / "cache")
    damage(entry)
    rebuilt = warm_costeer.generate(OTHER_PROMPT, profile_text, **kwargs)
    assert rebuilt.context_cache_tokens == 0 and rebuilt.token_ids == expected
    again = warm_costeer.generate(OTHER_PROMPT, profile_text, **kwargs)
    assert again.context_cache_tokens > 0 and again.token_ids == expected


@pytest.mark.models
def test_cli_no_context_cache_writes_nothing_and_cache_clear_empties_it(tmp_path, monkeypatch):
    from support.example_profile import EXAMPLE_PROFILE
    from support.commands import costeer

    folder = tmp_path / "cache"
    monkeypatch.setenv("COSTEER_CONTEXT_CACHE_DIR", str(folder))
    args = ("generate", "--prompt", OTHER_PROMPT, "--context", str(EXAMPLE_PROFILE), "--method", "slm-context",
            "--max-new-tokens", "2", "--json")
    cold = costeer(*args, "--no-context-cache")
    assert cold.returncode == 0, cold.stderr
    assert not folder.exists()
    first, second = costeer(*args), costeer(*args)
    assert [json.loads(r.stdout)["context_cache_tokens"] > 0 for r in (cold, first, second)] == [False, False, True]
    assert len({json.dumps(json.loads(r.stdout)["token_ids"]) for r in (cold, first, second)}) == 1
    assert "entries\t1" in costeer("cache", "info").stdout
    cleared = costeer("cache", "clear")
    assert cleared.returncode == 0 and "deleted 1 entries" in cleared.stdout and not entries(folder)
