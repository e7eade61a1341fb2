"""``mlserve deploy k8s``: valid objects for two Kubernetes releases, refusals, the pod's commands run, the Dockerfile.

The manifests are validated offline against Kubernetes' own schemas in strict mode. The pod's
commands (import, verify, serve with the rendered arguments) and its probe paths are then run
against the real CLI and server, so a manifest that validates but could not start fails here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dockerfile
import httpx
import pytest

from mlserve.bundles.store import Store
from mlserve.deploy import k8s, pod
from mlserve.deploy.plan import Plan, ServeSettings, build_plan
from mlserve.errors import UsageError
from tests.conftest import CliResult
from tests.support.kube import Invalid, documents, validate_k8s
from tests.support.servers import ServerProcess
from tests.support.storeutil import REPO, assert_one_error

EXPOSED = ("--host", "0.0.0.0", "--insecure")
SECURE = ("--host", "0.0.0.0", "--tls-cert", "/etc/mlserve/tls/tls.crt", "--tls-key", "/etc/mlserve/tls/tls.key")


@pytest.fixture
def tiny_bundle(cli: Callable[..., CliResult], tiny_gguf: Path) -> dict[str, Any]:
    """The tiny GGUF packed as tiny:1 in this test's store; its manifest fields."""
    result = cli("pack", tiny_gguf, "--name", "tiny", "--json")
    assert result.exit_code == 0, result
    manifest: dict[str, Any] = result.json()
    return manifest


def rendered(cli: Callable[..., CliResult], *args: str) -> dict[str, str]:
    """``mlserve deploy k8s ... --json``'s files."""
    result = cli("deploy", "k8s", "tiny", *args, "--json")
    assert result.exit_code == 0, result
    files: dict[str, str] = result.json()["files"]
    return files


def by_kind(text: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in documents(text)}


def test_every_object_validates_strictly_for_two_kubernetes_releases(
    cli: Callable[..., CliResult], tiny_bundle: dict[str, Any]
) -> None:
    plain = rendered(cli, *EXPOSED)
    full = rendered(cli, *SECURE, "--api-keys", "--audit-claim", "audit", "--namespace", "clinic")
    for files in (plain, full):
        docs = documents(files["k8s/mlserve.yaml"]) + documents(files["k8s/prometheus-adapter-rule.yaml"])
        assert [d["kind"] for d in docs] == [
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "ConfigMap",
        ]
        for doc in docs:
            validate_k8s(doc)


def test_strict_validation_refuses_an_unknown_field(cli: Callable[..., CliResult], tiny_bundle: dict[str, Any]) -> None:
    deployment = by_kind(rendered(cli, *EXPOSED)["k8s/mlserve.yaml"])["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")  # a typo kubectl would reject
    with pytest.raises(Invalid, match="readinessProbes"):
        validate_k8s(deployment)


