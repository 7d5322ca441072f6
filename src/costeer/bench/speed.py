"""`costeer bench`: every speed figure of the project, side by side in one run.

Two machines are simulated on this one: the device on CPU 0 and the cloud (an
embedded cloud model, or `costeer serve` in a subprocess) on CPU 1, one thread each.
Every figure is a ratio of medians measured in the same run, with variants in an
order that rotates per round, so load on a shared machine hits them alike:

- fusion_loop_over_closed: the paper's 20-step loop over the closed form, per step,
  on real full-vocabulary logits (and the two generate the same greedy tokens);
- embedded_costeer_over_llm: speed of CoSteer over the cloud model alone, in-process;
- ttft_cold_s / ttft_warm_s: time to first token on a long private context, with an
  empty context cache, then a warm one (and the same tokens);
- llm_stream_ms_per_token: the cloud model decoding on its own on the cloud's core,
  with no per-token round trip: what a user of the cloud alone waits;
- specsteer_over_costeer: speed of SpecSteer (lossy) over CoSteer, in-process, where
  both cost the same passes a token; embedded_speculate_over_llm is null: exact drafts
  would be scored one token a pass on this CPU, which saves nothing in-process;
- for each simulated round-trip time R and each split mode (the defaults, whose
  lookahead is auto; per-token steps; lookahead; --speculate; --speculate with
  lookahead; SpecSteer with --speculate): split_{mode}_over_llm_stream_{R}ms and
  split_{mode}_round_trips_per_token_{R}ms, each exact mode's greedy tokens checked
  equal to per-token CoSteer's and SpecSteer's to embedded SpecSteer's (the benchmark
  fails if not); split_round_trips_per_token_{R}ms is the defaults',
  split_costeer_over_llm_stream_{R}ms the fastest exact mode's, and
  split_specsteer_speculate_over_costeer_{R}ms SpecSteer's speed over it;
  speculate_acceptance is the share of drafted tokens the exact modes' choices followed;
- cloud_batch_cost: a forward pass of n tokens over one of 1, on the cloud's core.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..methods import DEFAULT_TOP_K
from ..transport.protocol import CPU_LOOKAHEAD
from .contention import warn_if_contended

log = logging.getLogger(__name__)

DEVICE_CPU, CLOUD_CPU = 0, 1
EXAMPLE = Path(__file__).parents[1] / "examples" / "profile.md"
MIN_TTFT_CONTEXT = 1300


@dataclass
class BenchConfig:
    rounds: int = 2
    prompts: int = 2
    max_new_tokens: int = 32
    rtts_ms: tuple[float, ...] = (0.0, 20.0, 100.0)
    lookahead: tuple[int, int] | tuple[int, int, float] = CPU_LOOKAHEAD
    speculate: int = 2
    cloud_top_k: int = DEFAULT_TOP_K  # the first k of a split session, adapted by each session as it goes
    data: Path | None = None  # a CoGenesis folder; None: the example profile


def _progress(message: str) -> None:
    log.info("[bench %s] %s", time.strftime("%H:%M:%S"), message)  # `costeer bench` shows INFO


@contextmanager
def _on_cpu(cpu: int) -> Iterator[None]:
    """Run this thread on one CPU (llama.cpp with one thread decodes in the calling thread)."""
    if not hasattr(os, "sched_setaffinity") or cpu >= (os.cpu_count() or 1):
        yield  # one CPU, or no affinity control: both sides share what there is
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def load_tasks(config: BenchConfig) -> list[tuple[list, list]]:
    """(public, private) message pairs: CoGenesis dev, or the example profile."""
    from ..evaluation.datasets import load_cogenesis
    from ..prompts import build_prompts

    if config.data is not None and (config.data / "ctx_dev.json").is_file():
        return [(e.public, e.private) for e in load_cogenesis(config.data).examples]
    pair = build_prompts("Write a two-sentence invitation to my birthday party.", EXAMPLE.read_text(encoding="utf-8"))
    return [(pair.public, pair.private)]


def decode_ms(g) -> float | None:
    """Milliseconds per generated token after the first (prefill excluded), of a
    Generation or a DecodeResult."""
    n = len(g.token_ids)
    return (g.elapsed_s - g.time_to_first_token_s) / (n - 1) * 1000 if n > 1 else None


def rotating(names: list[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    for r in range(rounds):
        yield r, names[r % len(names):] + names[: r % len(names)]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _check_equal(what: str, a: list[int], b: list[int], reference: str = "per-token CoSteer") -> None:
    if a != b:
        raise RuntimeError(f"bench: {what} gave other tokens than {reference} "
                           f"(first difference at token {next(i for i, (x, y) in enumerate(zip(a + [-1], b + [-1])) if x != y)})")


def bench_fusion(cs, public, private, reps: int = 30) -> dict:
    """Time of one fusion step, loop over closed form, on real logits; same greedy tokens."""
    from ..fusion import SteeringParams, fuse_closed_form, fuse_ftrl_loop, local_delta, log_softmax, steering_coefficient

    llm, slm = cs.model("llm"), cs.model("slm")
    with llm.open_streams([llm.encode_chat(public)], 1) as cloud, \
            slm.open_streams([slm.encode_chat(private), slm.encode_chat(public)], 1) as device:
        base = log_softmax(cloud.logits()[0])
        delta = local_delta(*device.logits())
    params = SteeringParams()
    c = steering_coefficient(params)
    times: dict[str, list[float]] = {"closed": [], "loop": []}
    for r in range(reps):
        for name in (("closed", "loop") if r % 2 == 0 else ("loop", "closed")):
            t0 = time.perf_counter()
            fuse_closed_form(base, delta, c) if name == "closed" else fuse_ftrl_loop(base, delta, params)
            times[name].append(time.perf_counter() - t0)
    closed = cs.generate_from_messages(public, private, method="costeer", fusion="closed", max_new_tokens=16)
    loop = cs.generate_from_messages(public, private, method="costeer", fusion="loop", max_new_tokens=16)
    _check_equal("the FTRL loop", loop.token_ids, closed.token_ids)
    return {"fusion_loop_over_closed": _median(times["loop"]) / _median(times["closed"]),
            "fusion_closed_ms": _median(times["closed"]) * 1000, "fusion_loop_ms": _median(times["loop"]) * 1000}


def bench_embedded(cs, tasks, config: BenchConfig, specsteer_tokens: dict[int, list[int]]) -> dict:
    """CoSteer's speed over the cloud model alone, and SpecSteer's over CoSteer's, in-process;
    fills `specsteer_tokens` (task -> tokens), what split SpecSteer must give."""
    ms: dict[str, list[float]] = {"llm": [], "costeer": [], "specsteer": []}
    for r, order in rotating(list(ms), config.rounds):
        for i, (public, private) in enumerate(tasks):
            for method in order:
                g = cs.generate_from_messages(public, private, method=method, max_new_tokens=config.max_new_tokens)
                if method == "specsteer":
                    specsteer_tokens.setdefault(i, g.token_ids)
                value = decode_ms(g)
                if value is not None:
                    ms[method].append(value)
        _progress(f"embedded round {r + 1}/{config.rounds}")
    return {"embedded_llm_ms_per_token": _median(ms["llm"]), "embedded_costeer_ms_per_token": _median(ms["costeer"]),
            "embedded_costeer_over_llm": _median(ms["llm"]) / _median(ms["costeer"]),
            "embedded_specsteer_ms_per_token": _median(ms["specsteer"]),
            "specsteer_over_costeer": _median(ms["costeer"]) / _median(ms["specsteer"]),
            # embedded, a draft would have to be scored in one pass to save anything, and
            # a pass of 2+ tokens of one sequence is not bit-exact on this llama.cpp build
            "embedded_speculate_over_llm": None,
            "embedded_speculate": "not offered: exact drafts are scored one token a pass here, which costs "
                                  "embedded what per-token steps cost (see cloud_batch_cost and docs/speed.md)"}


@contextmanager
def _whole_machine(models) -> Iterator[None]:
    """All CPUs and as many threads, as `costeer generate` runs on a user's machine."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    everything = set(range(os.cpu_count() or 1))
    before = [m.n_threads for m in models]
    if cpus:
        os.sched_setaffinity(0, everything)
    for m in models:
        m.n_threads = len(everything)
    try:
        yield
    finally:
        for m, n in zip(models, before):
            m.n_threads = n
        if cpus:
            os.sched_setaffinity(0, cpus)


