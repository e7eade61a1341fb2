"""A pair of real ``mlserve serve`` processes behind HAProxy, configured by ``mlserve deploy haproxy``.

One 60 s soak (8 clients) takes ``kill -9``, a restart, a SIGTERM drain and another restart;
a short run promotes a channel host by host. Uses the tiny GGUF: the subject is the fleet,
not the text. The measured counts are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_mlserve
from tests.support.fleet import HAPROXY, SERVE, HAProxy, free_ports, wait_for
from tests.support.servers import ServerProcess

pytestmark = pytest.mark.skipif(
    not HAPROXY,
    reason="haproxy is not installed: `apt-get install -y haproxy` (CI's .ci/run installs it)",
)
CLIENTS = 8


class Backend:
    """One ``mlserve serve`` on a fixed port that can be killed and started again."""

    def __init__(self, home: Path, ref: str, port: int) -> None:
        self.home, self.ref, self.port = home, ref, port
        self.proc: ServerProcess | None = None

    def start(self) -> None:
        # ServerProcess passes --port 0 first; the later --port wins (click keeps the last value).
        self.proc = ServerProcess(self.home, [self.ref], *SERVE, "--port", str(self.port))
        self.proc.wait_ready()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@dataclass
class Outcome:
    """One client request as the client saw it."""

    start: float
    end: float
    stream: bool
    ok: bool
    started: bool  # response headers (200) reached the client: HAProxy can no longer retry it
    backend: str
    model: str
    problem: str = ""


class Load:
    """``CLIENTS`` threads sending small completions, half of them streamed, until stopped."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                outcome = self._one(client, stream=rng.random() < 0.5, max_tokens=rng.randint(8, 64))
                with self._lock:
                    self.outcomes.append(outcome)

    def _one(self, client: httpx.Client, stream: bool, max_tokens: int) -> Outcome:
        body = {"model": self.model, "prompt": "the patient", "max_tokens": max_tokens, "stream": stream}
        start = time.monotonic()
        started, backend, model = False, "", ""
        try:
            with client.stream("POST", self.url + "/v1/completions", json=body) as resp:
                backend = resp.headers.get("x-mlserve-backend", "")
                model = resp.headers.get("x-mlserve-model", "")
                started = stream and resp.status_code == 200
                text = resp.read().decode()
            if resp.status_code != 200:
                problem = f"HTTP {resp.status_code}: {text[:200]}"
            elif stream and not text.rstrip().endswith("data: [DONE]"):
                problem = "stream did not end with [DONE]"
            else:
                problem = ""
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        return Outcome(start, time.monotonic(), stream, not problem, started, backend, model, problem)

    def since(self, t: float) -> list[Outcome]:
        """Requests started at or after ``t``."""
        with self._lock:
            return [o for o in self.outcomes if o.start >= t]

    def snapshot(self) -> list[Outcome]:
        """Every outcome so far."""
        with self._lock:
            return list(self.outcomes)


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fleet"
    d.mkdir()
    return d


def _pack(home: Path, *ggufs: Path) -> None:
    env = {**os.environ, "MLSERVE_HOME": str(home)}
    for gguf in ggufs:
        done = run_mlserve("pack", gguf, "--name", "m", env=env)
        assert done.returncode == 0, done.stderr


@pytest.fixture
def pair(home: Path, tiny_gguf: Path, fleet_dir: Path) -> Iterator[tuple[list[Backend], HAProxy]]:
    """Two servers of m:1 (one store) and HAProxy in front."""
    _pack(home, tiny_gguf)
    ports = free_ports(3)
    backends = [Backend(home, "m:1", p) for p in ports[:2]]
    try:
        for b in backends:
            b.start()
        proxy = HAProxy(fleet_dir, home, "m:1", ports[:2], ports[2])
        try:
            yield backends, proxy
        finally:
            proxy.stop()
    finally:
        for b in backends:
            b.stop()


