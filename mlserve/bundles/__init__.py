"""Bundles: the content-addressed store, GGUF validation, packing, transfer and channels."""
