"""GGUF models through llama.cpp's C API (llama-cpp-python), the default backend.

lib.py loads the library; streams.py holds its contexts and the stream group over
one; tree.py (lookahead trees) and batch.py (the server's batched slots) build on
streams.py; model.py (LlamaCppModel) opens all three.
"""
