"""mlserve: package, pull, serve and benchmark quantized GGUF models."""

__version__ = "0.1.0"
