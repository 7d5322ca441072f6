"""`costeer serve` under concurrency: closing, expiry, admission by count and by KV
memory, failures inside a request. Fast tests run the deterministic `NumpyModel` in
this process (a group used after close() raises, so a use-after-free is a 500); the
60-second check runs the real GGUF model, where a use-after-free kills the process."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import httpx
import pytest

from costeer.backends.base import StreamGroup
from costeer.transport.server.limits import ServerLimits
from costeer.transport.protocol import IDS, decode_array
from costeer.transport.server.app import create_app
from support.clock import SkippingClock
from support.fakes import HookedModel, NumpyModel, NumpyStreams
from support.serve_api import assert_error, open_body
from support.servers import app_in_thread, costeer_serve, free_port

OK_STATUSES = {200, 204, 404, 429}
MESSAGES = [{"role": "user", "content": "hi"}]


class SlowModel(NumpyModel):
    """NumpyModel with a prefill and forward passes that take time, as a real model's do,
    so that concurrent requests overlap (sleeping releases the GIL)."""

    def __init__(self, prefill_s: float = 0.02, advance_s: float = 0.002) -> None:
        super().__init__(1, "numpy-cloud")
        self.prefill_s, self.advance_s = prefill_s, advance_s

    def batch_engine(self, *args, **kwargs) -> None:
        return None  # the delays sit in open_streams and advance

    def open_streams(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> StreamGroup:
        time.sleep(self.prefill_s)
        return _SlowStreams(self, prompts, max_new_tokens)


class _SlowStreams(NumpyStreams):
    def advance(self, token_id: int) -> None:
        time.sleep(self._model.advance_s)
        super().advance(token_id)


def prompt_tokens(model: NumpyModel, messages: list[dict] = MESSAGES) -> int:
    return len(model.encode_chat(messages))


def health(url: str) -> dict:
    return httpx.get(url + "/healthz", timeout=10).json()


def assert_retry_after(response: httpx.Response) -> int:
    seconds = int(response.headers["Retry-After"])
    assert seconds >= 1
    return seconds


def run_race(url: str, model: HookedModel, n: int, admitted: int, body: dict) -> list[httpx.Response]:
    """n opens at once while the first prefill is held; the n - admitted refusals must all
    arrive before that prefill ends (the old code checked the cap, then queued them all)."""
    with ThreadPoolExecutor(n) as pool:
        pause = model.at_prefill.arm()
        done = threading.Semaphore(0)

        def post() -> httpx.Response:
            try:
                return httpx.post(url + "/v1/sessions", json=body, timeout=30)
            finally:
                done.release()

        futures = [pool.submit(post)]
        assert pause.reached.wait(10)  # the first open holds its slot, mid-prefill
        futures += [pool.submit(post) for _ in range(n - 1)]
        # the refusals come back while the admitted opens still wait for the prefill
        for _ in range(n - admitted):
            assert done.acquire(timeout=10), "opens past the cap were not refused while others were prefilling"
        pause.go.set()
        return [f.result() for f in futures]


@pytest.mark.parametrize("kind", ["too_many_sessions", "server_memory_full"])
def test_concurrent_opens_cannot_pass_a_cap(model: HookedModel, kind: str):
    """Opens racing a slow prefill: exactly as many as fit the session cap (or the KV
    budget) are admitted, the rest refused with 429 and Retry-After."""
    need = prompt_tokens(model) + 8
    fit = 3 if kind == "too_many_sessions" else 2
    limits = (ServerLimits(max_sessions=fit) if kind == "too_many_sessions"
              else ServerLimits(max_sessions=100, max_kv_tokens=fit * need + need - 1))
    with app_in_thread(create_app(model, limits=limits)) as url:
        responses = run_race(url, model, 3 * fit, fit, open_body(8))
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {200: fit, 429: 2 * fit}, statuses
        for r in responses:
            if r.status_code == 429:
                assert_error(r, 429, kind)
                assert_retry_after(r)
        h = health(url)
        assert h["sessions"] == fit and h["kv_tokens"] == fit * need


def test_memory_admission_refuses_then_admits_after_delete(model: HookedModel):
    need = prompt_tokens(model) + 16
    ttl = 300
    limits = ServerLimits(max_sessions=100, session_ttl_s=ttl, max_kv_tokens=2 * need)
    with app_in_thread(create_app(model, limits=limits)) as url, httpx.Client(base_url=url, timeout=30) as http:
        first, second = (http.post("/v1/sessions", json=open_body(16)) for _ in range(2))
        assert first.status_code == second.status_code == 200
        assert health(url)["kv_tokens"] == 2 * need
        # a smaller session would fit the count but not the memory
        refused = http.post("/v1/sessions", json=open_body(1))
        assert_error(refused, 429, "server_memory_full")
        assert 1 <= assert_retry_after(refused) <= ttl  # when the oldest idle session would expire
        # one that could never fit is not told to retry
        assert_error(http.post("/v1/sessions", json=open_body(2 * need)), 413, "prompt_too_large")
        assert http.delete(f"/v1/sessions/{first.json()['session_id']}").status_code == 204
        assert health(url)["kv_tokens"] == need
        again = http.post("/v1/sessions", json=open_body(16))
        assert again.status_code == 200, again.text
        assert_error(http.post("/v1/sessions", json=open_body(1)), 429, "server_memory_full")
        for opened in (second, again):
            sid = opened.json()["session_id"]
            assert http.post(f"/v1/sessions/{sid}/step", json={"tokens": [65]}).status_code == 200


def test_step_racing_delete_gets_404_not_freed_state(model: HookedModel):
    """A step that found its session, then lost the race to DELETE, answers 404."""
    with app_in_thread(create_app(model)) as url, httpx.Client(base_url=url, timeout=30) as http:
        sid = http.post("/v1/sessions", json=open_body()).json()["session_id"]
        pause = model.at_validation.arm()
        with ThreadPoolExecutor(1) as pool:
            step = pool.submit(http.post, f"/v1/sessions/{sid}/step", json={"tokens": [65]})
            assert pause.reached.wait(10)  # the step holds the session, not yet its lock
            assert http.delete(f"/v1/sessions/{sid}").status_code == 204
            pause.go.set()
            assert_error(step.result(), 404, "unknown_session")
        assert health(url)["sessions"] == 0 and health(url)["kv_tokens"] == 0


def test_a_session_in_use_does_not_expire_under_its_step(model: HookedModel):
    """Expiry must neither close a session while a step computes on it, nor count that time as idle."""
    clock = SkippingClock()
    with app_in_thread(create_app(model, limits=ServerLimits(session_ttl_s=1), clock=clock)) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        opened = http.post("/v1/sessions", json=open_body()).json()
        sid = opened["session_id"]
        pause = model.at_advance.arm()
        with ThreadPoolExecutor(1) as pool:
            step = pool.submit(http.post, f"/v1/sessions/{sid}/step", json={"tokens": [65]})
            assert pause.reached.wait(10)  # mid-step, holding the session's lock
            clock.skip(1.3)  # longer than the time-to-live: only the clock can make it pass
            # any request runs the expiry sweep
            assert_error(http.post("/v1/sessions/other/step", json={"tokens": []}), 404, "unknown_session")
            pause.go.set()
            result = step.result()
        assert result.status_code == 200, result.text
        assert result.json()["position"] == opened["prompt_tokens"] + 1
        after = http.post(f"/v1/sessions/{sid}/step", json={"tokens": [66]})
        assert after.status_code == 200 and after.json()["position"] == opened["prompt_tokens"] + 2


def test_concurrent_deletes_close_once(model: HookedModel):
    with app_in_thread(create_app(model)) as url, httpx.Client(base_url=url, timeout=30) as http:
        sid = http.post("/v1/sessions", json=open_body()).json()["session_id"]
        with ThreadPoolExecutor(8) as pool:
            statuses = sorted(r.status_code for r in pool.map(lambda _: http.delete(f"/v1/sessions/{sid}"), range(8)))
        assert statuses == [204] + [404] * 7
        h = health(url)
        assert h["sessions"] == 0 and h["kv_tokens"] == 0  # freed once, not once per DELETE


def test_failed_step_closes_the_session_with_a_clean_500(model: HookedModel):
    model.fail_on_token = 66
    with app_in_thread(create_app(model)) as url, httpx.Client(base_url=url, timeout=30) as http:
        opened = http.post("/v1/sessions", json=open_body()).json()
        sid = opened["session_id"]
        failed = http.post(f"/v1/sessions/{sid}/step", json={"tokens": [65, 66]})  # 65 is appended, then 66 fails
        assert_error(failed, 500, "internal_error")
        assert "alice" not in failed.text and "profile" not in failed.text
        # never served half-advanced: the session is gone, and so is its reservation
        assert_error(http.post(f"/v1/sessions/{sid}/step", json={"tokens": []}), 404, "unknown_session")
        assert health(url)["sessions"] == 0 and health(url)["kv_tokens"] == 0


def test_failed_prefill_is_a_clean_500_and_returns_its_reservation(model: HookedModel):
    with app_in_thread(create_app(model, limits=ServerLimits(max_sessions=1))) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        model.fail_prefill = "cannot map /home/alice/private.gguf"
        failed = http.post("/v1/sessions", json=open_body())
        assert_error(failed, 500, "internal_error")
        assert "alice" not in failed.text
        assert health(url)["kv_tokens"] == 0
        assert http.post("/v1/sessions", json=open_body()).status_code == 200  # the one slot is free again


def _churn(url: str, seconds: float, workers: int, vocab: int, rng_seed: int,
           new_tokens: Callable[[random.Random], int], timeout: float,
           until: Callable[[Counter], bool] | None = None, max_seconds: float | None = None,
           pause: float = 1.0) -> Counter:
    """Threads open, step, delete and abandon sessions, some pausing past the TTL (1 s) and
    some racing a DELETE of their own session. Runs `seconds`, then on until `until(statuses)`
    holds or `max_seconds` pass (a slow machine gets more time, not a weaker check). `pause`
    scales the clients' pauses, for a server whose session clock runs 1 / pause times as fast.
    Returns status counts; transport errors propagate."""
    statuses: Counter = Counter()
    count_lock = threading.Lock()
    started = time.monotonic()

    def running() -> bool:
        elapsed = time.monotonic() - started
        if elapsed < seconds:
            return True
        if until is None or elapsed >= (max_seconds or seconds):
            return False
        with count_lock:
            return not until(statuses)

    def record(response: httpx.Response) -> httpx.Response:
        with count_lock:
            statuses[response.status_code] += 1
        assert response.status_code in OK_STATUSES, f"{response.status_code}: {response.text[:300]}"
        return response

    def worker(index: int) -> None:
        rng = random.Random(rng_seed + index)
        with httpx.Client(base_url=url, timeout=timeout) as http, ThreadPoolExecutor(1) as helper:
            while running():
                budget = new_tokens(rng)
                opened = record(http.post("/v1/sessions", json=open_body(budget, f"Say hi {rng.randrange(1000)}.")))
                if opened.status_code != 200:
                    time.sleep(rng.uniform(0.1, 0.5) * pause)  # full: back off a little, as a client would
                    continue
                sid = opened.json()["session_id"]
                step_path = f"/v1/sessions/{sid}/step"
                token = int(decode_array(opened.json()["distribution"]["top_ids_b64"], IDS)[0])
                race_delete = rng.random() < 0.3
                closing = None
                for i in range(rng.randrange(1, budget + 1)):
                    if rng.random() < 0.15:
                        time.sleep(rng.uniform(0.8, 1.4) * pause)  # around the TTL: may expire meanwhile
                    if race_delete and i == 0:
                        closing = helper.submit(http.delete, f"/v1/sessions/{sid}")
                    step = record(http.post(step_path, json={"tokens": [token], "top_k": 4}))
                    if step.status_code != 200:
                        break
                    token = rng.choice([int(decode_array(step.json()["top_ids_b64"], IDS)[0]), rng.randrange(vocab)])
                if closing is not None:
                    record(closing.result())
                ending = rng.random()
                if ending < 0.4:
                    record(http.delete(f"/v1/sessions/{sid}"))
                elif ending < 0.5:
                    record(http.post(step_path, json={"tokens": []}))  # maybe after a DELETE: 404
                # otherwise abandoned: left to expire

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(worker, i) for i in range(workers)]:
            future.result()
    return statuses


def watch_caps(url: str, limits: ServerLimits, stop: threading.Event) -> Callable[[], list[dict]]:
    """Polls /healthz until stop is set; returns a function giving every reading over a cap."""
    over: list[dict] = []

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                h = http.get("/healthz").json()
                if h["sessions"] > limits.max_sessions or h.get("kv_tokens", 0) > limits.max_kv_tokens:
                    over.append(h)
                stop.wait(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()

    def readings() -> list[dict]:
        stop.set()
        thread.join(10)
        return over
    return readings


def test_churn_of_opens_steps_deletes_and_expiry_in_process():
    """Six seconds of the sessions' time, run three times as fast: the server's clock and
    the clients' pauses alike."""
    model = SlowModel()
    need = prompt_tokens(model, [{"role": "user", "content": "Say hi 999."}]) + 12
    limits = ServerLimits(max_sessions=5, session_ttl_s=1, max_kv_tokens=4 * need)
    with app_in_thread(create_app(model, limits=limits, clock=SkippingClock(rate=3))) as url:
        over_caps = watch_caps(url, limits, threading.Event())
        statuses = _churn(url, seconds=2, workers=8, vocab=model.vocab_size, rng_seed=0,
                          new_tokens=lambda rng: rng.randrange(1, 13), timeout=30,
                          until=lambda counts: enough_churn(counts, answered=50), max_seconds=30, pause=1 / 3)
        assert over_caps() == []
        assert health(url)["ok"]
    assert enough_churn(statuses, answered=50), statuses