def bench_ttft(cs_factory, tasks, config: BenchConfig) -> dict:
    """Cold (empty context cache) and warm time to first token on a long private
    context, embedded on the whole machine (what `costeer generate` does)."""
    probe = cs_factory(None)
    slm = probe.model("slm")
    long = next(((pub, priv) for pub, priv in tasks if len(slm.encode_chat(priv)) >= MIN_TTFT_CONTEXT), tasks[0])
    tokens = len(slm.encode_chat(long[1]))
    cold, warm = [], []
    with _whole_machine([probe.model("llm"), slm]):
        for r in range(config.rounds):
            with tempfile.TemporaryDirectory(prefix="costeer-bench-cache-") as folder:
                cs = cs_factory(folder)
                first = cs.generate_from_messages(*long, max_new_tokens=8)
                again = cs.generate_from_messages(*long, max_new_tokens=8)
                _check_equal("a warm context cache", again.token_ids, first.token_ids)
                cold.append(first.time_to_first_token_s)
                warm.append(again.time_to_first_token_s)
            _progress(f"time to first token round {r + 1}/{config.rounds}: cold {cold[-1]:.2f} s, warm {warm[-1]:.2f} s")
    return {"ttft_cold_s": _median(cold), "ttft_warm_s": _median(warm), "ttft_context_tokens": tokens}


