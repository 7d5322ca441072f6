"""`costeer serve`: the cloud model behind an HTTP API (app.py), its compute thread and
batches (scheduler.py) and its caps (limits.py)."""
