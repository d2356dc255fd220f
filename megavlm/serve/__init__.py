"""``megavlm serve``: an OpenAI-compatible chat-completions server over megavlm's KV-cache decoding (api.py: the
HTTP side on FastAPI; engine.py: the request queue, batches and TP ranks; command.py: loading and uvicorn)."""
