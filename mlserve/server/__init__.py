"""The HTTP layer: starlette app, OpenAI routes, health, metrics."""
