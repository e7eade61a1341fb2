"""``mlserve audit verify [FILE]``: check the log's hash chain; ``audit replay``: re-run a deterministic record."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import httpx
import typer

from mlserve.bench.local_server import LocalServer
from mlserve.bundles.store import Store
from mlserve.cli.app import app
from mlserve.cli.console import emit_json, info
from mlserve.errors import CheckFailed, InvalidInputError, MlserveError, NotFoundError, UsageError
from mlserve.security import audit
from mlserve.server.auditing import prompt_sha256

audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# The record's sampling fields a request sends back as they are (seed only when it was set).
SAMPLING: tuple[str, ...] = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty")
SAMPLING += ("frequency_penalty", "presence_penalty")


@audit_app.command()
def verify(
    file: Optional[Path] = typer.Argument(None, help="One day file; the whole log from its start when left out."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Exit 1 naming the first record that was edited, removed or reordered; 0 when intact."""
    if file is not None and not file.is_file():
        raise NotFoundError(f"No audit file {file}.", f"Audit files are in {audit.audit_dir()}.")
    result = audit.verify(file)
    if as_json:
        emit_json(
            {
                "ok": result.ok,
                "files": result.files,
                "records": result.records,
                "last_hash": result.last_hash if result.ok else None,
                "file": result.file,
                "line": result.line,
                "reason": result.reason,
            }
        )
    if not result.ok:
        raise CheckFailed(
            f"Audit record {result.file}:{result.line} is bad: {result.reason}.",
            "Treat the log as tampered with; keep a copy for investigation.",
        )
    if not as_json:
        info(f"ok: {result.records} record(s) in {len(result.files)} file(s) form an intact chain")


