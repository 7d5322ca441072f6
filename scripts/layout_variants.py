"""CoGenesis splits with the device prompt laid out differently, to test whether the
layout, not the private content, drives the paper's over-steering.

    python scripts/layout_variants.py --out build/layouts --limit 16
    python scripts/layout_variants.py --data ../shared/data/cogenesis-paper/paper_dev.json --out build/paper-layouts --limit 60
    costeer eval --dataset build/layouts/no-instruction --out reports/layout-no-instruction ...

CoGenesis's private prompt is an instruction paragraph ("You are now a helpful
personal AI assistant. You should emulate the author's style and tone based on
provided history content. ..."), then `## User Profile`, `## User Writing History`
and `## Task`; the public prompt is the task alone. The device's delta is the
difference of the two, so it carries the instruction as well as the profile and
history (the `paper` split: the past abstracts). Each variant changes one thing:

  no-instruction      private prompt without the instruction paragraph
  no-history          private prompt without the history sections (profile kept)
  shared-instruction  the public prompt gets the instruction too (it is not private),
                      so the delta holds the profile and history alone; `llm` must be
                      re-run on this variant, its public prompt differs

Rows keep their tids and references, so answers pair with the original runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from costeer.errors import UserError
from costeer.evaluation.layouts import write_variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # a script: the default is relative to where it is run (the repository root, beside ../shared)
    parser.add_argument("--data", default="../shared/data/cogenesis",
                        help="a split X.json (with X_wo.json beside it), or a folder with ctx_dev.json and ctx_dev_wo.json")
    parser.add_argument("--out", default="build/layouts")
    parser.add_argument("--limit", type=int, default=16)
    args = parser.parse_args()
    try:
        for folder, rows in write_variants(Path(args.data), Path(args.out), args.limit):
            print(f"{folder}: {rows} rows")
    except UserError as exc:
        sys.exit(f"layout_variants: {exc}")


if __name__ == "__main__":
    main()
