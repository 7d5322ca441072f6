"""The server's scheduler on the NumPy model: concurrent sessions' steps share forward
passes, a long prompt goes in blocks between other sessions' batches, sessions that
do not fit a slot get caches of their own, and nobody's numbers change (the fake
engine's arithmetic is batch-independent, as the real one's is up to exact_batch:
test_server_batching_models.py checks that on the default model)."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from costeer.transport.server.limits import ServerLimits
from costeer.bench.load import alone, drive
from costeer.transport.server.scheduler import Scheduler
from costeer.transport.server.app import create_app
from support.fakes import NumpyBatchEngine, NumpyModel
from support.servers import app_in_thread

PROMPTS = [f"Device {i}: write about the {w}." for i, w in enumerate(["sea", "sky", "moon", "rain"] * 4)]


class SlowEngine(NumpyBatchEngine):
    """Forward passes that take time, as a real model's do (sleeping frees the GIL), and
    a log of what ran in order."""

    def __init__(self, *args, pass_s: float = 0.004, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pass_s, self.log = pass_s, []

    def prefill(self, slot, prompt, start):
        time.sleep(self.pass_s)
        self.log.append(("prefill", slot))
        return super().prefill(slot, prompt, start)

    def decode(self, entries):
        time.sleep(self.pass_s * (1 + len(entries) // self.max_batch))
        self.log.append(("decode", len(entries)))
        return super().decode(entries)


class SlowModel(NumpyModel):
    def __init__(self, max_batch: int = 3) -> None:
        super().__init__(1, "numpy-cloud")
        self.max_batch, self.engines = max_batch, []

    def batch_engine(self, slots, slot_tokens, max_batch=None):
        self.engines.append(SlowEngine(self, slots, slot_tokens, max_batch or self.max_batch))
        return self.engines[-1]


def test_sixteen_sessions_share_forward_passes_and_get_their_own_numbers():
    model = SlowModel(max_batch=16)
    with app_in_thread(create_app(model, limits=ServerLimits(max_sessions=16))) as url:
        engine = model.engines[0]
        engine.pass_s, pass_s = 0.0, engine.pass_s  # one session at a time: nothing to overlap
        reference = alone(url, PROMPTS, 12)
        engine.pass_s = pass_s
        engine.passes.clear()
        run = drive(url, PROMPTS, 12)
        assert run.errors == []
        assert all(run.matches(reference)), run.matches(reference)
        assert run.tokens == 16 * 12
        assert max(engine.passes) > 4, engine.passes  # steps of several sessions in one pass
        assert len(engine.passes) < run.tokens / 2
        health = httpx.get(url + "/healthz").json()
        assert health["sessions"] == 0 and health["batch_slots_free"] == 16 and health["kv_tokens"] == 0
    # and the reference itself is the model's own arithmetic, not just self-consistent
    for prompt, t in zip(PROMPTS[:2], reference[:2]):
        ids = list(model.encode_chat([{"role": "user", "content": prompt}]))
        for token, logit in zip(t.tokens, t.top_logits):
            logits = model.logits_after(ids)
            assert int(np.argmax(logits)) == token and float(logits.max()) == logit
            ids.append(token)


def test_a_pass_holds_at_most_max_batch_tokens():
    model = SlowModel(max_batch=3)
    with app_in_thread(create_app(model, limits=ServerLimits(max_sessions=8))) as url:
        run = drive(url, PROMPTS[:8], 6)
    assert run.errors == [] and max(model.engines[0].passes) == 3


def test_a_long_prompt_goes_in_blocks_between_other_sessions_batches():
    model = SlowModel()
    with app_in_thread(create_app(model, limits=ServerLimits(max_sessions=4))) as url:
        engine = model.engines[0]
        steady = drive(url, PROMPTS[:1], 1)  # warm
        long_prompt = "a long public prompt " * 40  # about 50 blocks of 16 tokens
        stepping = threading.Thread(target=lambda: steady.transcripts.extend(drive(url, PROMPTS[:2], 40).transcripts))
        stepping.start()
        time.sleep(0.05)
        engine.log.clear()
        r = httpx.post(url + "/v1/sessions", json={"messages": [{"role": "user", "content": long_prompt}],
                                                   "max_new_tokens": 4, "top_k": 1}, timeout=60)
        assert r.status_code == 200, r.text
        stepping.join()
    blocks = [i for i, (kind, _) in enumerate(engine.log) if kind == "prefill"]
    decodes_during = [i for i, (kind, _) in enumerate(engine.log) if kind == "decode" and blocks[0] < i < blocks[-1]]
    assert len(blocks) >= 40 and len(decodes_during) >= 10, (len(blocks), len(decodes_during))


def test_sessions_that_do_not_fit_a_slot_get_caches_of_their_own():
    model = SlowModel()
    limits = ServerLimits(max_sessions=4, batch_slot_tokens=64, max_kv_tokens=4 * 64 + 400)
    with app_in_thread(create_app(model, limits=limits)) as url:
        short = drive(url, PROMPTS[:3], 8)  # fit a slot
        assert short.errors == []
        body = {"messages": [{"role": "user", "content": "x" * 200}], "max_new_tokens": 8, "top_k": 1}
        big = httpx.post(url + "/v1/sessions", json=body)
        assert big.status_code == 200, big.text
        health = httpx.get(url + "/healthz").json()
        assert health["batch_slots_free"] == 4 and health["sessions"] == 1
        again = httpx.post(url + "/v1/sessions", json=body)  # the private budget (400 cells) holds one
        assert again.status_code == 429 and again.json()["error"] == "server_memory_full"
        assert int(again.headers["Retry-After"]) >= 1
        assert drive(url, PROMPTS[:3], 4).errors == []  # slots are still free for short sessions
        session = big.json()["session_id"]
        token = int(np.frombuffer(__import__("base64").b64decode(big.json()["distribution"]["top_ids_b64"]), "<i4")[0])
        step = httpx.post(f"{url}/v1/sessions/{session}/step", json={"tokens": [token], "top_k": 1})
        assert step.status_code == 200, step.text


def test_a_failed_pass_closes_only_its_sessions_and_the_server_goes_on():
    model = SlowModel()
    with app_in_thread(create_app(model, limits=ServerLimits(max_sessions=4))) as url:
        engine = model.engines[0]
        opened = httpx.post(url + "/v1/sessions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_new_tokens": 4, "top_k": 1}).json()
        original, engine.decode = engine.decode, lambda entries: (_ for _ in ()).throw(RuntimeError("private: /home/x"))
        failed = httpx.post(f"{url}/v1/sessions/{opened['session_id']}/step", json={"tokens": [65], "top_k": 1})
        assert failed.status_code == 500 and "/home/x" not in failed.text
        engine.decode = original
        gone = httpx.post(f"{url}/v1/sessions/{opened['session_id']}/step", json={"tokens": [65], "top_k": 1})
        assert gone.status_code == 404
        assert drive(url, PROMPTS[:4], 4).errors == []
        assert httpx.get(url + "/healthz").json()["batch_slots_free"] == 4


def test_scheduler_stop_fails_waiters_and_restarts_on_demand():
    scheduler = Scheduler(None)
    assert scheduler.run(lambda: 41 + 1) == 42
    gate = threading.Event()
    results: list = []
    waiter = threading.Thread(target=lambda: results.append(scheduler.run(gate.wait)))
    waiter.start()
    time.sleep(0.05)
    gate.set()
    waiter.join()
    scheduler.stop()
    assert results == [True]
    assert scheduler.run(lambda: "again") == "again"  # a later request starts a new thread
    scheduler.close()
    with pytest.raises(RuntimeError):
        scheduler.run(lambda: None)


class StepwiseModel(NumpyModel):
    """No batching; an open's prefill in many steps, each logged, as llama.cpp's is."""

    def __init__(self) -> None:
        super().__init__(1, "numpy-cloud")
        self.log: list[str] = []

    def batch_engine(self, *args, **kwargs) -> None:
        return None

    def open_streams_stepwise(self, prompts, max_new_tokens, **kwargs):
        group = self.open_streams(prompts, max_new_tokens, **kwargs)

        def blocks():
            for _ in range(len(prompts[0]) // 16):
                time.sleep(0.003)
                self.log.append("prefill block")
                yield
        return group, blocks()

    def count_pass(self) -> None:
        super().count_pass()
        self.log.append("step")


def test_a_long_prompt_in_a_cache_of_its_own_also_goes_in_blocks_between_steps():
    model = StepwiseModel()
    with app_in_thread(create_app(model, limits=ServerLimits(max_sessions=4))) as url:
        stepping = threading.Thread(target=lambda: drive(url, PROMPTS[:1], 60))
        stepping.start()
        time.sleep(0.05)
        r = httpx.post(url + "/v1/sessions", json={"messages": [{"role": "user", "content": "long " * 200}],
                                                   "max_new_tokens": 4, "top_k": 1}, timeout=60)
        stepping.join()
    assert r.status_code == 200, r.text
    blocks = [i for i, e in enumerate(model.log) if e == "prefill block"]
    steps_during = [i for i, e in enumerate(model.log) if e == "step" and blocks[0] < i < blocks[-1]]
    assert len(blocks) >= 50 and len(steps_during) >= 10, (len(blocks), len(steps_during))