def bench_llm_stream(cs, tasks, config: BenchConfig) -> dict:
    """The cloud model alone on the cloud's core: the speed a user gives up."""
    ms = []
    with _on_cpu(CLOUD_CPU):
        for _ in range(config.rounds):
            for public, private in tasks:
                value = decode_ms(cs.generate_from_messages(public, private, method="llm",
                                                             max_new_tokens=config.max_new_tokens))
                if value is not None:
                    ms.append(value)
    return {"llm_stream_ms_per_token": _median(ms)}


def bench_batch_cost(model, sizes=(1, 2, 4, 8, 16), reps: int = 3) -> dict:
    """Seconds of one forward pass of n new tokens over one of 1, on the cloud's core
    (llama.cpp models only: it feeds a batch through the group's own decode)."""
    if not hasattr(model, "supports_prefix_state") or type(model).__name__ != "LlamaCppModel":
        return {}
    prompt = model.tokenize("The quick brown fox jumps over the lazy dog. " * 8)
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    with _on_cpu(CLOUD_CPU):
        for r in range(reps):
            for n in sizes:
                with model.open_streams([prompt], max(sizes)) as group:
                    t0 = time.perf_counter()
                    _feed(group, prompt[:n])
                    seconds[n].append(time.perf_counter() - t0)
    one = _median(seconds[1])
    return {"cloud_batch_cost": {str(n): round(_median(seconds[n]) / one, 3) for n in sizes},
            "cloud_forward_ms": round(one * 1000, 1)}


def bench_contention(llm, slm, public, private, steps: int = 8) -> dict:
    """A device step and a cloud step, each alone on its core, then both at once. On a
    machine whose two CPUs share memory bandwidth (or a physical core), concurrent
    decoding slows each side: the two simulated machines are not independent."""
    import threading

    with slm.open_streams([slm.encode_chat(private), slm.encode_chat(public)], 4 * steps) as device, \
            llm.open_streams([llm.encode_chat(public)], 4 * steps) as cloud:
        def timed(group, cpu: int, out: list[float]) -> None:
            with _on_cpu(cpu):
                for _ in range(steps):
                    t0 = time.perf_counter()
                    group.advance(13)
                    out.append(time.perf_counter() - t0)

        alone_device, alone_cloud, both_device, both_cloud = [], [], [], []
        timed(device, DEVICE_CPU, alone_device)
        timed(cloud, CLOUD_CPU, alone_cloud)
        other = threading.Thread(target=timed, args=(cloud, CLOUD_CPU, both_cloud))
        other.start()
        timed(device, DEVICE_CPU, both_device)
        other.join()
    return {"device_step_ms": _median(alone_device) * 1000, "cloud_step_ms": _median(alone_cloud) * 1000,
            "device_step_concurrent_ms": _median(both_device) * 1000, "cloud_step_concurrent_ms": _median(both_cloud) * 1000}


