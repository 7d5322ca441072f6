"""Many devices at once against one cloud server: the load test (benchmarks/load.py
and the test suite).

Each simulated device opens a session on its own prompt, then steps greedily (the
server's top-1 token) until it has `new_tokens`. Devices open together, then step
together; the step phase is timed. A run alone gives each prompt's reference: a
session's tokens, and the top-1 logit after each (bit for bit), must be the same
with 16 neighbours as alone, or the server mixed something up (or rounds
differently under load: see `max_batch`)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np

from ..transport.protocol import API_PREFIX, FLOATS, IDS, decode_array


@dataclass
class Transcript:
    tokens: list[int] = field(default_factory=list)
    top_logits: list[float] = field(default_factory=list)  # the top-1 logit at each position
    step_s: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class LoadResult:
    sessions: int
    transcripts: list[Transcript]
    step_phase_s: float

    @property
    def tokens(self) -> int:
        return sum(len(t.step_s) for t in self.transcripts)

    @property
    def errors(self) -> list[str]:
        return [t.error for t in self.transcripts if t.error]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_phase_s if self.step_phase_s > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        steps = [s for t in self.transcripts for s in t.step_s]
        return float(np.percentile(steps, q) * 1000) if steps else float("nan")

    def matches(self, alone: "list[Transcript]", bitwise: bool = True) -> list[bool]:
        """Per session: the same tokens as its run alone, and (bitwise) the same top-1
        logits bit for bit."""
        return [t.error is None and t.tokens == a.tokens and (not bitwise or t.top_logits == a.top_logits)
                for t, a in zip(self.transcripts, alone)]


def _top1(distribution: dict) -> tuple[int, float]:
    ids = decode_array(distribution["top_ids_b64"], IDS)
    logits = decode_array(distribution["top_logits_b64"], FLOATS)
    return int(ids[0]), float(logits[0])


def drive(url: str, prompts: list[str], new_tokens: int, api_key: str | None = None, timeout_s: float = 600.0,
          reserve_tokens: int | None = None) -> LoadResult:
    """One device a prompt, all at once; each session reserves `reserve_tokens` new
    tokens (default new_tokens)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    transcripts = [Transcript() for _ in prompts]
    opened = threading.Barrier(len(prompts) + 1)
    stepping = threading.Event()

    def device(prompt: str, t: Transcript) -> None:
        session = None
        with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as http:
            try:
                r = http.post(f"{API_PREFIX}/sessions", json={"messages": [{"role": "user", "content": prompt}],
                                                              "max_new_tokens": reserve_tokens or new_tokens, "top_k": 1})
                r.raise_for_status()
                session = r.json()["session_id"]
                token, logit = _top1(r.json()["distribution"])
            except Exception as exc:  # noqa: BLE001 - counted as an error of the run
                t.error = f"open: {exc}"
            opened.wait()
            stepping.wait()
            try:
                while session and len(t.tokens) < new_tokens:
                    t.tokens.append(token)
                    t.top_logits.append(logit)
                    start = time.perf_counter()
                    r = http.post(f"{API_PREFIX}/sessions/{session}/step", json={"tokens": [token], "top_k": 1})
                    t.step_s.append(time.perf_counter() - start)
                    r.raise_for_status()
                    token, logit = _top1(r.json())
            except Exception as exc:  # noqa: BLE001
                t.error = f"step {len(t.tokens)}: {exc}"
            finally:
                if session:
                    http.delete(f"{API_PREFIX}/sessions/{session}")

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(device, p, t) for p, t in zip(prompts, transcripts)]
        opened.wait()
        start = time.perf_counter()
        stepping.set()
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - start
    return LoadResult(len(prompts), transcripts, elapsed)


def alone(url: str, prompts: list[str], new_tokens: int, api_key: str | None = None) -> list[Transcript]:
    """Each prompt's run with no other session on the server."""
    return [drive(url, [p], new_tokens, api_key).transcripts[0] for p in prompts]
