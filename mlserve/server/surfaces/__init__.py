"""Wire protocols over the one inference service: one module per surface, one line each in ``SURFACES``.

Adding a surface: write ``surfaces/NAME.py`` exposing ``SURFACE`` (its ``RouteSpec``s, each
with a scope and whether it is audited, and its error renderer), then add it below.
"""

from __future__ import annotations

from mlserve.server import health
from mlserve.server.registry import Surface
from mlserve.server.surfaces import openai

SURFACES: tuple[Surface, ...] = (
    health.OPS,
    health.KSERVE,
    openai.SURFACE,
)
FALLBACK = health.OPS  # renders errors (OpenAI's shape) for paths no surface declares
