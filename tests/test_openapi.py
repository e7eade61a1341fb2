"""/openapi.json: generated from every registered surface, open to fetch, and the routes fuzzed from it (no 5xx)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from pydantic import BaseModel, ConfigDict
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.testclient import TestClient

from mlserve.engine.fake import FakeEngine, FakeScript
from mlserve.security.keys import KeyStore, keys_path
from mlserve.server import openapi
from mlserve.server.app import create_app
from mlserve.server.errors import Outcome
from mlserve.server.registry import Registry, RouteSpec, Surface
from mlserve.server.settings import ServerSettings
from mlserve.server.state import ServedModel
from mlserve.server.surfaces import FALLBACK, SURFACES, surfaces_for

PREDICT = "/v1/endpoints/1/deployedModels/2:predict"
FULL = {
    "route_prefix": "/openai",
    "vertex_predict_route": PREDICT,
    "vertex_health_route": "/v1/endpoints/1/deployedModels/2",
}


def _app(**settings: Any) -> Starlette:
    # Many sequences at once: a fuzzed Vertex request of 32 instances is not "overloaded" here.
    engine = FakeEngine("m:1", FakeScript(max_active=1000))
    return create_app([ServedModel("m", "1", "sha256:" + "ab" * 32, engine)], ServerSettings(**settings))


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_document_covers_every_declared_route() -> None:
    asgi = _app(**FULL)
    with TestClient(asgi) as client:
        r = client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"] == "3.1.0" and doc["info"]["title"] == "mlserve"
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema
    declared = {
        (s.path.replace("{name:path}", "{name}"), m.lower()) for s in asgi.state.registry.specs() for m in s.methods
    }
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == declared
    assert {"/openai/v1/chat/completions", PREDICT, "/openapi.json"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for spec in asgi.state.registry.specs():
        op = doc["paths"][spec.path.replace("{name:path}", "{name}")][spec.methods[0].lower()]
        assert ("requestBody" in op) == (spec.body is not None), spec.path
        assert op["security"] == ([] if spec.scope == "open" else [{"bearer": []}, {"apiKey": []}])
        if spec.audited:
            assert spec.body is not None, f"{spec.path}: an inference route must declare its request schema"
            assert {"200", "400", "401", "403", "404", "413", "429", "503", "504"} <= set(op["responses"])
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/openai.ChatRequest"
    }
    assert (
        "messages" in schemas["openai.ChatRequest"]["required"]
        and "text/event-stream" in chat["responses"]["200"]["content"]
    )
    # Each error example is what that surface's own renderer sends.
    vertex_404 = doc["paths"][PREDICT]["post"]["responses"]["404"]["content"]["application/json"]["example"]
    assert vertex_404["error"]["status"] == "NOT_FOUND" and vertex_404["error"]["code"] == 404
    openai_404 = chat["responses"]["404"]["content"]["application/json"]["example"]
    assert openai_404["error"]["code"] == "model_not_found"


class _EchoBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    word: str


async def _echo(request: Request) -> Response:
    """Echo a word."""
    return JSONResponse({})


def test_a_new_surface_is_documented_without_touching_openapi() -> None:
    def render(outcome: Outcome) -> Response:
        return JSONResponse({"oops": outcome.message}, status_code=outcome.status)

    extra = Surface("echo", (RouteSpec("/echo/{name:path}", _echo, ("POST",), "infer", True, _EchoBody),), render)
    doc = openapi.document(Registry((*SURFACES, extra), FALLBACK))
    op = doc["paths"]["/echo/{name}"]["post"]
    assert op["summary"] == "Echo a word." and op["tags"] == ["echo"]
    assert op["parameters"] == [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    assert doc["components"]["schemas"]["echo._EchoBody"]["required"] == ["word"]
    assert op["responses"]["400"]["content"]["application/json"]["example"] == {
        "oops": "Invalid request: 'messages' Field required."
    }


def test_openapi_json_needs_no_key(home: Path) -> None:
    KeyStore(home).create("client", ["infer"])
    asgi = create_app(
        [ServedModel("m", "1", "sha256:" + "ab" * 32, FakeEngine("m:1"))],
        ServerSettings(keys_file=str(keys_path(home))),
    )
    with TestClient(asgi) as client:
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/v1/models").status_code == 401


# -- fuzzing ---------------------------------------------------------------------------
# Bounded so the whole run takes well under a minute of CPU: examples per operation and per mode.
MAX_EXAMPLES = 25
FUZZ_SETTINGS = ServerSettings(**FULL)  # type: ignore[arg-type]
# The document the fuzzer reads, built at collection like /openapi.json builds it (checked equal below).
FUZZ_DOC = openapi.document(Registry(surfaces_for(FUZZ_SETTINGS), FALLBACK, [("/openai", "openai")]))
# The POST routes: every inference route of every surface (and the admin refusals beside them).
schema = schemathesis.openapi.from_dict(FUZZ_DOC).include(method="POST")
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES, deterministic=True
)


@pytest.fixture(scope="module")
def fuzz_app() -> Starlette:
    """One app for every fuzzed operation; schemathesis runs its lifespan (the fake engine loads at once)."""
    with TestClient(_app(**FULL)) as client:  # another app of the same settings serves the same document
        assert client.get("/openapi.json").json() == FUZZ_DOC
    return _app(**FULL)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=5000, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_5xx(case: schemathesis.Case, fuzz_app: Starlette) -> None:
    case.call_and_validate(checks=[not_a_server_error], app=fuzz_app)
