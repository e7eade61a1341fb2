"""mlserve health: 0 healthy, 1 unhealthy (loading, draining, model not ready), 2 unreachable."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CliResult
from tests.support.fake_openai import serve_in_thread
from tests.support.servers import ServerProcess, start_server

Cli = Callable[..., CliResult]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_loading_server_is_unhealthy_until_ready(cli: Cli) -> None:
    with serve_in_thread() as (url, opts):
        live = cli("health", url)
        loading = cli("health", url, "--ready", "--json")
        opts.ready.set()
        ready = cli("health", url, "--ready", "--json")
    assert live.exit_code == 0, live  # alive while loading
    assert loading.exit_code == 1, loading
    assert loading.json()["status"] == "unhealthy" and loading.json()["checks"]["ready"]["state"] == "loading"
    assert "not ready (loading)" in loading.stderr
    assert ready.exit_code == 0, ready
    assert ready.json()["healthy"] is True and ready.stdout.count("{") >= 1 and ready.stderr == ""


def test_wait_returns_as_soon_as_ready(cli: Cli) -> None:
    with serve_in_thread() as (url, opts):
        timer = threading.Timer(0.5, opts.ready.set)
        timer.start()
        started = time.monotonic()
        res = cli("health", url, "--ready", "--wait", "20", "--json")
        elapsed = time.monotonic() - started
        timer.join()
    assert res.exit_code == 0, res
    assert 0.45 <= elapsed < 3.0
    assert res.json()["attempts"] >= 3  # it polled while loading


def test_wait_gives_up_at_the_deadline(cli: Cli) -> None:
    with serve_in_thread() as (url, _):
        started = time.monotonic()
        res = cli("health", url, "--ready", "--wait", "0.5")
    assert res.exit_code == 1 and 0.4 <= time.monotonic() - started < 3


def test_closed_port_is_unreachable(cli: Cli) -> None:
    port = _closed_port()
    res = cli("health", f"http://127.0.0.1:{port}", "--json")
    assert res.exit_code == 2, res
    assert res.json()["status"] == "unreachable"
    assert "Cannot reach" in res.stderr and "Traceback" not in res.stderr
    assert cli("health", "not-a-url").exit_code == 2


@pytest.fixture(scope="module")
def server(gemma_home: Path) -> Iterator[ServerProcess]:
    with start_server(gemma_home, "--parallel", "2", "--ctx-size", "512") as server:
        yield server


@pytest.mark.model
def test_real_server(cli: Cli, server: ServerProcess) -> None:
    assert cli("health", server.url).exit_code == 0
    assert cli("health", server.url, "--ready").exit_code == 0
    assert cli("health", server.url, "--ready", "--model", "gemma3-270m:1").exit_code == 0
    missing = cli("health", server.url, "--model", "nope", "--json")
    assert missing.exit_code == 1 and "not served" in missing.stderr


@pytest.mark.model
def test_draining_server_is_unhealthy(cli: Cli, gemma_home: Path) -> None:
    srv = ServerProcess(gemma_home, ["gemma3-270m"], "--parallel", "1", "--ctx-size", "1024")
    first_token = threading.Event()

    def client() -> None:  # a well-behaved streaming client that keeps reading while the server drains
        body = {"model": "gemma3-270m", "prompt": "1, 2, 3, 4,", "max_tokens": 900, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as resp:
                for _ in resp.iter_lines():
                    first_token.set()
        except httpx.HTTPError:
            pass

    try:
        srv.wait_ready()
        assert cli("health", srv.url, "--ready").exit_code == 0
        reader = threading.Thread(target=client, daemon=True)
        reader.start()
        assert first_token.wait(60)
        srv.proc.send_signal(15)
        deadline = time.monotonic() + 10  # the signal is handled asynchronously
        res = cli("health", srv.url, "--ready", "--json")
        while res.exit_code != 1 and time.monotonic() < deadline:
            res = cli("health", srv.url, "--ready", "--json")
        assert res.exit_code == 1, (res, srv.log)
        assert res.json()["checks"]["ready"]["state"] == "draining"
        assert cli("health", srv.url).exit_code == 0  # still alive while draining
    finally:
        srv.stop()