def test_pair_survives_kill_drain_and_restart(pair: tuple[list[Backend], HAProxy]) -> None:
    """60 s, 8 clients: kill -9 s1, restart it, SIGTERM s2 (drain), restart it; only s1's live streams fail."""
    (a, b), proxy = pair
    t0 = time.monotonic()
    with Load(proxy.url, "m") as load:
        time.sleep(12)  # steady state before the kill
        assert a.proc is not None and b.proc is not None
        wait_for(lambda: any(o.backend == "s1" and o.stream for o in load.since(time.monotonic() - 1)), "s1 streams")
        killed_at = time.monotonic()
        a.proc.proc.kill()  # kill -9: in-flight streams on s1 die with it
        a.proc.proc.wait(10)
        wait_for(lambda: "s1" not in proxy.up(), "HAProxy to take s1 out")
        a.start()
        wait_for(lambda: proxy.up() == {"s1", "s2"}, "s1 back in the pool")
        time.sleep(5)
        drained_at = time.monotonic()
        assert b.proc.terminate(timeout=40) == 0  # SIGTERM drains, then exits 0
        b.start()
        wait_for(lambda: proxy.up() == {"s1", "s2"}, "s2 back in the pool")
        restored_at = time.monotonic()
        time.sleep(max(0.0, 60 - (time.monotonic() - t0)))
    outcomes = load.snapshot()
    failed = [o for o in outcomes if not o.ok]
    live_on_killed = [o for o in failed if o.started and o.backend == "s1" and o.start < killed_at < o.end]
    after = [o for o in outcomes if o.start > restored_at + 2]
    drained = [o for o in outcomes if o.backend == "s2" and o.start < drained_at < o.end]
    print(
        f"\nfleet soak: {len(outcomes)} requests in {time.monotonic() - t0:.0f} s, {len(failed)} failed "
        f"(all streams live on s1 at the kill: {len(live_on_killed)}), "
        f"{sum(1 for o in outcomes if o.stream)} streamed, HAProxy retried {proxy.retried()}; "
        f"after the drain: {sum(1 for o in failed if o.start >= drained_at)} failed, "
        f"{len(drained)} in flight on s2 when it drained"
    )
    assert len(outcomes) > 50, "the load never got going"
    assert proxy.retried() >= 1, "no request was retried: nothing was in flight on s1 at the kill"
    assert failed == live_on_killed, [f for f in failed if f not in live_on_killed][:5]
    assert not [o for o in failed if o.start >= drained_at], "the drain lost requests"
    assert drained and all(o.ok for o in drained), "nothing was in flight on s2 when it drained"
    assert {o.backend for o in after} == {"s1", "s2"}, "the restored pool does not share the load"


def test_rolling_promotion_host_by_host(tmp_path: Path, make_gguf: Callable[..., Path], fleet_dir: Path) -> None:
    """Each host promotes m:2 in turn under load: no request fails; x-mlserve-model goes m:1 -> m:2 per host."""
    homes = [tmp_path / "host-a", tmp_path / "host-b"]
    v1, v2 = make_gguf(seed=1), make_gguf(seed=2)
    for h in homes:
        _pack(h, v1, v2)
        done = run_mlserve("promote", "m:1", "--to", "production", env={**os.environ, "MLSERVE_HOME": str(h)})
        assert done.returncode == 0, done.stderr
    ports = free_ports(3)
    backends = [Backend(h, "m@production", p) for h, p in zip(homes, ports, strict=False)]
    proxy: HAProxy | None = None
    try:
        for back in backends:
            back.start()
        proxy = HAProxy(fleet_dir, homes[0], "m@production", ports[:2], ports[2])
        promoted: dict[str, float] = {}
        with Load(proxy.url, "m") as load:
            time.sleep(2)
            for home, name in zip(homes, ("s1", "s2"), strict=True):
                promoted[name] = time.monotonic()
                env = {**os.environ, "MLSERVE_HOME": str(home)}
                done = run_mlserve("promote", "m:2", "--to", "production", env=env)
                assert done.returncode == 0, done.stderr
                since = promoted[name]
                wait_for(lambda n=name, t=since: any(o.backend == n and o.model == "m:2" for o in load.since(t)), name)
                time.sleep(1.5)
        outcomes = load.snapshot()
    finally:
        if proxy is not None:
            proxy.stop()
        for back in backends:
            back.stop()
    failed = [o for o in outcomes if not o.ok]
    print(f"\nrolling promotion: {len(outcomes)} requests, {len(failed)} failed")
    assert failed == []
    for name, at in promoted.items():
        mine = [o for o in outcomes if o.backend == name]
        switched = min(o.start for o in mine if o.model == "m:2")
        # Requests are admitted (and given a version) as they arrive; allow 0.5 s for arrival order.
        assert {o.model for o in mine if o.start < at} == {"m:1"}, name
        assert {o.model for o in mine if o.start > switched + 0.5} == {"m:2"}, name
