"""Structured output: a JSON Schema is enforced by llama.cpp's grammar sampler, or refused with 400.

Three levels: ``check_schema`` accepts what the grammar enforces and names what it refuses; the
grammar's output validates for every accepted keyword on the tiny random-weight GGUF (a random
model is the harshest sampler: it tries every token the grammar lets through); and through the
real server, the openai client and Gemma 3 270M, 20 generations at temperature 1.0 all validate.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import math
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import jsonschema
import numpy as np
import pytest
from llama_cpp import llama_grammar
from starlette.testclient import TestClient

from mlserve.engine.api import InvalidRequest, Sampling
from mlserve.engine.fake import FakeEngine
from mlserve.engine.llama import grammar as grammar_module
from mlserve.engine.llama.grammar import schema_to_gbnf
from mlserve.engine.llama.model import LlamaModel
from mlserve.engine.schema import MAX_REPEAT, check_schema
from mlserve.security.audit import log_files
from mlserve.server.app import create_app
from mlserve.server.settings import ServerSettings
from mlserve.server.state import ServedModel
from tests.support.servers import start_server

# -- what check_schema refuses, naming the keyword -------------------------------------------
OBJ = {"type": "object", "properties": {"a": {"type": "string"}}}
REFUSED = [
    ({"type": "string", "pattern": "^[A-Z]{3}$"}, "pattern"),
    ({"type": "string", "format": "email"}, "format"),
    ({"type": "string", "format": "date", "maxLength": 10}, "maxLength"),
    ({"type": "integer", "minimum": 0}, "minimum"),
    ({"type": "integer", "maximum": 9}, "maximum"),
    ({"type": "number", "exclusiveMinimum": 0}, "exclusiveMinimum"),
    ({"type": "number", "exclusiveMaximum": 0}, "exclusiveMaximum"),
    ({"type": "integer", "multipleOf": 5}, "multipleOf"),
    ({**OBJ, "minProperties": 1}, "minProperties"),
    ({**OBJ, "maxProperties": 1}, "maxProperties"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
    ({**OBJ, "additionalProperties": True}, "additionalProperties"),
    ({**OBJ, "additionalProperties": {"type": "integer"}}, "additionalProperties"),
    ({**OBJ, "required": ["b"]}, "required"),
    ({**OBJ, "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({**OBJ, "dependentSchemas": {"a": {}}}, "dependentSchemas"),
    ({**OBJ, "unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "minItems": 2}, "minItems"),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "string"}}, "prefixItems"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": MAX_REPEAT + 1}, "maxItems"),
    ({"type": "string", "maxLength": 5, "minLength": 6}, "maxLength"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if"),
    ({"type": "object", "anyOf": [OBJ, {"type": "object"}]}, "type"),
    ({"anyOf": [OBJ], "oneOf": [OBJ]}, "anyOf"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
    ({"oneOf": [{"type": "string"}, {"enum": ["a", 1]}]}, "oneOf"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
    ({"allOf": [OBJ, OBJ]}, "allOf"),
    ({"$ref": "https://example.org/schema.json"}, "$ref"),
    ({"$ref": "#/$defs/missing"}, "$ref"),
    ({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}, "$ref"),
    ({"$ref": "#/$defs/a", "maxLength": 3, "$defs": {"a": {"type": "string"}}}, "maxLength"),
    ({"$dynamicRef": "#node"}, "$dynamicRef"),
    ({"type": "string", "nullable": True}, "nullable"),
    ({"enum": ["a", 1], "type": "string"}, "enum"),
    ({"const": 1.5, "type": "integer"}, "const"),
    ({"type": "char"}, "type"),
    ({"type": "object", "properties": {"a": False}}, "type"),
    ({"type": "string", "contentMediaType": "text/html"}, "contentMediaType"),
]


@pytest.mark.parametrize(("schema", "keyword"), REFUSED, ids=[k + "-" + str(i) for i, (_, k) in enumerate(REFUSED)])
def test_unenforceable_keywords_are_refused_by_name(schema: dict[str, Any], keyword: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_schema(schema)
    assert f"'{keyword}'" in info.value.message, info.value.message


def test_refusals_never_echo_client_names() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_schema({"type": "object", "properties": {"Jane Roe MRN 4471": {"type": "string", "pattern": "^x$"}}})
    assert "'pattern'" in info.value.message and "Jane" not in info.value.message
    with pytest.raises(InvalidRequest) as info:
        check_schema({"type": "string", "secretKeywordJaneRoe": 1})
    assert "does not know" in info.value.message and "Jane" not in info.value.message


def test_sizes_are_bounded() -> None:
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    with pytest.raises(InvalidRequest, match="too large"):
        check_schema(wide)
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(200):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidRequest, match="too large or too deep"):
        check_schema(deep)
    # $refs that double at each level would inline to 2**40 nodes: the budget stops it early
    defs = {f"d{i}": {"type": "array", "prefixItems": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(40)}
    defs["d40"] = {"type": "integer"}
    with pytest.raises(InvalidRequest, match="too large"):
        check_schema({"$defs": defs, "$ref": "#/$defs/d0"})


# -- what the grammar produces, on the tiny random model --------------------------------------
BOUNDED = {"type": "string", "maxLength": 6}
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    (
        "object-required-nested-enum",
        {
            "type": "object",
            "properties": {
                "severity": {"enum": ["low", "high", 'q"uote', "back\\slash", "new\nline", "caf\u00e9", "\U0001f600"]},
                "age": {"type": "integer"},
                "ok": {"type": "boolean"},
                "vitals": {
                    "type": "object",
                    "properties": {"hr": {"type": "number"}, "note": BOUNDED},
                    "required": ["hr"],
                    "additionalProperties": False,
                },
                "nothing": {"type": "null"},
            },
            "required": ["severity", "age", "vitals"],
        },
    ),
    ("strings-lengths", {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 4}, "maxItems": 4}),
    ("tuple", {"type": "array", "prefixItems": [{"const": "x\\y"}, {"type": "boolean"}, BOUNDED], "items": False}),
    ("items-min-max", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}),
    ("formats", {"type": "array", "prefixItems": [{"type": "string", "format": f} for f in ("date", "uuid")]}),
    ("date-time", {"type": "string", "format": "date-time"}),
    ("time", {"type": "string", "format": "time"}),
    ("anyOf-typelist", {"anyOf": [{"type": ["integer", "null"]}, {"type": ["boolean", "string"], "maxLength": 3}]}),
    (
        "oneOf-tagged",
        {
            "oneOf": [
                {**_o, "required": ["kind"]}
                for _o in (
                    {"type": "object", "properties": {"kind": {"const": "a"}, "n": {"type": "integer"}}},
                    {"type": "object", "properties": {"kind": {"const": "b"}, "s": BOUNDED}},
                )
            ]
        },
    ),
    (
        "ref-inlined",
        {
            "$defs": {"Dose": {"type": "object", "properties": {"mg": {"type": "number"}}, "required": ["mg"]}},
            "type": "object",
            "properties": {"first": {"$ref": "#/$defs/Dose"}, "second": {"$ref": "#/$defs/Dose", "description": "x"}},
            "required": ["first", "second"],
        },
    ),
    (
        "allOf-merged",
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}},
            ]
        },
    ),
    # Rule names the converter derives from property names must not capture its built-in rules.
    (
        "rule-name-collisions",
        {
            "type": "object",
            "properties": {"decimal part": BOUNDED, "space": {"type": "number"}, "char": BOUNDED, "date": BOUNDED},
            "required": ["decimal part", "space", "char", "date"],
        },
    ),
    ("additional-only", {"type": "object", "additionalProperties": {"type": "integer"}}),
    ("json-object", {"type": "object"}),
]


def _formats() -> jsonschema.FormatChecker:
    """jsonschema's date and uuid checks, and RFC 3339 date-time and time (its own need rfc3339-validator)."""
    checker = jsonschema.FormatChecker(["date", "uuid"])

    def rfc3339(text: object) -> bool:
        assert isinstance(text, str) and re.search(r"(Z|[+-]\d\d:\d\d)$", text), text  # an offset is required
        return bool(dt.datetime.fromisoformat(text))

    checker.checks("date-time", raises=(ValueError, AssertionError))(rfc3339)
    checker.checks("time", raises=(ValueError, AssertionError))(lambda text: rfc3339("1970-01-01T" + str(text)))
    return checker


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf: Path) -> Iterator[LlamaModel]:
    model = LlamaModel(tiny_gguf, n_ctx_seq=2048, n_seq=1, n_threads=1)
    yield model
    model.close()


