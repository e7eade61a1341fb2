"""Inference engines behind one narrow async interface (see ``base.Engine``)."""
