"""The device side, safe where it is exposed: the private context off the command line,
a private wire log, a server that is not trusted (ids, sizes, text, plain-http keys),
a context cache that cleans up after killed writers and touches nothing not its own,
a model file re-verified when it changes, and an atomic run.json. No real models."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from costeer import CoSteer, ContextCache, UserError
from costeer.cli import main
from costeer.prompts import INLINE_TEXT_WARNING, load_context
from costeer.transport.server.app import create_app
from costeer.transport.wire import (DEFAULT_MAX_REPLY_BYTES, CloudRefused, ReplyTooLarge, WireClient, WireLog,
                                    is_loopback, printable)
from support.fake_servers import OpenAIQuirks, llama_server_app, openai_app
from support.fakes import VOCAB_SIZE, NumpyModel, PrefixModel
from support.servers import app_in_thread
from support.split_fixtures import CANARY, CONTEXT, PROMPT, device

# --- 1. the private context from stdin; a warning for --context-text -----------------


def test_context_dash_reads_stdin_in_its_place_among_the_files(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("From a file.", encoding="utf-8")
    stdin = io.BytesIO(f"From stdin: {CANARY}\n".encode())
    assert load_context([notes, "-"], "Inline.", stdin=stdin) == f"From a file.\n\nFrom stdin: {CANARY}\n\nInline."


@pytest.mark.parametrize("data, message", [(b"", "empty"), (b"\xff\xfe", "not UTF-8"), (b"a\x00b", "binary")])
def test_bad_context_on_stdin_is_one_clear_error(data, message):
    with pytest.raises(UserError, match=message) as failure:
        load_context(["-"], stdin=io.BytesIO(data))
    assert "<stdin>" in str(failure.value)


def test_stdin_is_read_once_and_within_the_size_limit(monkeypatch):
    with pytest.raises(UserError, match="once"):
        load_context(["-", "-"], stdin=io.BytesIO(b"x"))
    monkeypatch.setattr("costeer.prompts.MAX_CONTEXT_FILE_BYTES", 16)
    big = io.BytesIO(b"y" * 1000)
    with pytest.raises(UserError, match="over 16 bytes"):
        load_context(["-"], stdin=big)
    assert big.tell() == 17  # stopped one byte past the limit, not read whole


class _RecordingCoSteer(CoSteer):
    """The CLI's CoSteer on the NumPy models, remembering the context each call got."""

    contexts: list[str] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(llm=NumpyModel(1), slm=NumpyModel(2), context_cache=False)

    def generate(self, prompt, context="", **kwargs):
        self.contexts.append(context)
        return super().generate(prompt, context, **kwargs)


@pytest.fixture
def recording_cli(monkeypatch):
    monkeypatch.setattr("costeer.api.CoSteer", _RecordingCoSteer)
    _RecordingCoSteer.contexts = []
    return _RecordingCoSteer.contexts


def test_generate_reads_the_context_from_stdin_without_a_warning(recording_cli, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"I am Ingrid. {CANARY}".encode())))
    assert main(["generate", "--context", "-", "--prompt", PROMPT, "--max-new-tokens", "3", "--json"]) == 0
    assert recording_cli == [f"I am Ingrid. {CANARY}"]
    captured = capsys.readouterr()
    assert "warning" not in captured.err and CANARY not in captured.err + captured.out


def test_context_text_warns_in_one_line_that_others_can_read_it(recording_cli, capsys):
    assert main(["generate", "--context-text", CONTEXT, "--prompt", PROMPT, "--max-new-tokens", "3", "--json"]) == 0
    err = capsys.readouterr().err
    assert recording_cli == [CONTEXT] and err.count(INLINE_TEXT_WARNING + "\n") == 1
    assert "ps" in INLINE_TEXT_WARNING and "--context -" in INLINE_TEXT_WARNING and CANARY not in err


# --- 2. the wire log is private -----------------------------------------------------


def test_the_wire_log_is_created_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        log = WireLog(tmp_path / "wire.jsonl")
    finally:
        os.umask(old)
    log.write({"a": 1})
    log.close()
    assert stat.S_IMODE((tmp_path / "wire.jsonl").stat().st_mode) == 0o600


