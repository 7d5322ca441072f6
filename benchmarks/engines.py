"""CoSteer against real cloud engines: the birthday example and the first CoGenesis dev
prompts, greedy, on each cloud given, with what each cost and whether every step was
exact (certified, with every top-k entry mapped to its token id).

    .venv/bin/python benchmarks/engines.py --cloud openai+http://127.0.0.1:8101/v1 \\
        --cloud llama-server+http://127.0.0.1:8102 --cloud http://127.0.0.1:8000

Start the engines first (scripts/engines.py serve ...; `costeer serve` for the last).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from costeer import CloudConfig, CoSteer
from costeer.evaluation.datasets import load_dataset

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "src" / "costeer" / "examples" / "profile.md"
BIRTHDAY = "Write a two-sentence invitation to my birthday party."
FACTS = ("Thaddeus", "Tromsø", "Polaria", "ice sculpt", "reindeer", "Ingrid", "Pølse", "frosty")


def run(cloud: str, dev: str, prompts: int, max_new_tokens: int) -> dict:
    device = CoSteer(cloud=CloudConfig(cloud), quiet=True, context_cache=False)
    answers = [device.generate(BIRTHDAY, PROFILE.read_text(encoding="utf-8"), max_new_tokens=max_new_tokens)]
    birthday = answers[0].text
    for example in load_dataset(dev).examples[:prompts]:
        answers.append(device.generate_from_messages(example.public, example.private, max_new_tokens=max_new_tokens))
    device.close()
    traffic = [g.traffic for g in answers]
    tokens = sum(g.new_tokens for g in answers)
    return {
        "cloud": cloud,
        "kind": traffic[0].get("cloud_kind", "costeer serve"),
        "answers": len(answers),
        "tokens": tokens,
        "uncertified": sum(t.get("uncertified_steps", 0) for t in traffic),
        "unmapped": sum(t.get("unmapped_top_entries", 0) for t in traffic),
        "first_k_settled": statistics.mean(t.get("certified_first_fraction") or 0 for t in traffic),
        "trips_per_token": sum(t["round_trips"] for t in traffic) / tokens,
        "kb_per_token": sum(t["bytes_from_cloud"] + t["bytes_to_cloud"] for t in traffic) / 1024 / tokens,
        "tok_s": statistics.median(g.tokens_per_second for g in answers),
        "facts": [f for f in FACTS if f.lower() in birthday.lower()],
        "birthday": birthday,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cloud", action="append", required=True, help="a cloud URL as costeer generate --cloud takes")
    parser.add_argument("--dev", default=str(ROOT.parent / "shared" / "data" / "cogenesis"),
                        help="a CoGenesis folder (default ../shared/data/cogenesis)")
    parser.add_argument("--prompts", type=int, default=5, help="CoGenesis dev prompts after the birthday example")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    args = parser.parse_args()
    rows = []
    for cloud in args.cloud:
        start = time.perf_counter()
        rows.append(run(cloud, args.dev, args.prompts, args.max_new_tokens))
        rows[-1]["wall_s"] = time.perf_counter() - start
    print("| cloud | answers | tokens | uncertified steps | unmapped entries | settled by first k "
          "| round trips/token | KiB/token | median tok/s | profile facts in the birthday answer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['answers']} | {r['tokens']} | {r['uncertified']} | {r['unmapped']} "
              f"| {r['first_k_settled']:.0%} | {r['trips_per_token']:.2f} | {r['kb_per_token']:.1f} | {r['tok_s']:.2f} "
              f"| {len(r['facts'])}: {', '.join(r['facts'])} |")
    for r in rows:
        print(f"\n[{r['kind']}] {r['cloud']} ({r['wall_s']:.0f} s)\n{r['birthday']}")


if __name__ == "__main__":
    main()
