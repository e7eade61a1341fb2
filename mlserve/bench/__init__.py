"""Benchmarking: an OpenAI-compatible load generator, vLLM-style metrics, and an offline engine bench.

Core layer: nothing here imports typer, rich, starlette, uvicorn, the server or the CLI;
the offline bench receives its llama.cpp model from the caller.
"""