def test_a_wire_log_readable_by_others_is_made_0600_and_appended_to(tmp_path, library_stderr):
    path = tmp_path / "wire.jsonl"
    path.write_text('{"old": 1}\n')
    path.chmod(0o644)
    log = WireLog(path)
    log.write({"new": 2})
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().splitlines() == ['{"old": 1}', '{"new": 2}']
    err = library_stderr()
    assert err.count("\n") == 1 and "0644" in err and "0600" in err


# --- 3. a server that is not trusted ----------------------------------------------------


def rewriting(app: FastAPI, change) -> FastAPI:
    """`app` with every JSON reply to a POST passed through change(path, data) first."""

    @app.middleware("http")
    async def rewrite(request: Request, call_next):
        response = await call_next(request)
        if request.method != "POST" or response.status_code != 200:
            return response
        data = json.loads(b"".join([chunk async for chunk in response.body_iterator]))
        change(request.url.path, data)
        return JSONResponse(data)

    return app


def _ids(values: list[int]) -> str:
    return base64.b64encode(np.array(values, dtype="<i4").tobytes()).decode()


@pytest.mark.parametrize("bad", [-3, VOCAB_SIZE, 2**31 - 1])
def test_a_top_k_id_outside_the_vocabulary_is_an_error_never_an_index(bad):
    def change(path, data):
        dist = data.get("distribution", data)
        if dist.get("top_ids_b64"):
            ids = np.frombuffer(base64.b64decode(dist["top_ids_b64"]), "<i4").tolist()
            dist["top_ids_b64"] = _ids([bad] + ids[1:])

    with app_in_thread(rewriting(create_app(NumpyModel(1)), change)) as url:
        with pytest.raises(UserError, match=rf"token id {bad}, outside the vocabulary \(0 to {VOCAB_SIZE - 1}\)"):
            device(url, top_k=4).generate(PROMPT, CONTEXT, max_new_tokens=4)


def test_a_malformed_distribution_is_one_clear_error():
    def change(path, data):
        data.get("distribution", data)["top_logits_b64"] = base64.b64encode(b"\x00" * 7).decode()

    with app_in_thread(rewriting(create_app(NumpyModel(1)), change)) as url:
        with pytest.raises(UserError, match="malformed distribution"):
            device(url, top_k=4).generate(PROMPT, CONTEXT, max_new_tokens=4)


def test_a_lookahead_path_outside_the_vocabulary_is_an_error():
    def change(path, data):
        tree = data.get("distribution", data).get("tree")
        if tree:
            tree[0]["path"] = [-1]

    with app_in_thread(rewriting(create_app(NumpyModel(1)), change)) as url:
        with pytest.raises(UserError, match="token id -1, outside the vocabulary"):
            device(url, lookahead=(2, 2, 0.0), top_k=4).generate(PROMPT, CONTEXT, max_new_tokens=4)


@pytest.mark.parametrize("engine", ["vllm", "llama-server"])
def test_an_engine_naming_an_id_outside_the_vocabulary_is_an_error(engine):
    if engine == "vllm":
        def change(path, data):
            top = data["choices"][0]["logprobs"]["top_logprobs"][0]
            top["token_id:-1"] = top.pop(next(iter(top)))  # numpy would read -1 as the last token
        app, url_of = openai_app(NumpyModel(1), OpenAIQuirks(ids_as_keys=True)), "openai+{}/v1"
    else:
        def change(path, data):
            if path == "/completion":
                data["completion_probabilities"][0]["top_logprobs"][0]["id"] = VOCAB_SIZE + 5
        app, url_of = llama_server_app(NumpyModel(1)), "llama-server+{}"
    with app_in_thread(rewriting(app, change)) as url:
        with pytest.raises(UserError, match="outside the vocabulary"):
            device(url_of.format(url)).generate(PROMPT, CONTEXT, method="llm", max_new_tokens=4)


def _flood(sent: list[int]) -> FastAPI:
    """A server that answers with 256 MiB (no length declared), counting what it managed to send."""
    app = FastAPI()
    chunk = b"x" * (1 << 20)
    lines = b'{"n": 1, "pad": "%s"}\n' % (b"x" * 1000) * (1 << 10)  # 1 KiB lines: a thousand pass the cap

    def body(piece: bytes):
        for _ in range(256):
            sent[0] += len(piece)
            yield piece

    @app.get("/big")
    def big():
        return StreamingResponse(body(chunk), media_type="application/json")

    @app.post("/lines")
    def json_lines():
        return StreamingResponse(body(lines), media_type="application/x-ndjson")

    return app