def test_deployment_pins_the_digest_probes_drains_and_runs_unprivileged(
    cli: Callable[..., CliResult], tiny_bundle: dict[str, Any]
) -> None:
    digest = tiny_bundle["digest"]
    files = rendered(cli, *SECURE, "--api-keys", "--drain-timeout", "45", "--pre-stop-seconds", "7")
    objects = by_kind(files["k8s/mlserve.yaml"])
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    [server] = spec["containers"]
    assert server["args"][:2] == ["serve", digest]  # pinned: never a name that could resolve elsewhere
    assert server["args"][server["args"].index("--threads") + 1] == "2"  # matched to the pod's CPUs
    assert [c["args"] for c in spec["initContainers"]] == [["import", "/bundles/tiny-1.tar"], ["verify", digest]]
    assert server["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert server["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http", "scheme": "HTTPS"}
    assert server["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert spec["terminationGracePeriodSeconds"] >= 7 + 45
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == pod.UID
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in [server, *spec["initContainers"]]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert mounts["keys"]["mountPath"] == "/var/lib/mlserve/keys.json" and mounts["keys"]["readOnly"] is True
    assert mounts["tls"]["mountPath"] == "/etc/mlserve/tls" and mounts["tls"]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["mlserve-home"] and "emptyDir" in volumes["tmp"]
    assert volumes["bundles"]["persistentVolumeClaim"] == {"claimName": "mlserve-bundles", "readOnly": True}
    assert volumes["tls"]["secret"]["secretName"] == "mlserve-tls"
    plan = build_plan(Store(), ["tiny"], ServeSettings(host="0.0.0.0", insecure=True))
    memory = f"{math.ceil(plan.memory_bytes / pod.MIB)}Mi"
    assert server["resources"]["limits"]["memory"] == server["resources"]["requests"]["memory"] == memory


def test_autoscaler_scales_on_the_queue_metric_the_adapter_rule_serves(
    cli: Callable[..., CliResult], tiny_bundle: dict[str, Any]
) -> None:
    files = rendered(cli, *EXPOSED, "--min-replicas", "2", "--max-replicas", "5", "--queue-target", "1.5")
    objects = by_kind(files["k8s/mlserve.yaml"])
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    [metric] = hpa["metrics"]
    assert metric["pods"]["metric"]["name"] == "mlserve_queue_depth"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "1500m"}
    [rule] = documents(by_kind(files["k8s/prometheus-adapter-rule.yaml"])["ConfigMap"]["data"]["config.yaml"])[0][
        "rules"
    ]
    assert rule["name"]["as"] == "mlserve_queue_depth" and rule["seriesQuery"].startswith("mlserve_queue_depth{")
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert objects["Service"]["spec"]["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ready-path", "/healthz"), "probe path '/healthz' is not served"),
        (("--live-path", "/health/ready"), "probe path '/health/ready' is not served"),
        (
            ("--grace-period", "20"),
            "Grace period 20 s is shorter than the preStop pause 5 s plus the drain timeout 30 s",
        ),
        (("--memory-mib", "64"), "is below the estimate"),
        (("--max-replicas", "1"), "--max-replicas 1 must be at least --min-replicas 2"),
        (("--gpu-layers", "10"), "requests none"),
        (("--tls-cert", "/t/c.pem", "--tls-key", "/t/k.pem", "--tls-client-ca", "/t/ca.pem"), "probes cannot present"),
    ],
)
def test_inconsistent_settings_are_refused_with_exit_2(
    cli: Callable[..., CliResult], tiny_bundle: dict[str, Any], args: tuple[str, ...], message: str
) -> None:
    result = cli("deploy", "k8s", "tiny", *EXPOSED, *args)
    assert result.exit_code == 2, result
    assert message in result.stderr
    assert_one_error(result.stderr)
    assert result.stdout == ""


def test_a_loopback_bind_and_a_followed_channel_are_refused(
    cli: Callable[..., CliResult], tiny_bundle: dict[str, Any]
) -> None:
    loopback = cli("deploy", "k8s", "tiny")
    assert loopback.exit_code == 2 and "unreachable from the Service" in loopback.stderr
    assert cli("promote", "tiny:1", "--to", "production").exit_code == 0
    channel = cli("deploy", "k8s", "tiny@production", *EXPOSED)
    assert channel.exit_code == 2 and "follows a channel" in channel.stderr


def test_renderer_refuses_a_short_grace_period_without_the_cli(tiny_bundle: dict[str, Any]) -> None:
    plan: Plan = build_plan(Store(), ["tiny"], ServeSettings(host="0.0.0.0", insecure=True, drain_timeout=60))
    with pytest.raises(UsageError, match="shorter than the preStop pause"):
        k8s.render(plan, k8s.Options(grace_period=30))
    assert k8s.render(plan, k8s.Options(grace_period=65))["k8s/mlserve.yaml"]


