"""The device's clients of a remote cloud: `costeer serve` (served.py, which walks lookahead
trees with lookahead.py and reopens sessions after a restart with resume.py), OpenAI-compatible
completion servers (openai.py) and llama.cpp's llama-server (llama_server.py)."""
