"""API keys (hashes only, 0600 file), the server's key ring, the auth middleware and rate limiting."""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from mlserve.security.keys import KeyRing, KeyStore, hash_key
from mlserve.server.app import create_app
from mlserve.server.ratelimit import RateLimiter
from mlserve.server.settings import ServerSettings

CANARY = "Jane Canary-Doe MRN 00417733 SSN 123-45-6789"


def test_create_list_revoke_keep_only_hashes(cli: Callable[..., Any], home: Path) -> None:
    made = cli("keys", "create", "ward-7", "--scope", "infer", "--scope", "metrics", "--json")
    assert made.exit_code == 0, made
    doc = made.json()
    assert doc["name"] == "ward-7" and doc["scopes"] == ["infer", "metrics"]
    key = doc["key"]
    assert len(key) >= 40
    path = home / "keys.json"
    raw = path.read_text()
    assert key not in raw and hash_key(key) in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    listed = cli("keys", "list", "--json")
    assert listed.exit_code == 0
    assert [k["name"] for k in listed.json()["keys"]] == ["ward-7"]
    assert key not in listed.stdout and hash_key(key) not in listed.stdout
    assert cli("keys", "create", "ward-7").exit_code == 2  # an active key of that name exists
    assert cli("keys", "create", "x", "--scope", "root").exit_code == 2
    revoked = cli("keys", "revoke", "ward-7", "--json")
    assert revoked.exit_code == 0 and revoked.json()["revoked_at"]
    assert cli("keys", "revoke", "nobody").exit_code == 2
    events = [json.loads(line)["event"] for f in sorted((home / "audit").glob("*.jsonl")) for line in f.open()]
    assert events == ["key.create", "key.revoke"]
    assert key not in "".join(f.read_text() for f in (home / "audit").glob("*.jsonl"))


def test_create_prints_key_once_in_text_mode(cli: Callable[..., Any]) -> None:
    made = cli("keys", "create", "ops", "--scope", "admin")
    assert made.exit_code == 0
    assert made.stdout.strip().startswith("mls_") and "admin" in made.stderr


def test_key_ring_rereads_the_file(home: Path) -> None:
    store = KeyStore(home)
    ring = KeyRing(home / "keys.json", check_interval=0)
    assert not ring.enabled
    record, secret = store.create("a", ["infer"])
    ring.refresh()
    assert ring.enabled and ring.authenticate(secret) == record
    assert ring.authenticate(secret + "x") is None
    store.revoke("a")
    ring.refresh()
    assert ring.authenticate(secret) is None
    assert ring.enabled  # revoking the last key locks the server; it does not open it


def test_rate_limiter_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    assert [limiter.check("a") for _ in range(3)] == [None, None, None]
    wait = limiter.check("a")
    assert wait is not None and 1 <= wait <= 20
    assert limiter.check("b") is None  # another principal has its own bucket
    now[0] = 20.0  # 3 per minute: one token back every 20 s
    assert limiter.check("a") is None and limiter.check("a") is not None
    assert RateLimiter(0).check("a") is None


@pytest.fixture
def keyed(home: Path) -> dict[str, str]:
    store = KeyStore(home)
    out = {}
    for name, scopes in (("inf", ["infer"]), ("met", ["metrics"]), ("adm", ["admin"]), ("old", ["infer"])):
        out[name] = store.create(name, scopes)[1]
    store.revoke("old")
    return out


def _client(home: Path, rate: int = 0) -> TestClient:
    settings = ServerSettings(keys_file=str(home / "keys.json"), audit_dir=str(home / "audit"), rate_limit=rate)
    return TestClient(create_app([], settings))


