"""``serve --route-prefix``: the OpenAI routes again under a prefix (KServe's /openai/v1/...), same scope and audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from mlserve.engine.fake import FakeEngine
from mlserve.errors import UsageError
from mlserve.security.audit import log_files
from mlserve.security.keys import KeyStore, keys_path
from mlserve.server.app import create_app
from mlserve.server.registry import check_prefix
from mlserve.server.settings import ServerSettings
from mlserve.server.state import ServedModel

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Summarise the visit."}]}


def _app(home: Path, **settings: Any) -> Starlette:
    model = ServedModel("m", "1", "sha256:" + "ab" * 32, FakeEngine("m:1"))
    opts = {"audit_dir": str(home / "audit"), "keys_file": str(keys_path(home)), **settings}
    return create_app([model], ServerSettings(**opts))


def test_prefixed_routes_answer_with_scope_and_audit(home: Path) -> None:
    store = KeyStore(home)
    metrics_key = store.create("scraper", ["metrics"])[1]
    infer = {"Authorization": f"Bearer {store.create('client', ['infer'])[1]}"}
    asgi = _app(home, route_prefix="/openai")
    with TestClient(asgi) as c:
        r = c.post("/openai/v1/chat/completions", json=CHAT, headers=infer)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert r.headers["x-mlserve-model"] == "m:1"
        with c.stream(
            "POST", "/openai/v1/completions", json={"model": "m", "prompt": "x", "stream": True}, headers=infer
        ) as s:
            assert s.status_code == 200 and list(s.iter_lines())[-2] == "data: [DONE]"
        assert [m["id"] for m in c.get("/openai/v1/models", headers=infer).json()["data"]] == ["m", "m:1"]
        assert c.post("/v1/chat/completions", json=CHAT, headers=infer).status_code == 200  # the plain routes stay
        r = c.post("/openai/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {metrics_key}"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"  # OpenAI's shape
        assert c.post("/openai/v1/chat/completions", json=CHAT).status_code == 401
        r = c.post("/openai/v1/chat/completions", json={**CHAT, "model": "other"}, headers=infer)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        prefixed = [s for s in asgi.state.registry.specs() if s.path.startswith("/openai/")]
        plain = {s.path: s for s in asgi.state.registry.specs()}
        assert {s.path for s in prefixed} >= {
            "/openai/v1/models",
            "/openai/v1/chat/completions",
            "/openai/v1/completions",
        }
        for spec in prefixed:
            twin = plain[spec.path.removeprefix("/openai")]
            assert (spec.scope, spec.audited, spec.body) == (twin.scope, twin.audited, twin.body)
    records = [json.loads(line) for f in log_files(home / "audit") for line in f.read_text().splitlines()]
    routes = [(r["route"], r["status"]) for r in records]
    assert routes == [
        ("/openai/v1/chat/completions", 200),
        ("/openai/v1/completions", 200),
        ("/v1/chat/completions", 200),
        ("/openai/v1/chat/completions", 403),
        ("/openai/v1/chat/completions", 401),
        ("/openai/v1/chat/completions", 404),
    ]


def test_no_prefix_no_routes(home: Path) -> None:
    with TestClient(_app(home)) as c:
        assert c.post("/openai/v1/chat/completions", json=CHAT).status_code == 404


def test_check_prefix() -> None:
    assert check_prefix("/openai") == "/openai" and check_prefix("/openai/") == "/openai"
    assert check_prefix("/a/b.c") == "/a/b.c"
    for bad in ("openai", "/", "", "/a b", "/{x}", "/a//b"):
        with pytest.raises(UsageError):
            check_prefix(bad)


def test_serve_refuses_a_bad_prefix(cli: Any) -> None:
    res = cli("serve", "anything", "--route-prefix", "openai")
    assert res.exit_code == 2 and "route prefix" in res.stderr
