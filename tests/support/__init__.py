"""Test helpers: tiny GGUF writer, fake Hub, fake OpenAI server, server processes, store snapshots."""
