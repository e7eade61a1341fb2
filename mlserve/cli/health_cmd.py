"""``mlserve health``: probe a server; exit 0 healthy, 1 unhealthy, 2 unreachable."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import quote

import httpx
import typer

from mlserve.cli.app import app
from mlserve.cli.console import emit_json, info
from mlserve.errors import CheckFailed, MlserveError, UsageError

POLL_S = 0.1
HEALTHY, UNHEALTHY, UNREACHABLE = 0, 1, 2


@dataclass
class Probe:
    """What one round of probing found."""

    code: int
    checks: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


def _status_of(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return f"HTTP {resp.status_code}"
    if isinstance(body, dict) and isinstance(body.get("status"), str):
        return str(body["status"])
    return f"HTTP {resp.status_code}"


def _get_first(client: httpx.Client, base: str, paths: tuple[str, ...]) -> tuple[str, httpx.Response]:
    """GET the first of ``paths`` the server knows (others: vLLM and llama.cpp answer /health)."""
    resp: httpx.Response | None = None
    for path in paths:
        resp = client.get(base + path)
        if resp.status_code != 404:
            return path, resp
    assert resp is not None
    return paths[-1], resp


def probe(base: str, ready: bool, model: str | None, timeout: float, api_key: str | None = None) -> Probe:
    """Liveness, then readiness (--ready) and the model's readiness (--model, which needs a key once keys exist)."""
    result = Probe(HEALTHY)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    try:
        with httpx.Client(timeout=timeout, headers=headers) as client:
            path, resp = _get_first(client, base, ("/health/live", "/v2/health/live", "/health"))
            result.checks["live"] = {"path": path, "status_code": resp.status_code, "ok": resp.status_code == 200}
            if resp.status_code != 200:
                return Probe(UNHEALTHY, result.checks, f"{path} answered HTTP {resp.status_code} ({_status_of(resp)})")
            if ready:
                path, resp = _get_first(client, base, ("/health/ready", "/v2/health/ready", "/health"))
                ok = resp.status_code == 200
                state = _status_of(resp)
                result.checks["ready"] = {"path": path, "status_code": resp.status_code, "ok": ok, "state": state}
                if not ok:
                    result = Probe(UNHEALTHY, result.checks, f"the server is not ready ({state})")
            if model:
                path = f"/v2/models/{quote(model, safe=':')}/ready"
                resp = client.get(base + path)
                ok = resp.status_code == 200
                result.checks["model"] = {"name": model, "path": path, "status_code": resp.status_code, "ok": ok}
                if not ok and result.code == HEALTHY:
                    if resp.status_code == 404:
                        why = "is not served there"
                    elif resp.status_code in (401, 403):
                        code = resp.status_code
                        why = f"could not be checked: the server wants an infer-scope key (HTTP {code}; pass --api-key)"
                    else:
                        why = f"is not ready (HTTP {resp.status_code})"
                    result = Probe(UNHEALTHY, result.checks, f"model {model} {why}")
    except httpx.TransportError as exc:
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "refused or failed"
        return Probe(UNREACHABLE, result.checks, f"connection {kind} ({type(exc).__name__})")
    return result


@app.command()
def health(
    url: str = typer.Argument(..., help="The server's base URL, e.g. http://127.0.0.1:8000."),
    ready: bool = typer.Option(
        False, "--ready", help="Require readiness (models loaded, not draining), not just life."
    ),
    model: Optional[str] = typer.Option(None, "--model", help="Also require this model to be ready."),
    wait: float = typer.Option(
        0.0, "--wait", min=0, help="Poll every 0.1 s until healthy, for up to this many seconds."
    ),
    timeout: float = typer.Option(5.0, "--timeout", min=0.1, help="Per-probe HTTP timeout, seconds."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="MLSERVE_API_KEY", help="Bearer key, for --model on a server with keys."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Probe a server: exit 0 healthy, 1 unhealthy (answered but not live/ready), 2 unreachable.

    Without --ready only liveness (GET /health/live) is checked; --ready checks /health/ready,
    which is 503 while models load or the server drains; --model checks /v2/models/NAME/ready.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise UsageError(f"{url!r} is not an http(s) URL.", "Example: mlserve health http://127.0.0.1:8000 --ready")
    base = url.rstrip("/")
    started = time.monotonic()
    deadline = started + wait
    attempts = 0
    while True:
        attempts += 1
        remaining = deadline - time.monotonic()
        result = probe(base, ready, model, min(timeout, max(remaining, 0.2)) if wait else timeout, api_key)
        if result.code == HEALTHY or time.monotonic() + POLL_S > deadline:
            break
        time.sleep(POLL_S)
    elapsed = round(time.monotonic() - started, 3)
    status = ("healthy", "unhealthy", "unreachable")[result.code]
    if as_json:
        emit_json(
            {
                "url": base,
                "status": status,
                "healthy": result.code == HEALTHY,
                "detail": result.detail or None,
                "checks": result.checks,
                "attempts": attempts,
                "elapsed_s": elapsed,
            }
        )
    if result.code == HEALTHY:
        if not as_json:
            info(f"healthy: {base} ({', '.join(result.checks)} ok)")
        return
    waited = f" after waiting {wait:g} s" if wait else ""
    if result.code == UNHEALTHY:
        raise CheckFailed(f"{base} is unhealthy{waited}: {result.detail}.", "See the server's log; retry with --wait.")
    raise MlserveError(
        f"Cannot reach {base}{waited}: {result.detail}.",
        "Check the URL and port, and that the server runs (`mlserve serve REF`).",
    )