def _generate(model: LlamaModel, grammar: str, seed: int, max_tokens: int = 400) -> tuple[bytes, bool]:
    """Sample under the grammar at temperature 1.0 until EOS (True) or max_tokens (False)."""
    sampler = model.new_sampler(Sampling(max_tokens=max_tokens, temperature=1.0, top_k=40, seed=seed, grammar=grammar))
    try:
        prompt = model.tokenize("JSON:")
        model.clear_seq(0)
        model.decode(prompt, list(range(len(prompt))), [0] * len(prompt), [False] * (len(prompt) - 1) + [True])
        index, pos, out = len(prompt) - 1, len(prompt), b""
        for _ in range(max_tokens):
            token = model.sample(sampler, index)
            if model.is_eog(token):
                return out, True
            out += model.piece(token)
            model.decode([token], [pos], [0], [True])
            index, pos = 0, pos + 1
        return out, False
    finally:
        model.free_sampler(sampler)


@pytest.mark.parametrize(("name", "schema"), ACCEPTED, ids=[n for n, _ in ACCEPTED])
def test_grammar_output_always_validates(tiny_model: LlamaModel, name: str, schema: dict[str, Any]) -> None:
    grammar = schema_to_gbnf(check_schema(schema))
    tiny_model.check_grammar(grammar)
    checker = jsonschema.Draft202012Validator(schema, format_checker=_formats())
    complete = 0
    for seed in range(12):
        raw, done = _generate(tiny_model, grammar, seed)
        if not done:
            continue
        complete += 1
        value = json.loads(raw.decode("utf-8"))  # strict: raw control characters would fail here
        errors = [e.message for e in checker.iter_errors(value)]
        assert not errors, (raw, errors)
    assert complete >= 6, f"only {complete} of 12 generations finished"


