"""Measuring: `costeer bench` (speed.py), the server load test (load.py), servers run as
subprocesses (processes.py) and other busy llama.cpp processes (contention.py)."""