def test_a_reply_over_the_cap_stops_being_read_and_is_one_clear_error():
    assert DEFAULT_MAX_REPLY_BYTES >= 64 << 20 > 4 * 151_936 * 4 // 3  # far above a full vocabulary, base64
    sent = [0]
    with app_in_thread(_flood(sent)) as url:
        wire = WireClient(url, max_reply_bytes=1 << 20)
        with pytest.raises(ReplyTooLarge, match=r"more than 1,048,576 bytes in reply to GET /big; reading stopped"):
            wire.request("GET", "/big")
        assert sent[0] < 64 << 20  # the server was cut off long before its 256 MiB
        sent[0] = 0
        stream = wire.stream("POST", "/lines", {})
        with pytest.raises(ReplyTooLarge, match="reply to POST /lines"):
            while stream.next() is not None:
                pass
        stream.close()
        wire.close()
    assert sent[0] < 64 << 20


def test_a_declared_length_over_the_cap_is_refused_before_reading(monkeypatch):
    app = FastAPI()

    @app.get("/declared")
    def declared():
        return Response(b"y" * 5000, media_type="application/json")

    with app_in_thread(app) as url:
        wire = WireClient(url, max_reply_bytes=4000)
        read = []
        monkeypatch.setattr("httpx.Response.iter_bytes", lambda self, *a: read.append(1) or iter([]))
        with pytest.raises(ReplyTooLarge):
            wire.request("GET", "/declared")
        assert read == []
        wire.close()


HOSTILE = "\x1b[2J\x1b]0;owned\x07\x1b[31mdisk full\x1b[0m\r\x9b6n\x00 \x08done\tok"


def test_control_characters_are_stripped_from_server_text():
    assert printable(HOSTILE) == "disk full6n done\tok"
    assert printable("line one\nline two") == "line one\nline two"


def test_error_bodies_and_server_names_reach_messages_without_control_characters():
    app = FastAPI()

    @app.get("/v1/model")
    def model():
        return {"name": f"evil{HOSTILE}", "vocab_size": VOCAB_SIZE, "context_window": 4096, "eos_token_ids": [257],
                "vocabulary_sha256": NumpyModel(1).vocabulary_digest(), "limits": {}}

    @app.post("/v1/sessions")
    def refuse():
        return JSONResponse(status_code=400, content={"error": "bad", "message": HOSTILE})

    @app.post("/plain")
    def plain():
        return Response(HOSTILE.encode(), status_code=500, media_type="text/plain")

    with app_in_thread(app) as url:
        cs = device(url)
        assert cs.model("llm").name == f"evildisk full6n done\tok at {url}"
        with pytest.raises(CloudRefused) as refused:
            cs.generate(PROMPT, CONTEXT, max_new_tokens=2)
        wire = WireClient(url)
        with pytest.raises(CloudRefused) as plain_refused:
            wire.request("POST", "/plain", {})
        wire.close()
    for message in (str(refused.value), str(plain_refused.value)):
        assert "disk full" in message and not any(c in message for c in "\x1b\x07\r\x9b\x00\x08")


@pytest.mark.parametrize("url, warned", [
    ("http://cloud.example.com:8750", True), ("http://10.0.0.7", True), ("https://cloud.example.com", False),
    ("http://localhost:8750", False), ("http://127.3.2.1", False), ("http://[::1]:8750", False),
])
def test_an_api_key_over_plain_http_to_another_host_warns_once(url, warned, library_stderr):
    wire = WireClient(url, api_key="secret-key")
    wire.close()
    err = library_stderr()
    assert err.count("over plain http://") == int(warned) and "secret-key" not in err
    WireClient(url).close()  # no key, nothing to warn about
    assert library_stderr() == ""


def test_loopback_is_localhost_127_slash_8_and_ipv6_one():
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.255.0.9", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["example.com", "10.0.0.1", "128.0.0.1", "localhost.example.com", "::2"]))


# --- 4. the context cache --------------------------------------------------------------


