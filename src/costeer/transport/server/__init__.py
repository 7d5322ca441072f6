"""`costeer serve`: the cloud model behind an HTTP API (app.py), its sessions (sessions.py),
its compute thread and batches (scheduler.py), its caps (limits.py) and refusals (errors.py)."""