def test_every_enum_literal_round_trips(tiny_model: LlamaModel) -> None:
    values = ['q"uote', "back\\slash", "new\nline", "tab\there", "caf\u00e9", "\U0001f600", "\u0000"]
    for value in values:
        raw, done = _generate(tiny_model, schema_to_gbnf(check_schema({"const": value})), 0)
        assert done and json.loads(raw) == value, raw


def test_the_unrepaired_converter_would_emit_invalid_json(tiny_model: LlamaModel) -> None:
    """Why grammar.py repairs llama-cpp-python's converter: its literal for "a\\nb" forces a raw newline."""
    upstream = llama_grammar.json_schema_to_gbnf(json.dumps({"const": "a\nb"}))
    raw, done = _generate(tiny_model, upstream, 0)
    assert done and raw == b'"a\nb"'  # a raw newline inside a JSON string
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)


def test_dates_are_real_calendar_days(tiny_model: LlamaModel) -> None:
    grammar = schema_to_gbnf(check_schema({"type": "string", "format": "date"}))
    for seed in range(30):
        raw, done = _generate(tiny_model, grammar, seed)
        assert done
        dt.date.fromisoformat(json.loads(raw))  # raises on 2023-02-30 or 2023-04-31


# -- the OpenAI surface on the fake engine -----------------------------------------------------
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Summarise as JSON."}]}
SCHEMA = {"type": "object", "properties": {"severity": {"enum": ["low", "high"]}}, "required": ["severity"]}


