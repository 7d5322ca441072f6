"""`costeer eval`: run methods over a dataset, score the answers, write a report.

    datasets.py   CoGenesis-format splits and the packaged preference tasks
    metrics.py    per-answer scores (ROUGE, METEOR, embedding similarity, length, ...)
    stats.py      bootstrap confidence intervals and paired comparisons
    store.py      results.jsonl: append-only, resumable, one fsync'd line per row
    plots.py      the report's PNG figures
    report.py     report.md
    runner.py     the loop tying them together

Everything here needs the `eval` extra: pip install 'costeer[eval]'.
"""
