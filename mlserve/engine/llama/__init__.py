"""The llama.cpp backend: model wrapper, engine and the factory that builds it from a bundle."""
