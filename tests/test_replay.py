"""``mlserve audit replay``: a deterministic record re-runs to the same output hash; a different bundle does not."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from mlserve.security import audit
from tests.conftest import CliResult
from tests.support.servers import start_server
from tests.support.storeutil import assert_one_error

SERVE = ("--ctx-size", "256", "--parallel", "2")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat on the mat"}]
Cli = Callable[..., CliResult]


def records(home: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in audit.log_files(home / "audit") for line in f.read_text().splitlines()]


def wait_for_record(home: Path, request_id: str) -> dict[str, Any]:
    """The server appends audit records off the event loop: wait for this one (with a deadline)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [r for r in records(home) if r.get("request_id") == request_id]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id}")


def send(url: str, route: str, body: dict[str, Any], deterministic: bool = True) -> tuple[str, str]:
    """POST a greedy request; (its request id, its output text)."""
    payload = {"model": "tiny:1", "max_tokens": 16, "temperature": 0, **body}
    if deterministic:
        payload["mlserve"] = {"deterministic": True}
    r = httpx.post(url + route, json=payload, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return r.headers["x-request-id"], choice["message"]["content"] if "message" in choice else choice["text"]


def test_replay_matches_for_a_deterministic_record(home: Path, tmp_path: Path, cli: Cli, tiny_pair: dict) -> None:
    with start_server(home, *SERVE, refs=["tiny:1"]) as server:
        chat_id, chat_text = send(server.url, "/v1/chat/completions", {"messages": MESSAGES})
        text_id, _ = send(server.url, "/v1/completions", {"prompt": "the cat sat"})
        chat_record = wait_for_record(home, chat_id)
        # Against the running server (--url) ...
        messages = tmp_path / "messages.json"
        messages.write_text(json.dumps(MESSAGES))
        res = cli("audit", "replay", chat_id, "--prompt-file", messages, "--url", server.url, "--json")
        assert res.exit_code == 0, res
        assert res.json()["match"] is True and res.json()["output_sha256"] == chat_record["output_sha256"]
    assert chat_text and chat_record["deterministic"] and chat_record["digest"] == tiny_pair["1"]
    # ... and on a server replay starts itself from the store, found by the record's hash.
    (tmp_path / "prompt.txt").write_text("the cat sat")
    text_record = wait_for_record(home, text_id)
    res = cli("audit", "replay", text_record["hash"][:16], "--prompt-file", tmp_path / "prompt.txt")
    assert res.exit_code == 0, res
    assert "match" in res.stderr


def test_replay_reports_a_mismatch_when_the_bundle_differs(home: Path, tmp_path: Path, cli: Cli, tiny_pair) -> None:
    with start_server(home, *SERVE, refs=["tiny:1"]) as server:
        rid, text = send(server.url, "/v1/completions", {"prompt": "the cat sat"})
    record = wait_for_record(home, rid)
    # The same request, recorded as if tiny:2 had answered it: replay runs tiny:2, which says otherwise.
    forged = {k: v for k, v in record.items() if k not in ("time", "prev", "hash")}
    forged.update(digest=tiny_pair["2"], version="2", request_id="req-claimed-by-tiny-2")
    audit.append(forged, home)
    assert audit.verify(home=home).ok
    (tmp_path / "prompt.txt").write_text("the cat sat")
    res = cli("audit", "replay", "req-claimed-by-tiny-2", "--prompt-file", tmp_path / "prompt.txt", "--json")
    assert res.exit_code == 1, res
    out = res.json()
    assert out["match"] is False and out["expected_output_sha256"] == record["output_sha256"] != out["output_sha256"]
    assert record["output_sha256"] in res.stderr and out["output_sha256"] in res.stderr
    assert text  # the recorded output was not empty, so the hashes compare real text


def test_replay_refuses_bad_input(home: Path, tmp_path: Path, cli: Cli, tiny_pair: dict) -> None:
    with start_server(home, *SERVE, refs=["tiny:1"]) as server:
        det_id, _ = send(server.url, "/v1/completions", {"prompt": "the cat sat"})
        batched_id, _ = send(server.url, "/v1/completions", {"prompt": "the cat sat"}, deterministic=False)
        sampled_id, _ = send(server.url, "/v1/completions", {"prompt": "the cat sat", "temperature": 0.9})
        stop_id, _ = send(server.url, "/v1/completions", {"prompt": "the cat sat", "stop": ["zz"]})
    for rid in (det_id, batched_id, sampled_id, stop_id):
        wait_for_record(home, rid)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the cat sat")
    (tmp_path / "other.txt").write_text("the cat sat ")  # one byte more: another prompt
    cases = [
        ((batched_id, prompt), "not decoded deterministically"),
        ((sampled_id, prompt), "without a seed"),
        ((stop_id, prompt), "stop string"),
        ((det_id, tmp_path / "other.txt"), "does not hold the recorded prompt"),
        (("req-nobody", prompt), "No inference record"),
    ]
    for (rid, path), words in cases:
        res = cli("audit", "replay", rid, "--prompt-file", path)
        assert res.exit_code == 2 and words in res.stderr, (words, res)
        assert_one_error(res.stderr)
    # The bundle is gone from the store: nothing to re-run it on.
    assert cli("rm", "tiny:1").exit_code == 0
    res = cli("audit", "replay", det_id, "--prompt-file", prompt)
    assert res.exit_code == 2 and "no longer holds" in res.stderr, res