@pytest.fixture
def fake(home: Path) -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine("m:1")
    model = ServedModel("m", "1", "sha256:" + "ab" * 32, engine)
    with TestClient(create_app([model], ServerSettings(audit_dir=str(home / "audit")))) as client:
        yield client, engine


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_response_format_reaches_the_engine_as_a_grammar(fake: tuple[TestClient, FakeEngine], route: str) -> None:
    client, engine = fake
    base = CHAT if route.endswith("chat/completions") else {"model": "m", "prompt": "Summarise as JSON."}
    formats = {
        "json_schema": {"type": "json_schema", "json_schema": {"name": "triage", "schema": SCHEMA, "strict": True}},
        "json_object": {"type": "json_object"},
        "text": {"type": "text"},
    }
    for kind, fmt in formats.items():
        r = client.post(route, json={**base, "response_format": fmt})
        assert r.status_code == 200, r.text
        grammar = engine.requests[-1].sampling.grammar
        expected = {"json_schema": check_schema(SCHEMA), "json_object": {"type": "object"}, "text": None}[kind]
        assert grammar == (None if expected is None else "fake-grammar " + json.dumps(expected, sort_keys=True))


def test_unenforceable_schema_is_400_before_any_generation(home: Path, fake: tuple[TestClient, FakeEngine]) -> None:
    client, engine = fake
    schema = {"type": "object", "properties": {"mrn": {"type": "string", "pattern": "^[0-9]{6}$"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "patient", "schema": schema}}
    r = client.post("/v1/chat/completions", json={**CHAT, "response_format": fmt, "stream": True})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "'pattern'" in error["message"]
    assert engine.requests == []
    client.__exit__(None, None, None)
    records = [json.loads(line) for f in log_files(home / "audit") for line in f.read_text().splitlines()]
    assert [(r["route"], r["status"]) for r in records] == [("/v1/chat/completions", 400)]


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema"},
        {"type": "json_object", "json_schema": {"name": "x", "schema": {}}},
        {"type": "xml"},
        {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}},
    ],
)
def test_malformed_response_format_is_400(fake: tuple[TestClient, FakeEngine], fmt: dict[str, Any]) -> None:
    client, engine = fake
    r = client.post("/v1/chat/completions", json={**CHAT, "response_format": fmt})
    assert r.status_code == 400, r.text
    assert "response_format" in r.json()["error"]["message"]
    assert engine.requests == []


# -- the real model through the server, with the openai client --------------------------------
TRIAGE = {
    "type": "object",
    "properties": {
        "patient": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "age": {"type": "integer"},
                "sex": {"enum": ["female", "male", "unknown"]},
            },
            "required": ["name", "age", "sex"],
            "additionalProperties": False,
        },
        "severity": {"enum": ["low", "moderate", "high", "critical"]},
        "vitals": {
            "type": "object",
            "properties": {"heart_rate": {"type": "integer"}, "temperature_c": {"type": "number"}},
            "required": ["heart_rate", "temperature_c"],
            "additionalProperties": False,
        },
        "admit": {"type": "boolean"},
        "complaints": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 3},
    },
    "required": ["patient", "severity", "vitals", "admit", "complaints"],
    "additionalProperties": False,
}


@pytest.mark.model
def test_gemma_20_concurrent_generations_at_temperature_1_all_validate(gemma_home: Path) -> None:
    import openai

    note = (
        "Maria Lopez, 67, came in with chest pain and shortness of breath since this morning. "
        "Heart rate 112, temperature 38.2 C. She looks unwell."
    )
    messages = [{"role": "user", "content": f"Triage this patient as JSON.\n\n{note}"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "triage", "schema": TRIAGE, "strict": True}}
    validator = jsonschema.Draft202012Validator(TRIAGE)
    with start_server(gemma_home, "--parallel", "20", "--ctx-size", "512", "--request-timeout", "1800") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=1800)

        def one(seed: int) -> Any:
            return client.chat.completions.create(
                model="gemma3-270m",
                messages=messages,  # type: ignore[arg-type]
                response_format=fmt,  # type: ignore[arg-type]
                temperature=1.0,
                seed=seed,
                max_tokens=200,
            )

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(one, range(20)))
    texts = [a.choices[0].message.content for a in answers]
    assert [a.choices[0].finish_reason for a in answers] == ["stop"] * 20, texts
    for text in texts:
        value = json.loads(text)
        assert not [e.message for e in validator.iter_errors(value)], text
    assert len(set(texts)) > 1  # temperature 1.0 really sampled