LONG_CONTEXT = "I am Ada. I live in Lisbon and keep bees. " * 4


def _warm(folder: Path, weights: Path) -> Path:
    """One generation through a cache in `folder`; the store folder it wrote to."""
    CoSteer(llm=NumpyModel(1), slm=PrefixModel(weights), context_cache=ContextCache(folder)).generate(
        "Plan my weekend.", LONG_CONTEXT, max_new_tokens=2)
    (store,) = [p for p in folder.iterdir() if p.is_dir()]
    return store


def _aged(path: Path, seconds: float) -> Path:
    path.write_bytes(b"half-written private state")
    os.utime(path, (time.time() - seconds, time.time() - seconds))
    return path


def test_stale_temporary_files_of_killed_writers_are_swept(tmp_path):
    folder, weights = tmp_path / "cache", tmp_path / "device.bin"
    weights.write_bytes(b"weights")
    store = _warm(folder, weights)
    dead = 4_194_311  # above the kernel's largest pid_max (2**22): no such process
    stale = [_aged(store / f".tmp-{dead}-abcd_123", 7200), _aged(folder / f".tmp-{dead}-zzzzzzzz", 7200),
             _aged(store / ".tmp-oldstyle", 7200)]
    kept = [_aged(store / f".tmp-{os.getpid()}-live0000", 7200),  # its writer is alive
            _aged(store / f".tmp-{dead}-fresh000", 60),  # may still be renamed: too young to judge
            _aged(folder / ".tmp-notes.txt", 7200)]  # not a name the cache gives
    _warm(folder, weights)  # a new process's first open
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_cache_clear_deletes_its_own_files_only(tmp_path, monkeypatch, capsys):
    folder, weights = tmp_path / "cache", tmp_path / "device.bin"
    weights.write_bytes(b"weights")
    store = _warm(folder, weights)
    (folder / "empty").mkdir()
    (folder / "photos" / "2024").mkdir(parents=True)
    (folder / "photos" / "trip.ctx").write_text("not an entry")
    (folder / "0123abcd.ctx").write_text("not an entry either")
    (store / ("f" * 32 + ".ctx")).write_bytes(b"named like an entry, not one")
    (store / "readme.txt").write_text("someone else's")
    monkeypatch.setenv("COSTEER_CONTEXT_CACHE_DIR", str(folder))
    # the request's two entries (its private prompt and its public one), nothing else
    assert main(["cache", "clear"]) == 0 and "deleted 2 entries" in capsys.readouterr().out
    left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    assert left == sorted(["0123abcd.ctx", "empty", "photos", "photos/2024", "photos/trip.ctx", store.name,
                           f"{store.name}/{'f' * 32}.ctx", f"{store.name}/readme.txt"])


def test_a_same_size_swap_of_the_device_model_gets_a_new_digest(tmp_path):
    folder, weights = tmp_path / "cache", tmp_path / "device.bin"
    weights.write_bytes(b"weights one")
    first = _warm(folder, weights)
    mtime = weights.stat().st_mtime_ns
    swap = tmp_path / "swap.bin"
    swap.write_bytes(b"weights two")  # the same size
    os.utime(swap, ns=(mtime, mtime))  # and the same mtime: only the inode tells
    os.replace(swap, weights)
    stores = {p.name for p in folder.iterdir() if p.is_dir()}
    CoSteer(llm=NumpyModel(1), slm=PrefixModel(weights), context_cache=ContextCache(folder)).generate(
        "Plan my weekend.", LONG_CONTEXT, max_new_tokens=2)
    new = {p.name for p in folder.iterdir() if p.is_dir()} - stores
    assert first.name in stores and len(new) == 1
    assert next(iter(new)).startswith(hashlib.sha256(b"weights two").hexdigest())


# --- 4. a default model swapped for another of the same size ----------------------------


@pytest.fixture
def toy_model(tmp_path, monkeypatch):
    """A two-chunk ChunkedModel whose chunks are 'installed' packages on sys.path."""
    from costeer.default_models import ChunkedModel

    parts = [b"GGUF toy model, part one. ", b"part two."]
    for i, data in enumerate(parts, start=1):
        package = tmp_path / "site" / f"costeer_toy_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("COSTEER_CACHE", str(tmp_path / "models"))
    whole = b"".join(parts)
    return ChunkedModel("toy", "toy.gguf", "costeer-toy-part", 2, "1.0", len(whole),
                        hashlib.sha256(whole).hexdigest()), whole


