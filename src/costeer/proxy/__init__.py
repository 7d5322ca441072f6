"""`costeer proxy`: an OpenAI-compatible chat endpoint on the device (app.py), its request
models (schema.py), errors (errors.py) and who may ask it for what (access.py)."""
