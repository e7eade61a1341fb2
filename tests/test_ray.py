"""Ray Serve: two replicas of the mlserve app on a local Ray cluster, Ray's router between them.

One module-scoped cluster (starting Ray takes 10 to 20 s on 2 cores) serves the tiny GGUF from
its own MLSERVE_HOME. The tests prove that both replicas take traffic and that killing one
replica's actor mid-load is survived: Ray starts a new replica, and the only failed requests
are those the killed one had in flight (streams it had begun, and requests it had accepted but
not yet answered, which Ray's proxy ends with a 500).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from mlserve.bundles.store import Store
from mlserve.engine.fake import FakeEngine, FakeScript
from mlserve.errors import UsageError
from mlserve.server.app import create_app
from mlserve.server.state import ServedModel
from mlserve.serving.asgi import REPLICA_HEADER, ReadyGate, ReplicaConfig, ReplicaHeader, served_model
from tests.support.ggufgen import write_tiny_llama
from tests.support.kube import documents
from tests.support.storeutil import REPO

try:
    import ray
except ImportError:  # the mlserve[ray] extra is not installed: only the Ray-free tests run
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="needs the mlserve[ray] extra (ray[serve])")

PARALLEL = 4


def rendered_config(home: Path, *args: str) -> dict[str, Any]:
    """The Ray Serve config `mlserve deploy ray tiny` renders from the store at ``home``."""
    from mlserve.deploy import ray as ray_target
    from mlserve.deploy.plan import ServeSettings, build_plan

    settings = ServeSettings(parallel=PARALLEL, ctx_size=512, threads=1, drain_timeout=5)
    plan = build_plan(Store(home), ["tiny"], settings)
    files = ray_target.render(plan, ray_target.Options(cpus_per_replica=1))
    [config] = documents(files["ray/serve-config.yaml"])
    return config  # type: ignore[no-any-return]


def rendered_args(home: Path) -> dict[str, Any]:
    """The application's arguments from the rendered config: the replicas serve exactly what it pins."""
    args: dict[str, Any] = rendered_config(home)["applications"][0]["args"]
    return args


@dataclass
class Cluster:
    """A local Ray cluster running the mlserve app; ``url`` is Ray's HTTP proxy."""

    url: str
    home: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from ray import serve

    from mlserve.serving.ray_app import build

    home = tmp_path_factory.mktemp("ray-home")
    gguf = write_tiny_llama(tmp_path_factory.mktemp("ray-model") / "tiny.gguf", seed=0)
    env = {**os.environ, "MLSERVE_HOME": str(home)}
    subprocess.run(
        [sys.executable, "-m", "mlserve", "pack", str(gguf), "--name", "tiny"], check=True, env=env, cwd=REPO
    )
    saved = {k: os.environ.get(k) for k in ("HOME", "MLSERVE_HOME")}
    # Ray keeps an auth token under ~/.ray: a test must not write into the real home.
    os.environ["HOME"] = str(tmp_path_factory.mktemp("ray-user"))
    os.environ["MLSERVE_HOME"] = str(home)  # the replicas' worker processes inherit it
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({**rendered_args(home), "num_replicas": "2"}), name="mlserve", route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}", home)
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Outcome:
    """One streamed completion: which replica began answering it and whether it finished."""

    replica: str | None = None
    model: str | None = None
    status: int | None = None
    done: bool = False
    error: str | None = None
    body: bytes = b""  # the start of a refusal's body


def stream(url: str, i: int, max_tokens: int, out: Outcome, started: threading.Event) -> None:
    """POST one streamed completion, filling ``out`` as it goes; never raises."""
    body = {"model": "tiny", "prompt": f"note {i}:", "max_tokens": max_tokens, "stream": True, "temperature": 0}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            out.status = response.status_code
            out.replica = response.headers.get(REPLICA_HEADER)
            out.model = response.headers.get("x-mlserve-model")
            started.set()
            text = response.read()
            ended = text.rstrip().endswith(b"data: [DONE]") and b'"error"' not in text
            out.done = response.status_code == 200 and ended
            if response.status_code != 200:
                out.body = text[:200]
    except httpx.HTTPError as exc:
        out.error = type(exc).__name__


def run_load(url: str, n: int, max_tokens: int, during: Callable[[list[Outcome]], None] | None = None) -> list[Outcome]:
    """``n`` concurrent streams; ``during(outcomes)`` runs once the first stream has begun."""
    started = threading.Event()
    outcomes = [Outcome() for _ in range(n)]
    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(stream, url, i, max_tokens, out, started) for i, out in enumerate(outcomes)]
        if during is not None:
            assert started.wait(60), "no stream began"
            during(outcomes)
        for future in futures:
            future.result()
    return outcomes