def test_common_pydantic_schemas_are_enforceable(tiny_model: LlamaModel) -> None:
    """What LangChain's with_structured_output and openai's parse() send: $defs, anyOf-null, enums, dates."""
    import datetime as _dt
    import enum
    import uuid

    from pydantic import BaseModel, Field

    class Severity(str, enum.Enum):
        low = "low"
        high = "high"

    class Dose(BaseModel):
        drug: str = Field(max_length=12, description="generic name")
        mg: float

    class Note(BaseModel):
        severity: Severity
        seen: _dt.date
        visit: uuid.UUID
        doses: list[Dose] = Field(max_length=2)
        follow_up: int | None = None
        kind: Literal["triage"] = "triage"
        tags: dict[str, bool] = Field(default_factory=dict)

    schema = Note.model_json_schema()
    grammar = schema_to_gbnf(check_schema(schema))
    tiny_model.check_grammar(grammar)
    complete = 0
    for seed in range(6):
        raw, done = _generate(tiny_model, grammar, seed, max_tokens=600)
        if done:
            complete += 1
            Note.model_validate_json(raw)
    assert complete >= 2


@pytest.mark.parametrize(("temperature", "top_k", "min_p"), [(1.0, 40, 0.0), (1.0, 40, 0.05), (0.0, 40, 0.0)])
def test_the_fast_search_sees_exactly_what_masking_everything_would(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch, temperature: float, top_k: int, min_p: float
) -> None:
    """Random logits at each step of a walk through a grammar: the chain gets the same candidates either way."""
    monkeypatch.setattr(grammar_module, "SPLIT", 16)  # the tiny vocabulary then uses the second-byte index too
    _walk(tiny_gguf, Sampling(max_tokens=99, temperature=temperature, top_k=top_k, min_p=min_p), 80)


@pytest.mark.model
def test_the_fast_search_is_exact_on_gemmas_vocabulary(gemma_path: Path) -> None:
    """The same on 262,144 tokens, where " " opens half the vocabulary and the second-byte index matters."""
    _walk(gemma_path, Sampling(max_tokens=99, temperature=1.0, top_k=64, min_p=0.0), 25)


def _walk(path: Path, sampling: Sampling, steps: int) -> None:
    model = LlamaModel(path, n_ctx_seq=64, n_seq=1, n_threads=1)
    schema = {
        "type": "object",
        "properties": {"age": {"type": "integer"}, "name": BOUNDED, "when": {"type": "string", "format": "date"}},
        "required": ["age", "name", "when"],
    }
    chain = model.new_sampler(replace(sampling, grammar=_grammar(schema)))
    assert model.grammar_index().seconds
    rng = np.random.default_rng(7)
    keep = 1 if sampling.temperature == 0 else sampling.top_k
    cut = math.log(sampling.min_p) if sampling.min_p else -math.inf
    try:
        for _ in range(steps):
            values = rng.normal(0, 4, model.n_vocab).astype(np.float32)
            fast = chain._best_legal(values)[:keep]
            whole = chain._legal(grammar_module._candidates(np.arange(model.n_vocab, dtype=np.int32), values))
            whole = whole[np.argsort(-whole["logit"], kind="stable")][:keep]
            assert len(whole), "the walk reached a state with no legal token"
            best = whole["logit"][0]
            assert [int(t) for t, v in zip(fast["id"], fast["logit"], strict=True) if v >= best + cut] == [
                int(t) for t, v in zip(whole["id"], whole["logit"], strict=True) if v >= best + cut
            ]
            token = int(whole["id"][rng.integers(len(whole))])
            if model.is_eog(token):
                break
            chain.accept(token)
    finally:
        model.free_sampler(chain)
        model.close()


def _grammar(schema: dict[str, Any]) -> str:
    return schema_to_gbnf(check_schema(schema))
