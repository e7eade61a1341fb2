"""Inference engines behind one narrow async interface (``mlserve.engine.api``)."""