def test_an_assembled_model_is_rehashed_only_when_it_changes(toy_model, monkeypatch):
    from costeer import default_models

    model, whole = toy_model
    target = default_models.ensure_model(model, quiet=True)
    assert target.read_bytes() == whole
    monkeypatch.setattr(default_models, "sha256_file", lambda path: pytest.fail("an unchanged file was hashed"))
    assert default_models.ensure_model(model, quiet=True) == target


@pytest.mark.parametrize("how", ["replaced", "rewritten in place"])
def test_a_same_size_swap_of_an_assembled_model_is_caught_and_assembled_again(toy_model, how, tmp_path, library_stderr):
    from costeer.default_models import ensure_model

    model, whole = toy_model
    target = ensure_model(model, quiet=True)
    st = target.stat()
    other = bytes(len(whole))  # same size, other bytes
    if how == "replaced":
        swap = tmp_path / "swap.gguf"
        swap.write_bytes(other)
        os.utime(swap, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same size and mtime: only the inode differs
        os.replace(swap, target)
    else:
        target.write_bytes(other)  # the same inode and size: the mtime differs (set, not left to the clock)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert target.read_bytes() == other
    assert ensure_model(model) == target
    assert target.read_bytes() == whole
    assert "assembling it again" in library_stderr()


# --- 5. run.json is written atomically --------------------------------------------------

_FAIL_MID_WRITE = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from costeer.evaluation.runner import EvalSettings, _record_run

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file past the limit fails with EFBIG instead
    out = Path(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        _record_run(out, EvalSettings(dataset="preference:concise", out=out), {"dataset": "preference:concise"}, True)
    except OSError as exc:
        print("failed mid-write:", exc.errno)
""")


def _a_run_json_write_dies_midway(folder: Path) -> tuple[Path, bytes, subprocess.CompletedProcess]:
    """A run recorded in folder/out, then a process that dies while it records it again:
    the folder, run.json before, and that process."""
    from costeer.evaluation.runner import RUN_FILE, EvalSettings, _record_run

    out = folder / "out"
    out.mkdir()
    _record_run(out, EvalSettings(dataset="preference:concise", out=out), {"dataset": "preference:concise"}, True)
    before = (out / RUN_FILE).read_bytes()
    return out, before, subprocess.run([sys.executable, "-c", _FAIL_MID_WRITE, str(out)], capture_output=True,
                                       text=True, timeout=120)


@pytest.mark.early.with_args(_a_run_json_write_dies_midway)  # begun when the session starts (support/early.py)
def test_a_run_json_write_that_dies_midway_leaves_the_old_one_and_resume_works(early_result):
    from costeer.evaluation.runner import RUN_FILE, EvalSettings, _record_run

    out, before, done = early_result()
    settings = EvalSettings(dataset="preference:concise", out=out)
    fingerprint = {"dataset": "preference:concise"}
    assert len(before) > 200
    assert "failed mid-write" in done.stdout, done.stderr
    assert (out / RUN_FILE).read_bytes() == before  # never torn
    run = _record_run(out, settings, fingerprint, True)  # the resume is not blocked
    assert len(run.commands) == 2 and [p.name for p in out.iterdir()] == [RUN_FILE]


def test_a_partial_temporary_run_json_left_by_a_kill_does_not_block_resume(tmp_path):
    from costeer.evaluation.runner import RUN_FILE, EvalSettings, _record_run

    out = tmp_path / "out"
    out.mkdir()
    settings = EvalSettings(dataset="preference:concise", out=out)
    _record_run(out, settings, {"dataset": "preference:concise"}, True)
    (out / f".{RUN_FILE}.k1ll3d__.tmp").write_text('{"config": {"dataset": "prefer')  # a kill mid-write
    run = _record_run(out, settings, {"dataset": "preference:concise"}, True)
    assert len(run.commands) == 2 and json.loads((out / RUN_FILE).read_text())["commands"] == run.commands
    assert [p.name for p in out.iterdir()] == [RUN_FILE]  # the leftover is gone