def replica_actors() -> dict[str, Any]:
    """Live replica actors of the mlserve deployment, by replica tag (the x-mlserve-replica value)."""
    from ray.util import list_named_actors

    found = {}
    for entry in list_named_actors(all_namespaces=True):
        name = entry["name"]
        if name.startswith("SERVE_REPLICA::mlserve#"):
            found[name.rsplit("#", 1)[1]] = ray.get_actor(name, namespace=entry["namespace"])
    return found


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it is truthy (returning its value) or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.ray
@needs_ray
def test_two_replicas_share_forty_concurrent_requests(cluster: Cluster) -> None:
    outcomes = run_load(cluster.url, 40, 48)
    assert all(o.done for o in outcomes), [o for o in outcomes if not o.done]
    assert {o.model for o in outcomes} == {"tiny:1"}
    replicas = {o.replica for o in outcomes}
    assert len(replicas) == 2 and None not in replicas, replicas
    assert replicas == set(replica_actors())


@pytest.mark.ray
@needs_ray
def test_killed_replica_is_replaced_and_only_its_streams_fail(cluster: Cluster) -> None:
    before = replica_actors()
    assert len(before) == 2
    victim = sorted(before)[0]

    def kill(outcomes: list[Outcome]) -> None:
        # Wait until the victim is answering streams, so the kill lands on requests in flight.
        wait_for(lambda: any(o.replica == victim for o in outcomes), 30, "a stream on the victim")
        ray.kill(before[victim], no_restart=True)

    outcomes = run_load(cluster.url, 40, 400, during=kill)
    failed = [o for o in outcomes if not o.done]
    cut = [o for o in failed if o.replica == victim]
    # Ray's proxy answers 500 (no replica header: no byte came from a replica) for a request the
    # dead replica had accepted but not begun to answer; no other request may fail.
    unanswered = [o for o in failed if o.replica is None and o.status == 500]
    print(f"killed replica {victim}: {len(cut)} streams cut, {len(unanswered)} unanswered (500), of {len(outcomes)}")
    assert failed, "the kill landed on no request in flight: the test proved nothing"
    assert len(cut) + len(unanswered) == len(failed), [o for o in failed if o not in cut + unanswered]
    # Ray sends a replica at most max_ongoing_requests (= PARALLEL) at once: all it had in flight.
    assert len(failed) <= PARALLEL, failed

    def replaced() -> dict[str, Any] | None:
        actors = replica_actors()
        return actors if len(actors) == 2 and victim not in actors else None

    after = wait_for(replaced, 60, "a new replica")
    assert victim not in after
    again = run_load(cluster.url, 12, 32)
    assert all(o.done for o in again), again
    assert {o.replica for o in again} <= set(after)


# --- Without a cluster: the replica's app, the builder's arguments, the rendered config -------------------------


def test_replica_config_parses_builder_arguments_and_refuses_unknown_ones() -> None:
    config = ReplicaConfig.from_args({"refs": "a,b:2", "parallel": "4", "drain_timeout": "7.5", "route_prefix": "/x/"})
    assert config.refs == ("a", "b:2") and config.parallel == 4 and config.drain_timeout == 7.5
    assert config.route_prefix == "/x" and config.settings().route_prefix == "/x"
    assert ReplicaConfig.from_args({"refs": ["sha256:" + "0" * 64], "threads": 2}).threads == 2
    for bad, message in (
        ({"refs": "a", "paralel": "4"}, "Unknown mlserve setting"),
        ({"refs": "a", "parallel": "four"}, "must be a number"),
        ({"refs": "a", "max_queue": "-1"}, "cannot be negative"),
        ({}, "Name the bundles"),
    ):
        with pytest.raises(UsageError, match=message):
            ReplicaConfig.from_args(bad)


def test_served_model_carries_the_serving_settings(tiny_gguf: Path, cli: Any) -> None:
    """serve and the Ray replica build models with this one function: the settings they pass reach it."""
    from mlserve.engine.llama.factory import Overrides

    assert cli("pack", tiny_gguf, "--name", "tiny").exit_code == 0
    store = Store()
    bundle = store.resolve("tiny")
    model = served_model(store, bundle, Overrides(ctx_size=256, parallel=2, embeddings=True))
    assert (model.name, model.version, model.digest) == (bundle.name, bundle.version, bundle.digest)
    assert model.ctx_size == 256 and model.embeddings is True
    assert model.engine.config.parallel == 2  # type: ignore[attr-defined]


