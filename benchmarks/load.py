"""Many devices at once against one `costeer serve` on loopback: the load curve.

    .venv/bin/python benchmarks/load.py [--sessions 1,4,8,16] [--new-tokens 16] [--max-batch 3,16] [--json]

For each --max-batch it starts the server on the default cloud model (both cores),
runs every prompt alone (the reference), then 1, 4, 8 and 16 devices at once, each
stepping greedily. It prints aggregate step tokens/s (and the ratio to 1 session,
same server, same run), p50/p99 step latency, errors, how many sessions got the
tokens they got alone, and how many got those tokens and their logits bit for bit
(no cross-talk, no rounding that depends on the neighbours). Nothing else may run
on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import sys

from costeer.bench.load import alone, drive
from costeer.bench.processes import free_port, running

PROMPTS = [f"In two sentences, {q}" for q in (
    "why is the sky blue?", "what is a prime number?", "how do bees make honey?", "what is TCP?",
    "why do cats purr?", "what is entropy?", "how does a lock work?", "what is a GGUF file?",
    "why is the sea salty?", "what is a black hole?", "how do vaccines work?", "what is rust (the language)?",
    "why do leaves change colour?", "what is a hash function?", "how do tides work?", "what is jazz?")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,4,8,16")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-batch", default="3,16", help="server --max-batch values to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = [int(n) for n in args.sessions.split(",")]
    prompts = (PROMPTS * (max(counts) // len(PROMPTS) + 1))[:max(counts)]
    rows = []
    for max_batch in [int(b) for b in args.max_batch.split(",")]:
        port = free_port()
        command = [sys.executable, "-m", "costeer.cli", "serve", "--port", str(port), "--max-sessions", str(max(counts)),
                   "--batch-slot-tokens", "512", "--max-kv-tokens", str(max(counts) * 1024), "--max-batch", str(max_batch)]
        with running(command, "/healthz", port, env={"COSTEER_THREADS": str(args.threads)}) as url:
            reference = alone(url, prompts, args.new_tokens)
            base = None
            for n in counts:
                run = drive(url, prompts[:n], args.new_tokens)
                base = base or run.tokens_per_s
                rows.append({"max_batch": max_batch, "sessions": n, "tokens_per_s": round(run.tokens_per_s, 2),
                             "over_1_session": round(run.tokens_per_s / base, 2),
                             "p50_step_ms": round(run.latency_ms(50), 1), "p99_step_ms": round(run.latency_ms(99), 1),
                             "errors": len(run.errors),
                             "same_tokens": f"{sum(run.matches(reference[:n], bitwise=False))}/{n}",
                             "bit_identical": f"{sum(run.matches(reference[:n]))}/{n}"})
                if not args.json:
                    print(rows[-1], flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("\n| max batch | sessions | tokens/s | over 1 session | p50 step ms | p99 step ms | errors | tokens as alone | bit-identical to alone |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(str(r[k]) for k in ("max_batch", "sessions", "tokens_per_s", "over_1_session",
                                                        "p50_step_ms", "p99_step_ms", "errors", "same_tokens", "bit_identical")) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