@audit_app.command()
def replay(
    record_id: str = typer.Argument(..., help="The record's request id, or its hash (12+ hex digits)."),
    prompt_file: Path = typer.Option(
        ..., "--prompt-file", help="The prompt as the client sent it: a JSON messages array (chat), or the raw text."
    ),
    url: Optional[str] = typer.Option(
        None, "--url", help="A running server that serves the record's bundle (default: start one from the store)."
    ),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MLSERVE_API_KEY", help="Bearer key."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Re-run a deterministic request on the same bundle digest: exit 0 when the output's sha256 matches, 1 if not.

    The prompt file must hash to the record's prompt_sha256, the record must be a completed
    deterministic request, and the bundle must still be in the store (or served at --url).
    """
    record = find_record(record_id)
    route = _replayable(record)
    payload = _prompt_payload(route, prompt_file, record["prompt_sha256"])
    digest = str(record["digest"])
    try:
        bundle = Store().resolve(digest)
    except NotFoundError:
        if url is None:
            raise NotFoundError(
                f"The store no longer holds bundle {digest} that served record {record['hash'][:12]}.",
                "Import that bundle again (mlserve import FILE.tar), or pass --url of a server that serves it.",
            ) from None
        bundle = None
    if bundle is not None:
        _check_stops(record, len(bundle.manifest.get("serving", {}).get("stop", [])))
    if url is not None:
        base = url.rstrip("/")
        text = _replay(base, route, _model_at(base, digest, api_key), payload, record, api_key)
    else:
        assert bundle is not None
        info(f"starting `mlserve serve {bundle.ref}` on a free loopback port")
        with LocalServer(bundle.ref, []) as server:
            text = _replay(server.url, route, bundle.ref, payload, record, api_key)
    actual = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    expected = record["output_sha256"]
    result = {
        "record": record["hash"],
        "request_id": record.get("request_id"),
        "digest": digest,
        "route": route,
        "expected_output_sha256": expected,
        "output_sha256": actual,
        "match": actual == expected,
    }
    if as_json:
        emit_json(result)
    if actual != expected:
        raise CheckFailed(
            f"The replayed output differs: the record holds sha256 {expected}, the replay gave {actual}.",
            "Same bundle and prompt, different bytes: check the llama.cpp build and the machine it ran on.",
        )
    if not as_json:
        info(f"match: the replay of record {record['hash'][:12]} gave the recorded output (sha256 {actual})")


def find_record(record_id: str) -> dict[str, Any]:
    """The inference record with this request id, or whose hash starts with ``record_id`` (12+ hex digits)."""
    by_hash = len(record_id) >= 12 and all(c in "0123456789abcdef" for c in record_id.lower())
    found: list[dict[str, Any]] = []
    for path in audit.log_files(audit.audit_dir()):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if record_id not in line:  # cheap: skip the JSON parse of every other record
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("event") != "inference":
                    continue
                if rec.get("request_id") == record_id or (by_hash and str(rec.get("hash", "")).startswith(record_id)):
                    found.append(rec)
    if not found:
        raise NotFoundError(f"No inference record {record_id!r} in {audit.audit_dir()}.", "Give a request id or hash.")
    if len(found) > 1:
        raise UsageError(
            f"{len(found)} inference records match {record_id!r}.", "Give the record's hash (its 'hash' field) instead."
        )
    return found[0]


def _replayable(record: dict[str, Any]) -> str:
    """The record's route, once it is known to be a completed deterministic request that can be re-run."""
    rid = record["hash"][:12]
    route = str(record.get("route") or "")
    kind = next((r for r in (CHAT, COMPLETIONS) if route.endswith(r)), None)
    if kind is None:
        raise UsageError(f"Record {rid} is for {route}; replay re-runs {CHAT} and {COMPLETIONS} records.")
    if record.get("status") != 200 or not record.get("output_sha256"):
        raise UsageError(
            f"Record {rid} did not complete (status {record.get('status')}), so it has no output to match."
        )
    if not record.get("deterministic"):
        raise UsageError(
            f"Record {rid} was not decoded deterministically: its bytes may depend on what else the server ran.",
            'Only requests sent with "mlserve": {"deterministic": true} can be replayed.',
        )
    if record.get("constrained"):
        raise UsageError(
            f"Record {rid} was constrained by a response_format schema, which the audit log does not keep, "
            "so it cannot be re-run as sent."
        )
    sampling = record.get("sampling") or {}
    if not record.get("digest") or not record.get("prompt_sha256") or not isinstance(sampling, dict):
        raise UsageError(f"Record {rid} lacks its digest, prompt hash or sampling.")
    if sampling.get("temperature", 0) > 0 and sampling.get("seed") is None:
        raise UsageError(f"Record {rid} was sampled without a seed, so no re-run can give the same bytes.")
    return kind


def _prompt_payload(route: str, path: Path, want: str) -> dict[str, Any]:
    """The request's prompt field from the file, once it hashes as the server hashed the prompt it received."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path} is not UTF-8 text.") from None
    candidates: list[tuple[str, Any, Any]] = []  # (field, value sent, value hashed)
    if route == CHAT:
        from mlserve.server.surfaces.openai_schemas import ChatRequest

        try:
            value = json.loads(text)
            messages = value["messages"] if isinstance(value, dict) else value
            chat = ChatRequest.model_validate({"model": "m", "messages": messages})
        except (ValueError, KeyError, TypeError):
            raise InvalidInputError(f"{path} is not a JSON array of chat messages.") from None
        candidates.append(("messages", messages, chat.template_messages()))
    else:
        candidates.append(("prompt", text, text))
        try:
            ids = json.loads(text)
            if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids):
                candidates.append(("prompt", ids, ids))
        except ValueError:
            pass
    for field, sent, hashed in candidates:
        if prompt_sha256(hashed) == want:
            return {field: sent}
    got = prompt_sha256(candidates[0][2])
    raise InvalidInputError(
        f"{path} does not hold the recorded prompt: its sha256 is {got}, the record's is {want}.",
        "Give the prompt exactly as the client sent it (the messages array, or the raw prompt text).",
    )


def _check_stops(record: dict[str, Any], model_stops: int) -> None:
    """Refuse a record whose client sent stop strings: the log counts them, never keeps them."""
    count = int((record.get("sampling") or {}).get("stop_count") or 0)
    if count > model_stops:
        raise UsageError(
            f"Record {record['hash'][:12]} used {count - model_stops} stop string(s) of the client's own, "
            "which the audit log does not keep, so it cannot be re-run as sent."
        )


def _model_at(base: str, digest: str, api_key: str | None) -> str:
    """The model id under which the server at ``base`` serves the bundle ``digest``."""
    from mlserve.bench.client import list_models

    models = asyncio.run(list_models(base, api_key))
    ids = [str(m["id"]) for m in models if m.get("digest") == digest]
    if not ids:
        raise NotFoundError(f"{base} does not serve bundle {digest}.", "Serve that bundle, or leave --url out.")
    return max(ids, key=lambda i: ":" in i)  # NAME:VERSION pins the version that served the record


def _replay(base: str, route: str, model: str, payload: dict[str, Any], record: dict[str, Any], key: str | None) -> str:
    """Send the request again, decoded alone, with the record's sampling; the output text."""
    sampling = record["sampling"]
    body: dict[str, Any] = {"model": model, **payload, "stream": False, "mlserve": {"deterministic": True}}
    body.update({k: sampling[k] for k in SAMPLING if sampling.get(k) is not None})
    if sampling.get("seed") is not None:
        body["seed"] = sampling["seed"]
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.post(base + route, json=body, headers=headers, timeout=httpx.Timeout(900.0, connect=30.0))
    except httpx.HTTPError as exc:
        raise MlserveError(f"Cannot reach {base}: {type(exc).__name__} {exc}.") from None
    if resp.status_code != 200:
        raise MlserveError(f"The replay request was refused: HTTP {resp.status_code} {resp.text[:300]}")
    choice = resp.json()["choices"][0]
    return str(choice["message"]["content"] if route == CHAT else choice["text"])
