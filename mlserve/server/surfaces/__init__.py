"""Wire protocols over the one inference service: one module per surface, one line each in ``SURFACES``.

Adding a surface: write ``surfaces/NAME.py`` exposing ``SURFACE`` (its ``RouteSpec``s, each
with a scope and whether it is audited, and its error renderer), then add it below.
Surfaces whose routes come from settings (Vertex AI's ``AIP_*`` routes) join in ``surfaces_for``.
"""

from __future__ import annotations

from mlserve.server import health, openapi
from mlserve.server.registry import Surface
from mlserve.server.settings import ServerSettings
from mlserve.server.surfaces import anthropic, ollama, openai, vertex

SURFACES: tuple[Surface, ...] = (
    health.OPS,
    health.KSERVE,
    openapi.SURFACE,
    openai.SURFACE,
    ollama.SURFACE,
    anthropic.SURFACE,
)
FALLBACK = health.OPS  # renders errors (OpenAI's shape) for paths no surface declares


def surfaces_for(settings: ServerSettings) -> tuple[Surface, ...]:
    """Every surface a server with these settings serves: ``SURFACES``, then Vertex AI's when configured."""
    return (*SURFACES, *vertex.surfaces(settings, SURFACES))
