"""The device's clients of a remote cloud: `costeer serve` (served.py), OpenAI-compatible
completion servers (openai.py) and llama.cpp's llama-server (llama_server.py)."""