def test_the_pods_commands_and_probe_paths_work_with_the_real_cli(
    cli: Callable[..., CliResult], tiny_bundle: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the init containers' and the server's rendered arguments in a fresh MLSERVE_HOME, as the pod would."""
    spec = by_kind(rendered(cli, *EXPOSED, "--drain-timeout", "5")["k8s/mlserve.yaml"])["Deployment"]["spec"]
    pod_spec = spec["template"]["spec"]
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    import_args, verify_args = (c["args"] for c in pod_spec["initContainers"])
    tar = bundles / Path(import_args[1]).name
    assert cli("export", "tiny:1", "-o", tar).exit_code == 0  # what README.md tells the operator to do

    pod_home = tmp_path / "pod-home"
    monkeypatch.setenv("MLSERVE_HOME", str(pod_home))
    assert cli(import_args[0], tar).exit_code == 0
    assert cli(*verify_args).exit_code == 0
    [server] = pod_spec["containers"]
    args = list(server["args"])
    for flag in ("--host", "--port"):  # bind loopback on a free port here; everything else as rendered
        i = args.index(flag)
        del args[i : i + 2]
    probes = [server[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    with ServerProcess(pod_home, [args[1]], "--host", "127.0.0.1", *args[2:]) as proc:
        proc.wait_ready()
        for path in probes:
            assert httpx.get(proc.url + path, timeout=5).status_code == 200, path
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
        answer = httpx.post(proc.url + "/v1/completions", json=body, timeout=30)
        assert answer.status_code == 200 and answer.headers["x-mlserve-model"] == "tiny:1"


def test_verify_step_fails_when_the_volume_holds_another_bundle(
    cli: Callable[..., CliResult],
    tiny_bundle: dict[str, Any],
    make_gguf: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = by_kind(rendered(cli, *EXPOSED)["k8s/mlserve.yaml"])["Deployment"]["spec"]["template"]["spec"]
    import_args, verify_args = (c["args"] for c in spec["initContainers"])
    other = tmp_path / "other-home"
    monkeypatch.setenv("MLSERVE_HOME", str(other))
    assert cli("pack", make_gguf(seed=7), "--name", "tiny").exit_code == 0  # same name and version, other bytes
    tar = tmp_path / Path(import_args[1]).name
    assert cli("export", "tiny:1", "-o", tar).exit_code == 0
    monkeypatch.setenv("MLSERVE_HOME", str(tmp_path / "pod-home"))
    assert cli("import", tar).exit_code == 0
    verify = cli(*verify_args)
    assert verify.exit_code != 0, verify  # the pod never starts serving the wrong model


def _stages(commands: list[Any]) -> list[list[Any]]:
    stages: list[list[Any]] = []
    for command in commands:
        if command.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(command)
    return stages


def _joined(stage: list[Any], cmd: str) -> str:
    return " ".join(" ".join((*c.flags, *c.value)) for c in stage if c.cmd == cmd)


def dockerfile_problems(text: str) -> list[str]:
    """What breaks the image rules, read with Docker's own parser (no image is built: no Docker daemon here)."""
    commands = list(dockerfile.parse_string(text))
    problems = []
    args = dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])
    stages = _stages(commands)
    if len(stages) < 2:
        return ["not multi-stage"]
    build, runtime = stages[0], stages[-1]
    for stage in (build, runtime):
        image = stage[0].value[0]
        image = args.get(image.strip("${}"), image) if image.startswith("$") else image
        tag = image.split("@")[0].rpartition(":")[2] if ":" in image else ""
        if not re.match(r"\d+\.\d+\.\d+", tag):  # a patch release, never latest or a floating 3.11
            problems.append(f"base image {image} is not pinned to a release tag")
    if any(c.cmd == "ADD" for c in commands):
        problems.append("ADD (fetches URLs, unpacks archives): use COPY")
    if "-DLLAVA_BUILD=OFF" not in _joined(build, "ENV") or "-DGGML_NATIVE=OFF" not in _joined(build, "ENV"):
        problems.append("the builder does not set CMAKE_ARGS for a portable llama.cpp")
    if "pip wheel" not in _joined(build, "RUN"):
        problems.append("the builder builds no wheels")
    if "build-essential" in _joined(runtime, "RUN") or "from=build" not in _joined(runtime, "RUN"):
        problems.append("the runtime stage must install the builder's wheels, without compilers")
    users = [c.value[0].split(":")[0] for c in runtime if c.cmd == "USER"]
    if not users or users[-1] != str(pod.UID):  # numeric, so the kubelet's runAsNonRoot can check it
        problems.append(f"the final stage does not run as uid {pod.UID}: USER {users[-1] if users else '(none)'}")
    if [c.value for c in runtime if c.cmd == "ENTRYPOINT"] != [("mlserve",)]:
        problems.append('ENTRYPOINT is not ["mlserve"]')
    if "8000" not in _joined(runtime, "EXPOSE") or "/var/lib/mlserve" not in _joined(runtime, "VOLUME"):
        problems.append("EXPOSE 8000 and VOLUME /var/lib/mlserve are missing")
    # ENV parses as (key, value, key, value, ...)
    env = {k: v for c in runtime if c.cmd == "ENV" for k, v in zip(c.value[::2], c.value[1::2], strict=True)}
    if env.get("MLSERVE_HOME") != "/var/lib/mlserve":
        problems.append("MLSERVE_HOME is not the volume")
    return problems


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    assert dockerfile_problems((REPO / "Dockerfile").read_text()) == []
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests"} <= ignored
    build = _stages(list(dockerfile.parse_file(str(REPO / "Dockerfile"))))[0]
    copied = _joined(build, "COPY").split()
    assert {"pyproject.toml", "README.md", "recipes", "mlserve"} <= set(copied) and not ignored & set(copied)


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("USER 10001:10001", "USER root", "does not run as uid"),
        ("python:3.11.14-slim-bookworm", "python:3.11-slim", "not pinned"),
        ("COPY mlserve ./mlserve", "ADD mlserve ./mlserve", "ADD"),
        (" -DGGML_NATIVE=OFF", "", "portable llama.cpp"),
    ],
)
def test_dockerfile_lint_can_fail(old: str, new: str, problem: str) -> None:
    text = (REPO / "Dockerfile").read_text()
    assert old in text
    assert any(problem in p for p in dockerfile_problems(text.replace(old, new)))
