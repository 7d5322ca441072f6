"""Per-token time of the device/cloud split, with and without overlapping the two sides.

    .venv/bin/python benchmarks/split_latency.py [--rounds 3] [--max-new-tokens 48] [--rtt-ms 0,20]

Simulates two machines on this one: `costeer serve` pinned to CPU 1 and the device
pinned to CPU 0, one thread each. For each simulated round-trip time it runs, side
by side in rotating order, CoSteer with the device's step overlapped with the
cloud's (the default) and strictly one after the other, and the cloud model alone
(`--method llm` through the same server). Prints median decode ms per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ["COSTEER_THREADS"] = "1"

from costeer import CoSteer  # noqa: E402
from costeer.transport.client import RemoteStreams  # noqa: E402
from servers import free_port, running  # noqa: E402

PROFILE = Path(__file__).resolve().parents[1] / "src" / "costeer" / "examples" / "profile.md"
PROMPT = "Write a short story about my next weekend, in my own style."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rtt-ms", default="0,20")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    port = free_port()
    server = ["taskset", "-c", "1", sys.executable, "-m", "costeer.cli", "serve", "--port", str(port)]
    context = PROFILE.read_text()
    results: dict[str, list[float]] = {}
    with running(server, "/healthz", port, env={"COSTEER_THREADS": "1"}) as url:
        for rtt in [float(x) for x in args.rtt_ms.split(",")]:
            cs = CoSteer(cloud=url, simulate_rtt_ms=rtt, quiet=True, context_cache=False)  # cold prefills
            variants = {
                f"llm alone, rtt {rtt:g} ms": ("llm", True),
                f"costeer overlapped, rtt {rtt:g} ms": ("costeer", True),
                f"costeer sequential, rtt {rtt:g} ms": ("costeer", False),
            }
            for r in range(args.rounds):
                names = list(variants)
                names = names[r % len(names):] + names[: r % len(names)]
                for name in names:
                    method, overlap = variants[name]
                    RemoteStreams.remote = overlap  # False: the loop steps the cloud, then the device
                    g = cs.generate(PROMPT, context, method=method, max_new_tokens=args.max_new_tokens)
                    if g.new_tokens > 1:
                        ms = (g.elapsed_s - g.time_to_first_token_s) / (g.new_tokens - 1) * 1000
                        results.setdefault(name, []).append(ms)
            RemoteStreams.remote = True
            cs.close()
    print("| variant | ms/token (median) | runs |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.1f} | {len(values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
