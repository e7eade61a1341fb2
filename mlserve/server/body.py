"""Request bodies: read under a size limit, parsed and validated off the event loop, errors without PHI."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from mlserve.server.errors import BadBody, BodyTooLarge

M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; BodyTooLarge past ``limit`` bytes, BadBody when it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"The request body is larger than the {limit}-byte limit.")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"The request body is larger than the {limit}-byte limit.")
        chunks.append(chunk)
    # A 4 MiB body takes milliseconds to parse: off the loop, so health probes never wait on it.
    return await asyncio.to_thread(_parse, b"".join(chunks))


def _parse(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except RecursionError:  # [[[[... nested deeper than Python's stack: bad input, not a crash
        raise BadBody("The request body is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError):
        raise BadBody("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BadBody("The request body must be a JSON object.")
    return body


async def validate(schema: type[M], body: dict[str, Any]) -> M:
    """``body`` as ``schema``, validated off the loop; BadBody names the bad fields, never their values."""
    return await asyncio.to_thread(_validate, schema, body)


def _validate(schema: type[M], body: dict[str, Any]) -> M:
    try:
        return schema.model_validate(body)
    except RecursionError:
        raise BadBody("The request body is nested too deeply.") from None
    except ValidationError as exc:
        raise BadBody(describe_validation(exc, _known_fields(schema))) from None


def _known_fields(schema: type[BaseModel]) -> frozenset[str]:
    """Field names of a schema and of every model nested in it (safe to echo: they are ours)."""
    names: set[str] = set()
    todo: list[Any] = [schema]
    seen: set[Any] = set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(name)
            if info.alias:
                names.add(info.alias)
            todo.extend(_models_in(info.annotation))
    return frozenset(names)


def _models_in(annotation: Any) -> list[Any]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def describe_validation(exc: ValidationError, known: frozenset[str]) -> str:
    """A message naming the bad fields, never echoing client text (values or unknown keys may hold PHI)."""
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(p) if isinstance(p, int) or p in known else "<key>" for p in err["loc"]]
        where = ".".join(loc) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            # An option we cannot honour is refused, not ignored; its name is not echoed unless it is ours.
            parts.append(f"'{where}' is not a supported field" if where != "<key>" else "a field is not supported")
            continue
        if err["type"] == "literal_error":
            msg = "has an unsupported value " + msg.removeprefix("Input should be").strip().join(("(expected ", ")"))
        elif "input" in err and isinstance(err["input"], str) and err["input"] and err["input"] in msg:
            msg = msg.replace(err["input"], "<value>")  # pydantic quotes some inputs in its messages
        parts.append(f"'{where}' {msg}")
    return "Invalid request: " + "; ".join(parts) + "."
