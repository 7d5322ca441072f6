"""`costeer eval`: run methods over a dataset, score the answers, write a report.

    datasets.py   CoGenesis-format splits and the packaged preference tasks
    metrics.py    per-answer scores (ROUGE, METEOR, embedding similarity, length, ...)
    stats.py      bootstrap confidence intervals and paired comparisons
    store.py      results.jsonl: append-only, resumable, one fsync'd line per row
    plots.py      the report's PNG figures
    report.py     report.md
    runner.py     the loop tying them together
    compare.py    paired comparisons across runs, and the rule that chose `auto` (scripts/)
    diagnose.py   copying, length and per-token flips of a steering method (scripts/)
    layouts.py    CoGenesis splits with the device prompt laid out differently (scripts/)

Everything here needs the `eval` extra: pip install 'costeer[eval]'.
"""
