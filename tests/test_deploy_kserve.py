"""``mlserve deploy kserve``: a ServingRuntime and an InferenceService valid against the kserve package's models.

The validator (tests/support/kube.py) builds each object from KServe's generated models and
the kubernetes client's, refusing unknown fields, wrong types and missing required fields.
The rendered arguments and probe paths are then run on the real server: OpenAI routes under
``/openai/v1`` and KServe's ``/v2/health/*``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CliResult
from tests.support.kube import Invalid, documents, validate_kserve
from tests.support.servers import ServerProcess
from tests.support.storeutil import assert_one_error

EXPOSED = ("--host", "0.0.0.0", "--insecure")


@pytest.fixture
def tiny_bundle(cli: Callable[..., CliResult], tiny_gguf: Path) -> dict[str, Any]:
    """The tiny GGUF packed as tiny:1 in this test's store; its manifest fields."""
    result = cli("pack", tiny_gguf, "--name", "tiny", "--json")
    assert result.exit_code == 0, result
    manifest: dict[str, Any] = result.json()
    return manifest


def rendered(cli: Callable[..., CliResult], *args: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ServingRuntime and the InferenceService ``mlserve deploy kserve`` renders."""
    result = cli("deploy", "kserve", "tiny", *args, "--json")
    assert result.exit_code == 0, result
    files = result.json()["files"]
    [runtime] = documents(files["kserve/servingruntime.yaml"])
    [isvc] = documents(files["kserve/inferenceservice.yaml"])
    return runtime, isvc


def test_objects_validate_against_the_kserve_models(cli: Callable[..., CliResult], tiny_bundle: dict[str, Any]) -> None:
    secure = ("--host", "0.0.0.0", "--tls-cert", "/etc/tls/tls.crt", "--tls-key", "/etc/tls/tls.key", "--api-keys")
    for args in (EXPOSED, (*secure, "--cluster-runtime", "--audit-claim", "audit", "--namespace", "clinic")):
        runtime, isvc = rendered(cli, *args)
        assert type(validate_kserve(runtime)).__name__ in ("V1alpha1ServingRuntime", "V1alpha1ClusterServingRuntime")
        assert type(validate_kserve(isvc)).__name__ == "V1beta1InferenceService"
    assert runtime["kind"] == "ClusterServingRuntime" and "namespace" not in runtime["metadata"]
    assert isvc["metadata"]["namespace"] == "clinic"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("spec", "predictor", "model", "argz"), [], "has no field argz"),
        (("spec", "predictor", "minReplicas"), "2", "expected int"),
        (("spec", "predictor", "initContainers", 0, "name"), None, "name"),
    ],
)
def test_the_validator_refuses_what_kserve_would(
    cli: Callable[..., CliResult], tiny_bundle: dict[str, Any], path: tuple[Any, ...], value: Any, message: str
) -> None:
    _, isvc = rendered(cli, *EXPOSED)
    node = isvc
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(Invalid, match=message):
        validate_kserve(isvc)


def test_runtime_and_service_fit_together(cli: Callable[..., CliResult], tiny_bundle: dict[str, Any]) -> None:
    digest = tiny_bundle["digest"]
    runtime, isvc = rendered(cli, *EXPOSED, "--runtime", "mlserve-cpu", "--replicas", "3")
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and "args" not in container  # the bundle lives in the service
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"] == "mlserve-cpu"
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["args"][:2] == ["serve", digest]
    assert model["args"][model["args"].index("--route-prefix") + 1] == "/openai"
    assert [c["args"] for c in predictor["initContainers"]] == [["import", "/bundles/tiny-1.tar"], ["verify", digest]]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (3, 3)
    assert predictor["terminationGracePeriodSeconds"] >= 5 + 30
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--grace-period", "10"), "Grace period 10 s is shorter"),
        (("--ready-path", "/ready"), "probe path '/ready' is not served"),
        (("--runtime", "Bad_Name"), "not a valid Kubernetes name"),
    ],
)
def test_inconsistent_settings_are_refused_with_exit_2(
    cli: Callable[..., CliResult], tiny_bundle: dict[str, Any], args: tuple[str, ...], message: str
) -> None:
    result = cli("deploy", "kserve", "tiny", *EXPOSED, *args)
    assert result.exit_code == 2, result
    assert message in result.stderr
    assert_one_error(result.stderr)


def test_rendered_arguments_serve_openai_under_the_prefix_and_v2_health(
    cli: Callable[..., CliResult], tiny_bundle: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod's init steps and the model's arguments, run for real; the runtime's probe paths answer 200."""
    runtime, isvc = rendered(cli, *EXPOSED, "--drain-timeout", "5")
    predictor = isvc["spec"]["predictor"]
    import_args, verify_args = (c["args"] for c in predictor["initContainers"])
    tar = tmp_path / Path(import_args[1]).name
    assert cli("export", "tiny:1", "-o", tar).exit_code == 0
    pod_home = tmp_path / "pod-home"
    monkeypatch.setenv("MLSERVE_HOME", str(pod_home))
    assert cli("import", tar).exit_code == 0 and cli(*verify_args).exit_code == 0
    args = list(predictor["model"]["args"])
    for flag in ("--host", "--port"):
        i = args.index(flag)
        del args[i : i + 2]
    [container] = runtime["spec"]["containers"]
    probes = [container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    with ServerProcess(pod_home, [args[1]], "--host", "127.0.0.1", *args[2:]) as proc:
        proc.wait_ready()
        for path in probes:
            assert httpx.get(proc.url + path, timeout=5).status_code == 200, path
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
        for route in ("/openai/v1/completions", "/v1/completions"):
            answer = httpx.post(proc.url + route, json=body, timeout=30)
            assert answer.status_code == 200, (route, answer.text)
            assert answer.headers["x-mlserve-model"] == "tiny:1"
        models = httpx.get(proc.url + "/openai/v1/models", timeout=5).json()
        assert "tiny" in [m["id"] for m in models["data"]]
