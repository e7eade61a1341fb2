"""Security: API keys and the hash-chained audit log."""