def test_auth_statuses_and_scopes(home: Path, keyed: dict[str, str]) -> None:
    with _client(home) as c:
        for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"):
            assert c.get(path).status_code == 200, path
        none = c.get("/v1/models")
        assert none.status_code == 401 and none.json()["error"]["code"] == "invalid_api_key"
        assert set(none.json()["error"]) == {"message", "type", "code"}
        assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer " + keyed["old"]}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer " + keyed["inf"]}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": keyed["inf"]}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": keyed["met"]}).status_code == 403
        assert c.get("/metrics", headers={"x-api-key": keyed["inf"]}).status_code == 403
        assert c.get("/metrics", headers={"x-api-key": keyed["met"]}).status_code == 200
        assert c.get("/metrics", headers={"x-api-key": keyed["adm"]}).status_code == 200
        assert c.get("/v2/models/x/ready", headers={"x-api-key": keyed["met"]}).status_code == 403
        assert c.get("/v2/models/x/ready", headers={"x-api-key": keyed["inf"]}).status_code == 404
        assert c.get("/nowhere").status_code == 401


def test_keyless_server_is_open(home: Path) -> None:
    with _client(home) as c:
        assert c.get("/v1/models").status_code == 200


def test_rate_limit_is_per_key(home: Path, keyed: dict[str, str]) -> None:
    with _client(home, rate=2) as c:
        inf = {"x-api-key": keyed["inf"]}
        assert [c.get("/v1/models", headers=inf).status_code for _ in range(2)] == [200, 200]
        limited = c.get("/v1/models", headers=inf)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert c.get("/v1/models", headers={"x-api-key": keyed["adm"]}).status_code == 200
        assert c.get("/health/live").status_code == 200


def test_refused_inference_is_audited_without_text(home: Path, keyed: dict[str, str]) -> None:
    body = {"model": CANARY, "messages": [{"role": "user", "content": CANARY}]}
    with _client(home) as c:
        r401 = c.post("/v1/chat/completions", json=body, headers={"x-request-id": "rid-401"})
        r403 = c.post("/v1/completions", json=body, headers={"x-api-key": keyed["met"], "x-request-id": "rid-403"})
        r404 = c.post("/v1/chat/completions", json=body, headers={"x-api-key": keyed["inf"], "x-request-id": "rid-404"})
        metrics = c.get("/metrics", headers={"x-api-key": keyed["adm"]}).text
    assert (r401.status_code, r403.status_code, r404.status_code) == (401, 403, 404)
    assert r401.headers["x-request-id"] == "rid-401"
    for text in (r401.text, r403.text, r404.text, metrics):
        assert "Canary" not in text and "123-45-6789" not in text and "00417733" not in text
    raw = "".join(f.read_text() for f in (home / "audit").glob("*.jsonl"))
    assert "Canary" not in raw and "123-45-6789" not in raw and "00417733" not in raw
    records = {r["request_id"]: r for r in map(json.loads, raw.splitlines()) if r["event"] == "inference"}
    assert set(records) == {"rid-401", "rid-403", "rid-404"}
    assert records["rid-401"]["key"] is None and records["rid-401"]["status"] == 401
    assert records["rid-403"]["key"] == "met" and records["rid-403"]["status"] == 403
    assert records["rid-404"]["key"] == "inf" and records["rid-404"]["model"] is None
    messages = json.dumps(body["messages"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert records["rid-404"]["prompt_sha256"] == hashlib.sha256(messages.encode()).hexdigest()
    assert records["rid-401"]["client"] == "testclient"


@pytest.mark.parametrize("log_content", [False, True])
def test_prompt_text_is_logged_only_with_log_content(
    home: Path, caplog: pytest.LogCaptureFixture, log_content: bool
) -> None:
    settings = ServerSettings(audit_dir=str(home / "audit"), log_content=log_content)
    caplog.set_level("DEBUG")
    with TestClient(create_app([], settings)) as c:
        resp = c.post("/v1/completions", json={"model": "m", "prompt": CANARY})
    assert resp.status_code == 404 and "123-45-6789" not in resp.text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert ("123-45-6789" in logged) is log_content