def _feed(group, tokens: list[int]) -> None:
    """Decode `tokens` in one batch (llama.cpp groups), for the batch-cost curve."""
    start = group._positions[0]
    group._fill([(t, start + i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
    group._decode()


# A split mode's method: the default one (auto), but where named here.
SPLIT_MODE_METHODS = {"specsteer_speculate": "specsteer"}


def split_modes(config: BenchConfig) -> dict[str, dict]:
    """Each split mode the bench measures: its cloud options beyond the defaults (whose
    lookahead is "auto": on from 80 ms)."""
    return {"default": {}, "per_token": {"lookahead": None}, "lookahead": {"lookahead": config.lookahead},
            "speculate": {"lookahead": None, "speculate": config.speculate},
            "speculate_lookahead": {"speculate": config.speculate, "lookahead": config.lookahead},
            "specsteer_speculate": {"lookahead": None, "speculate": config.speculate}}


def bench_split(tasks, config: BenchConfig, llm_stream_ms: float, device_slm, cache,
                specsteer_tokens: dict[int, list[int]]) -> dict:
    """Every split mode at every simulated RTT; each exact mode's tokens checked against
    per-token steps, SpecSteer's (lossy by design) against embedded SpecSteer's."""
    from ..api import CloudConfig, CoSteer

    results: dict = {}
    drafted = followed = 0
    with _served_cloud() as url:
        for rtt in config.rtts_ms:
            modes = split_modes(config)
            clients = {}
            for name, options in modes.items():
                cloud = CloudConfig(url, simulate_rtt_ms=rtt, top_k=config.cloud_top_k, **options)
                clients[name] = CoSteer(cloud=cloud, quiet=True, context_cache=cache)
                clients[name]._slots["slm"].model = device_slm  # one device model in memory
            ms: dict[str, list[float]] = {m: [] for m in modes}
            trips: dict[str, list[float]] = {m: [] for m in modes}
            first_token: list[float] = []
            for r, order in rotating(list(modes), config.rounds):
                tokens: dict[tuple[int, str], list[int]] = {}
                for i, (public, private) in enumerate(tasks):
                    for name in order:
                        method = SPLIT_MODE_METHODS.get(name, "auto")
                        g = clients[name].generate_from_messages(public, private, method=method,
                                                                 max_new_tokens=config.max_new_tokens)
                        tokens[(i, name)] = g.token_ids
                        value = decode_ms(g)
                        if value is not None:
                            ms[name].append(value)
                        trips[name].append(g.traffic["round_trips"] / max(1, g.new_tokens))
                        if name not in SPLIT_MODE_METHODS:  # the exact modes' acceptance
                            drafted += g.traffic.get("draft_tokens", 0)
                            followed += g.traffic.get("draft_tokens_followed", 0)
                        if g.context_cache_tokens and name == "per_token":
                            first_token.append(g.time_to_first_token_s)
                    for name in modes:
                        if name in SPLIT_MODE_METHODS:
                            _check_equal(f"split {name} at {rtt:g} ms", tokens[(i, name)], specsteer_tokens[i],
                                         reference="embedded SpecSteer")
                        else:
                            _check_equal(f"{name} {modes[name]} at {rtt:g} ms", tokens[(i, name)], tokens[(i, "per_token")])
                _progress(f"split at {rtt:g} ms, round {r + 1}/{config.rounds}: "
                          + ", ".join(f"{n} {_median(ms[n]):.0f} ms/token" for n in modes))
            for name in modes:
                clients[name]._slots["slm"].model = None
                clients[name].close()
            r = f"{rtt:g}ms"
            best = min((n for n in modes if n not in SPLIT_MODE_METHODS), key=lambda n: _median(ms[n]))
            results[f"split_costeer_over_llm_stream_{r}"] = llm_stream_ms / _median(ms[best])
            results[f"split_round_trips_per_token_{r}"] = _median(trips["default"])
            results[f"split_specsteer_speculate_over_costeer_{r}"] = _median(ms[best]) / _median(ms["specsteer_speculate"])
            results[f"split_best_mode_{r}"] = best
            for name in modes:
                results[f"split_{name}_ms_per_token_{r}"] = _median(ms[name])
                results[f"split_{name}_over_llm_stream_{r}"] = llm_stream_ms / _median(ms[name])
                results[f"split_{name}_round_trips_per_token_{r}"] = _median(trips[name])
            results[f"split_ttft_warm_s_{r}"] = _median(first_token)  # device on one core, cloud on the other
    results["speculate_acceptance"] = followed / drafted if drafted else float("nan")
    return results


def _served_cloud():
    """`costeer serve` with the default cloud model, on the cloud's core, one thread."""
    from .processes import free_port, running

    port = free_port()
    command = [sys.executable, "-m", "costeer.cli", "serve", "--port", str(port)]
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > CLOUD_CPU:
        # explicitly: a child inherits this thread's affinity, which is the device's CPU
        command = ["taskset", "-c", str(CLOUD_CPU), *command]
    return running(command, "/healthz", port, env={"COSTEER_THREADS": "1"}, timeout_s=300)


def run_bench(config: BenchConfig) -> dict:
    os.environ["COSTEER_THREADS"] = "1"  # before any model loads: one thread per side
    from ..context_cache import ContextCache
    from ..api import CoSteer

    warn_if_contended("bench")
    started = time.perf_counter()
    tasks = load_tasks(config)
    _progress(f"{len(tasks)} tasks available; loading the default models")
    with _on_cpu(DEVICE_CPU):
        cs = CoSteer(quiet=True, context_cache=False)
        llm, slm = cs.model("llm"), cs.model("slm")
        chosen = tasks[: config.prompts]
        result: dict = {"config": {"rounds": config.rounds, "prompts": len(chosen), "max_new_tokens": config.max_new_tokens,
                                   "lookahead": list(config.lookahead), "speculate": config.speculate,
                                   "cloud_top_k": config.cloud_top_k,
                                   "threads_per_side": 1}}

        def with_cache(folder):
            c = CoSteer(quiet=True, context_cache=ContextCache(folder) if folder else False)
            c._slots["llm"].model, c._slots["slm"].model = llm, slm
            return c

        cache_folder = tempfile.mkdtemp(prefix="costeer-bench-cache-")
        warm = with_cache(cache_folder)  # after its first prefill a context is warm, as a user's would be
        result.update(bench_fusion(warm, *chosen[0]))
        _progress(f"fusion: loop {result['fusion_loop_ms']:.1f} ms, closed {result['fusion_closed_ms']:.2f} ms")
        result.update(bench_ttft(with_cache, tasks, config))
        specsteer_tokens: dict[int, list[int]] = {}
        result.update(bench_embedded(warm, chosen, config, specsteer_tokens))
        result.update(bench_llm_stream(warm, chosen, config))
        _progress(f"cloud model alone on its core: {result['llm_stream_ms_per_token']:.0f} ms/token")
        result.update(bench_batch_cost(llm))
        _progress(f"batch cost: {result['cloud_batch_cost']}")
        result.update(bench_contention(llm, slm, *chosen[0]))
        _progress(f"steps alone: device {result['device_step_ms']:.0f} ms, cloud {result['cloud_step_ms']:.0f} ms; "
                  f"at once: {result['device_step_concurrent_ms']:.0f} and {result['cloud_step_concurrent_ms']:.0f} ms")
        result.update(bench_split(chosen, config, result["llm_stream_ms_per_token"], slm, warm.context_cache,
                                  specsteer_tokens))
        shutil.rmtree(cache_folder, ignore_errors=True)
    result["bench_seconds"] = round(time.perf_counter() - started, 1)
    return result


def format_table(result: dict) -> str:
    lines = ["| figure | value |", "|---|---|"]
    for key, value in result.items():
        if key == "config":
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else json.dumps(value)
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)
