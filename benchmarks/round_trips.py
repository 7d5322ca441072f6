"""Round trips per token of each split mode, against a real `costeer serve` on loopback.

    .venv/bin/python benchmarks/round_trips.py [--method auto] [--max-new-tokens 60]

The README's birthday example and a second request on the example profile, greedy,
the default models: per-token steps, the defaults (lookahead auto) on loopback and
behind a simulated 100 ms round trip, `--lookahead 3,1`, `--speculate 1/2/3` and
`--speculate 2 --lookahead 3,1`. Each mode's tokens are
checked equal to per-token steps (the script fails if not). Round trips are counts,
not times, so the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json

from costeer import CloudConfig, CoSteer
from costeer.bench.speed import EXAMPLE, _served_cloud

PROMPTS = ["Write a two-sentence invitation to my birthday party.", "Write a short note to my neighbour about the noise."]
MODES = {"per-token": dict(lookahead=None), "defaults on loopback": {},
         "defaults at 100 ms": dict(simulate_rtt_ms=100.0), "lookahead 3,1": dict(lookahead=(3, 1)),
         "speculate 1": dict(lookahead=None, speculate=1), "speculate 2": dict(lookahead=None, speculate=2),
         "speculate 3": dict(lookahead=None, speculate=3), "speculate 2, lookahead 3,1": dict(speculate=2, lookahead=(3, 1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    args = parser.parse_args()
    profile = EXAMPLE.read_text(encoding="utf-8")
    with _served_cloud() as url:
        device = CoSteer(cloud=CloudConfig(url), quiet=True).model("slm")
        for prompt in PROMPTS:
            reference = None
            for mode, options in MODES.items():
                cs = CoSteer(cloud=CloudConfig(url, **options), quiet=True)
                cs._slots["slm"].model = device  # one device model in memory
                g = cs.generate(prompt, profile, method=args.method, max_new_tokens=args.max_new_tokens)
                reference = reference or g.token_ids
                if g.token_ids != reference:
                    raise SystemExit(f"{mode} gave other tokens than per-token steps on {prompt!r}")
                t = g.traffic
                print(json.dumps({"prompt": prompt, "mode": mode, "tokens": g.new_tokens,
                                  "round_trips_per_token": round(t["round_trips"] / g.new_tokens, 3),
                                  "draft_tokens": t.get("draft_tokens"), "followed": t.get("draft_tokens_followed")}),
                      flush=True)


if __name__ == "__main__":
    main()
