"""Security end to end on the real Gemma model: keys, scopes, revocation, rate limits, audit, no PHI anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlserve.security.keys import KeyStore
from tests.conftest import run_mlserve
from tests.support.servers import ServerProcess, start_server

pytestmark = pytest.mark.model

CANARIES = ("Jane Canary-Doe", "MRN 00417733", "123-45-6789")
CANARY = " ".join(CANARIES)
KEYS = {"canary": ["infer"], "fields": ["infer"], "limited": ["infer"], "temp": ["infer"], "adm": ["admin"]}
KEYS |= {"met": ["metrics"], "probe": ["infer"]}


class Secure:
    def __init__(self, server: ServerProcess, home: Path, keys: dict[str, str]) -> None:
        self.server, self.home, self.keys = server, home, keys

    def h(self, key: str, rid: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.keys[key]}"}
        return headers | ({"x-request-id": rid} if rid else {})

    def audit_records(self) -> list[dict[str, object]]:
        files = sorted((self.home / "audit").glob("*.jsonl"))
        return [json.loads(line) for f in files for line in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def sec(gemma_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    # Its own home (hard links: no copy of the model) so the keys here never reach other servers.
    home = tmp_path_factory.mktemp("secure") / "home"
    shutil.copytree(gemma_home, home, copy_function=os.link)
    store = KeyStore(home)
    keys = {name: store.create(name, scopes)[1] for name, scopes in KEYS.items()}
    flags = ("--parallel", "2", "--ctx-size", "512", "--rate-limit", "8", "--max-body", "2048")
    with start_server(home, *flags) as server:
        yield Secure(server, home, keys)


def _wait_for(predicate: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_keys_scopes_and_open_health(sec: Secure) -> None:
    url = sec.server.url
    for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(url + path).status_code == 200
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/v1/models", headers=sec.h("met")).status_code == 403
    assert httpx.get(url + "/metrics", headers=sec.h("fields")).status_code == 403
    assert httpx.get(url + "/metrics", headers=sec.h("met")).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"x-api-key": sec.keys["fields"]}).status_code == 200


def test_health_model_probe_with_and_without_key(sec: Secure) -> None:
    env = {**os.environ, "MLSERVE_HOME": str(sec.home)}
    env.pop("MLSERVE_API_KEY", None)
    args = ("health", sec.server.url, "--model", "gemma3-270m")
    refused = run_mlserve(*args, env=env)
    assert refused.returncode == 1 and "--api-key" in refused.stderr
    ok = run_mlserve(*args, "--api-key", sec.keys["probe"], env=env)
    assert ok.returncode == 0, ok.stderr


def test_revoked_key_is_refused_without_restart(sec: Secure) -> None:
    url = sec.server.url + "/v1/models"
    assert httpx.get(url, headers=sec.h("temp")).status_code == 200
    done = run_mlserve("keys", "revoke", "temp", env={**os.environ, "MLSERVE_HOME": str(sec.home)})
    assert done.returncode == 0, done.stderr
    _wait_for(lambda: httpx.get(url, headers=sec.h("temp")).status_code == 401)
    assert httpx.get(url, headers=sec.h("fields")).status_code == 200


def test_rate_limit_is_per_key(sec: Secure) -> None:
    url = sec.server.url + "/v1/models"
    codes = [httpx.get(url, headers=sec.h("limited")).status_code for _ in range(8)]
    assert codes == [200] * 8
    limited = httpx.post(
        sec.server.url + "/v1/completions",
        json={"model": "gemma3-270m", "prompt": "Hi", "max_tokens": 2},
        headers=sec.h("limited", "rid-429"),
    )
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert httpx.get(url, headers=sec.h("fields")).status_code == 200  # other keys are unaffected
    _wait_for(lambda: any(r.get("request_id") == "rid-429" for r in sec.audit_records()))
    rec = next(r for r in sec.audit_records() if r.get("request_id") == "rid-429")
    assert rec["status"] == 429 and rec["key"] == "limited"


def test_audit_record_of_a_completion(sec: Secure) -> None:
    prompt = "The heart has four"
    body = {"model": "gemma3-270m", "prompt": prompt, "max_tokens": 3, "temperature": 0, "stop": ["zzz"]}
    resp = httpx.post(sec.server.url + "/v1/completions", json=body, headers=sec.h("fields", "rid-fields"), timeout=60)
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    _wait_for(lambda: any(r.get("request_id") == "rid-fields" for r in sec.audit_records()))
    (rec,) = [r for r in sec.audit_records() if r.get("request_id") == "rid-fields"]
    assert rec["event"] == "inference" and rec["status"] == 200 and rec["key"] == "fields"
    assert rec["client"] == "127.0.0.1" and rec["route"] == "/v1/completions"
    assert (rec["model"], rec["version"]) == ("gemma3-270m", "1")
    assert str(rec["digest"]).startswith("sha256:")
    assert rec["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    assert rec["prompt_tokens"] == usage["prompt_tokens"] and rec["completion_tokens"] == usage["completion_tokens"]
    sampling = rec["sampling"]
    assert isinstance(sampling, dict)
    assert sampling["max_tokens"] == 3 and sampling["temperature"] == 0 and sampling["stop_count"] >= 1
    assert isinstance(rec["latency_s"], float) and str(rec["time"]).endswith("Z")


def test_canaries_appear_nowhere(sec: Secure) -> None:
    url = sec.server.url
    chat = {"model": "gemma3-270m", "messages": [{"role": "user", "content": CANARY}], "max_tokens": 3}
    sent: list[tuple[str, str, object, int]] = [
        ("/v1/chat/completions", "c-ok", chat, 200),
        ("/v1/chat/completions", "c-stream", chat | {"stream": True}, 200),
        ("/v1/completions", "c-comp", {"model": "gemma3-270m", "prompt": CANARY, "max_tokens": 3}, 200),
        ("/v1/completions", "c-neg", {"model": "gemma3-270m", "prompt": CANARY, "max_tokens": -4}, 400),
        ("/v1/completions", "c-model", {"model": CANARY, "prompt": CANARY}, 404),
        ("/v1/chat/completions", "c-role", chat | {"messages": [{"role": CANARY, "content": CANARY}]}, 400),
        ("/v1/completions", "c-big", {"model": "gemma3-270m", "prompt": CANARY * 100}, 413),
    ]
    bodies = []
    for path, rid, body, status in sent:
        resp = httpx.post(url + path, json=body, headers=sec.h("canary", rid), timeout=60)
        assert resp.status_code == status, (rid, resp.text)
        bodies.append(resp.text if status != 200 else "")
    bad_json = httpx.post(
        url + "/v1/completions", content=b'{"prompt": "' + CANARY.encode(), headers=sec.h("canary", "c-json")
    )
    assert bad_json.status_code == 400
    nokey = httpx.post(url + "/v1/chat/completions", json=chat, headers={"x-request-id": "c-nokey"})
    assert nokey.status_code == 401
    bodies += [bad_json.text, nokey.text, httpx.get(url + "/metrics", headers=sec.h("adm")).text]
    rids = [rid for _, rid, _, _ in sent] + ["c-json", "c-nokey"]
    _wait_for(lambda: {r.get("request_id") for r in sec.audit_records()} >= set(rids))
    audit_text = "".join(f.read_text() for f in (sec.home / "audit").glob("*.jsonl"))
    for canary in CANARIES:
        for text in bodies:
            assert canary not in text
        assert canary not in audit_text
        assert canary not in sec.server.log
    per_rid = [r.get("request_id") for r in sec.audit_records()]
    assert all(per_rid.count(rid) == 1 for rid in rids), per_rid


def test_audit_chain_intact_with_cli_writes_interleaved(sec: Secure) -> None:
    """Server records and CLI records (key changes) interleave in one chain; this test makes its own."""
    env = {**os.environ, "MLSERVE_HOME": str(sec.home)}
    body = {"model": "gemma3-270m", "prompt": "Hi", "max_tokens": 1}
    for i in range(3):
        resp = httpx.post(sec.server.url + "/v1/completions", json=body, headers=sec.h("fields", f"chain-{i}"))
        assert resp.status_code == 200
        made = run_mlserve("keys", "create", f"chain-key-{i}", "--json", env=env)
        assert made.returncode == 0, made.stderr
        assert run_mlserve("keys", "revoke", f"chain-key-{i}", env=env).returncode == 0
    _wait_for(lambda: {f"chain-{i}" for i in range(3)} <= {r.get("request_id") for r in sec.audit_records()})
    done = run_mlserve("audit", "verify", "--json", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["ok"]
    revoked = [r for r in sec.audit_records() if r["event"] == "key.revoke" and r["name"].startswith("chain-key-")]
    assert len(revoked) == 3, revoked