def enough_churn(statuses: Counter, answered: int = 100) -> bool:
    """Every path was taken often enough to matter: steps answered, deletes, expiries, a full table."""
    return statuses[200] > answered and statuses[204] > 0 and statuses[404] > 0 and statuses[429] > 0


@pytest.mark.models
def test_real_server_survives_a_minute_of_churn_with_one_second_ttl():
    """The small real GGUF behind a `costeer serve` subprocess: llama.cpp state used after
    free would crash the process, not just fail one request."""
    from costeer.default_models import DEFAULT_SLM, ensure_model

    path = ensure_model(DEFAULT_SLM, quiet=True)
    procs: list = []
    # prompts of 36-37 tokens plus 1-8 new ones: 4 sessions fill 160 KV tokens or not, so both caps bite
    limits = ServerLimits(max_sessions=4, session_ttl_s=1, max_kv_tokens=160)
    with costeer_serve("--llm", str(path), "--session-ttl", "1", "--max-sessions", "4",
                       "--max-kv-tokens", "160", port=free_port(), procs=procs) as url:
        over_caps = watch_caps(url, limits, threading.Event())
        started = time.monotonic()
        statuses = _churn(url, seconds=60, workers=6, vocab=151_936, rng_seed=1,
                          new_tokens=lambda rng: rng.randrange(1, 9), timeout=120,
                          until=enough_churn, max_seconds=240)
        elapsed = time.monotonic() - started
        alive = procs[0].poll() is None
        h = health(url)
        assert over_caps() == []
    print(f"\n{elapsed:.0f} s of churn: {sum(statuses.values())} requests, status counts {dict(sorted(statuses.items()))}")
    assert alive and h["ok"]
    # shut down on SIGTERM (uvicorn re-raises it after a clean shutdown), not killed by a crash (-11)
    assert procs[0].returncode in (0, -signal.SIGTERM)
    assert enough_churn(statuses), statuses