def _lifespan_messages(app: Any, within: float) -> list[str]:
    """Drive an ASGI lifespan startup; the message types the app sent within ``within`` seconds of it."""
    sent: list[str] = []

    async def run() -> None:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await inbox.put({"type": "lifespan.startup"})
        answered = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])
            answered.set()

        task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(answered.wait(), within)
        await inbox.put({"type": "lifespan.shutdown"})
        done, _ = await asyncio.wait({task}, timeout=5)
        if not done:  # still held at startup (a model that never loads): stop it
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    return sent


def _fake_app(script: FakeScript) -> Any:
    return create_app([ServedModel("fake", "1", "sha256:" + "0" * 64, FakeEngine("fake:1", script))])


def test_ready_gate_holds_startup_until_the_model_is_ready() -> None:
    gate = asyncio.Event()  # never set: the model stays loading
    assert "lifespan.startup.complete" not in _lifespan_messages(ReadyGate(_fake_app(FakeScript(start_gate=gate))), 0.5)
    assert _lifespan_messages(ReadyGate(_fake_app(FakeScript())), 10)[0] == "lifespan.startup.complete"
    # Without the gate the app reports started while the model is still loading: the gate is what waits.
    assert _lifespan_messages(_fake_app(FakeScript(start_gate=asyncio.Event())), 10)[0] == "lifespan.startup.complete"


def test_ready_gate_fails_the_startup_when_a_model_fails_to_load() -> None:
    assert _lifespan_messages(ReadyGate(_fake_app(FakeScript(fail_start=True))), 10)[0] == "lifespan.startup.failed"


def test_replica_header_names_the_replica_on_every_response() -> None:
    with TestClient(ReplicaHeader(_fake_app(FakeScript()), "replica-7")) as client:
        for path in ("/health/live", "/no/such/route"):
            assert client.get(path).headers[REPLICA_HEADER] == "replica-7"


def test_rendered_ray_config_is_ray_serve_schema_and_pins_the_digest(tiny_gguf: Path, cli: Any, home: Path) -> None:
    pytest.importorskip("ray", reason="needs the mlserve[ray] extra (ray[serve])")
    from ray.serve.schema import ServeDeploySchema

    packed = cli("pack", tiny_gguf, "--name", "tiny", "--json")
    config = rendered_config(home)
    schema = ServeDeploySchema.model_validate(config)
    unknown = _unknown_keys(config, ServeDeploySchema)  # Ray ignores unknown keys: that would hide a typo
    assert unknown == [], unknown
    typo = {**config, "applications": [{**config["applications"][0], "deployments": [{"name": "x", "num_replica": 2}]}]}
    assert _unknown_keys(typo, ServeDeploySchema) == ["applications.deployments.num_replica"]
    [app] = schema.applications
    assert app.import_path == "mlserve.serving.ray_app:build"
    assert app.args["refs"] == [packed.json()["digest"]] and app.args["parallel"] == PARALLEL
    [deployment] = app.deployments
    assert deployment.name == "mlserve" and deployment.max_ongoing_requests == PARALLEL
    assert deployment.graceful_shutdown_timeout_s == 5 and deployment.ray_actor_options.num_cpus == 1


def _unknown_keys(data: Any, model: Any, path: str = "") -> list[str]:
    """Keys of ``data`` that the pydantic ``model`` (and the models of its fields) does not declare."""
    import typing

    found = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            found.append(path + key)
            continue
        inner = [a for a in typing.get_args(field.annotation) if hasattr(a, "model_fields")]
        inner += [
            b for a in typing.get_args(field.annotation) for b in typing.get_args(a) if hasattr(b, "model_fields")
        ]
        if hasattr(field.annotation, "model_fields"):
            inner.append(field.annotation)
        for sub in inner[:1]:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    found += _unknown_keys(item, sub, f"{path}{key}.")
    return found


def test_ray_renderer_refuses_what_a_replica_cannot_honour(tiny_gguf: Path, cli: Any) -> None:
    assert cli("pack", tiny_gguf, "--name", "tiny").exit_code == 0
    assert cli("promote", "tiny:1", "--to", "production").exit_code == 0
    channel = cli("deploy", "ray", "tiny@production")
    assert channel.exit_code == 2 and "follows a channel" in channel.stderr
    tls = ("--tls-cert", "/c.pem", "--tls-key", "/k.pem", "--tls-client-ca", "/ca.pem")
    mtls = cli("deploy", "ray", "tiny", *tls)
    assert mtls.exit_code == 2 and "client certificates" in mtls.stderr
    gpu = cli("deploy", "ray", "tiny", "--gpu-layers", "8")
    assert gpu.exit_code == 2 and "reserve none" in gpu.stderr
