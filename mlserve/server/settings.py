"""The server's settings: each comes from a CLI flag, then MLSERVE_* environment, then the default here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    """Server limits; each comes from a CLI flag, then MLSERVE_* environment, then this default."""

    request_timeout: float | None = 600.0
    drain_timeout: float = 30.0
    max_body_bytes: int = 4 << 20
    max_tokens_cap: int | None = None
    retry_after: int = 1
    # Security (issue 8): None means off, so apps built directly (tests) run keyless and unaudited.
    keys_file: str | None = None
    audit_dir: str | None = None
    rate_limit: int = 0
    log_content: bool = False
    # Issue 12: the OpenAI routes again under this prefix (KServe: "/openai"); None: not mounted.
    route_prefix: str | None = None
    # Vertex AI custom containers: AIP_PREDICT_ROUTE / AIP_HEALTH_ROUTE (serve reads them); None: off.
    vertex_predict_route: str | None = None
    vertex_health_route: str | None = None
