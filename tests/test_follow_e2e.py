"""A server started with NAME@CHANNEL follows the channel: zero-downtime switch, rollback, canary, bad versions."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from mlserve.bundles.store import Store
from tests.support.servers import ServerProcess
from tests.support.storeutil import flip_byte

FLAGS = ("--parallel", "2", "--ctx-size", "256")


@pytest.fixture
def versions(cli, make_gguf) -> list[str]:
    """m:1 and m:2 (tiny GGUFs of different bytes), production at m:1."""
    for seed in (1, 2):
        assert cli("pack", make_gguf(seed), "--name", "m").exit_code == 0
    assert cli("promote", "m:1", "--to", "production").exit_code == 0
    return ["m:1", "m:2"]


@pytest.fixture
def server(home: Path, versions: list[str]) -> Iterator[ServerProcess]:
    proc = ServerProcess(home, ["m@production"], *FLAGS)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _complete(client: httpx.Client, url: str, model: str = "m", stream: bool = False) -> tuple[int, str, str]:
    """(status, x-mlserve-model, problem or '') of one small completion, read to its end."""
    body = {"model": model, "prompt": "the patient is", "max_tokens": 24, "temperature": 0, "stream": stream}
    with client.stream("POST", url + "/v1/completions", json=body) as resp:
        text = resp.read().decode()
    served = resp.headers.get("x-mlserve-model", "")
    if resp.status_code != 200:
        return resp.status_code, served, text
    if stream and not text.rstrip().endswith("data: [DONE]"):
        return resp.status_code, served, "stream did not end with [DONE]"
    return resp.status_code, served, ""


@dataclass
class Load:
    """Clients sending completions back to back until stopped; every response is recorded in order."""

    url: str
    clients: int = 3
    seen: list[list[str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.seen = [[] for _ in range(self.clients)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                try:
                    status, served, problem = _complete(client, self.url, stream=n % 2 == 0)
                except httpx.HTTPError as exc:
                    status, served, problem = 0, "", repr(exc)
                if status != 200 or problem:
                    self.failures.append(f"client {i}: {status} {problem[:200]}")
                self.seen[i].append(served)
                n += 1

    def count(self, model: str) -> int:
        return sum(s.count(model) for s in self.seen)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _runs(sequence: list[str]) -> list[str]:
    """A sequence with repeats collapsed: [a, a, b, a] -> [a, b, a]."""
    return [x for i, x in enumerate(sequence) if i == 0 or sequence[i - 1] != x]


def _model_ids(url: str) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}


def test_promote_and_rollback_under_load_drop_nothing(cli, server: ServerProcess) -> None:
    assert set(_model_ids(server.url)) == {"m", "m@production", "m:1"}
    load = Load(server.url)
    try:
        _wait(lambda: load.count("m:1") >= 10, "traffic on m:1")
        assert cli("promote", "m:2", "--to", "production").exit_code == 0
        _wait(lambda: load.count("m:2") >= 10, "traffic on m:2")
        ids = _model_ids(server.url)
        assert set(ids) == {"m", "m@production", "m:2"} and ids["m"]["version"] == "2"
        with httpx.Client(timeout=30) as client:
            assert _complete(client, server.url, "m:2")[:2] == (200, "m:2")
            assert _complete(client, server.url, "m:1")[0] == 404  # no longer served: never a silent fallback
        _wait(lambda: "closed m:1" in server.log, "the old version to be closed")
        mark = load.count("m:1")
        assert cli("rollback", "m", "--channel", "production", "--reason", "test").exit_code == 0
        _wait(lambda: load.count("m:1") >= mark + 10, "traffic back on m:1")
    finally:
        load.finish()
    assert load.failures == []
    for seen in load.seen:
        assert _runs(seen) in (["m:1"], ["m:1", "m:2"], ["m:1", "m:2", "m:1"]), _runs(seen)
    assert any(_runs(seen) == ["m:1", "m:2", "m:1"] for seen in load.seen)
    assert "closed m:2" in server.log or _wait(lambda: "closed m:2" in server.log, "m:2 closed") is None
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'mlserve_channel_switches_total\{channel="m@production",model="m:2"\} 1\.0', metrics)
    assert server.terminate() == 0  # SIGTERM still drains and exits 0


def test_corrupt_version_is_not_switched_to(cli, server: ServerProcess, make_gguf) -> None:
    store = Store()
    bundle = store.get("m", "2")
    assert bundle is not None
    flip_byte(store.blob_path(bundle.model_sha256), 4096)
    assert cli("promote", "m:2", "--to", "production").exit_code == 0  # no --check: the server must refuse it
    _wait(lambda: "not switching to m:2" in server.log, "the server to refuse m:2")
    assert "still serving m:1" in server.log
    with httpx.Client(timeout=30) as client:
        for _ in range(5):
            assert _complete(client, server.url)[:2] == (200, "m:1")
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'mlserve_channel_switch_failures_total\{channel="m@production",model="m:2"\} 1\.0', metrics)
    assert httpx.get(server.url + "/health/ready").status_code == 200

    # The follower is not wedged: a good version still gets picked up, here on SIGHUP.
    assert cli("pack", make_gguf(3), "--name", "m").exit_code == 0
    assert cli("promote", "m:3", "--to", "production").exit_code == 0
    server.proc.send_signal(signal.SIGHUP)
    with httpx.Client(timeout=30) as client:
        _wait(lambda: _complete(client, server.url)[1] == "m:3", "m:3 to serve")
    assert server.proc.poll() is None


def test_canary_splits_traffic_until_promoted(cli, server: ServerProcess) -> None:
    assert cli("promote", "m:2", "--to", "production", "--canary", "50").exit_code == 0
    _wait(lambda: "m:2" in _model_ids(server.url), "the canary to load")
    ids = _model_ids(server.url)
    assert ids["m"]["version"] == "1" and ids["m"]["canary"] == {"version": "2", "percent": 50}
    with httpx.Client(timeout=30) as client:
        served = [_complete(client, server.url)[1] for _ in range(40)]
        assert {"m:1", "m:2"} == set(served)
        assert _complete(client, server.url, "m:2")[1] == "m:2"
        assert cli("promote", "m:2", "--to", "production").exit_code == 0
        _wait(lambda: "m:1" not in _model_ids(server.url), "full promotion")
        assert {_complete(client, server.url)[1] for _ in range(10)} == {"m:2"}


def test_sighup_without_a_channel_is_harmless(home: Path, versions: list[str]) -> None:
    proc = ServerProcess(home, ["m:1"], *FLAGS, env={"MLSERVE_LOG_LEVEL": "info"})
    try:
        proc.wait_ready()
        os.kill(proc.proc.pid, signal.SIGHUP)
        _wait(lambda: "SIGHUP ignored" in proc.log, "the SIGHUP log line", timeout=10)
        assert httpx.get(proc.url + "/health/ready").status_code == 200
    finally:
        proc.stop()
