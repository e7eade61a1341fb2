"""``mlserve deploy kserve``: a ServingRuntime for mlserve and an InferenceService for the bundle.

KServe's LLM runtimes serve OpenAI's routes under ``/openai/v1``; so does this one
(``serve --route-prefix /openai``), beside ``/v1`` and KServe's Open Inference Protocol health
routes, which its probes use (``/v2/health/ready``, ``/v2/health/live``). The runtime holds
what is the same for every bundle (image, port, probes, drain, non-root security); the
InferenceService holds the pod around it: the bundle imported and verified by digest (the
init containers of ``pod.py``), the pinned ``serve`` arguments, memory from the estimate and
the Secrets. It runs in RawDeployment mode (KServe ≥ 0.17 calls it Standard and still
accepts this name): Knative's serverless mode allows init containers and volumes only behind
feature flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlserve.deploy import pod
from mlserve.deploy.plan import Plan
from mlserve.errors import UsageError

MODEL_FORMAT = "gguf"
OPENAI_PREFIX = "/openai"
# KServe's probes use the Open Inference Protocol's health routes; mlserve answers both forms alike.
V2_PATHS = {"/health/ready": "/v2/health/ready", "/health/live": "/v2/health/live"}


@dataclass(frozen=True)
class Options(pod.PodOptions):
    """Settings only the KServe target has (plus the pod's)."""

    runtime: str = field(default="mlserve", metadata={"help": "Name of the ServingRuntime."})
    cluster_runtime: bool = field(
        default=False, metadata={"help": "Render a ClusterServingRuntime (every namespace) instead."}
    )
    replicas: int = field(default=2, metadata={"help": "Predictor replicas (KServe's minReplicas = maxReplicas)."})


def check(plan: Plan, opts: Options) -> None:
    """The pod's checks, a runtime name KServe accepts, and at least one replica."""
    pod.check(plan, opts)
    if not pod.DNS_LABEL.fullmatch(opts.runtime):
        raise UsageError(f"Runtime name {opts.runtime!r} is not a valid Kubernetes name.")
    if opts.replicas < 1:
        raise UsageError("--replicas must be at least 1.")


def kserve_plan(plan: Plan) -> Plan:
    """The plan KServe serves: OpenAI routes also under /openai (unless a prefix was given), v2 probe paths."""
    s = plan.serve
    serve = dataclasses.replace(
        s,
        route_prefix=s.route_prefix or OPENAI_PREFIX,
        ready_path=V2_PATHS.get(s.ready_path, s.ready_path),
        live_path=V2_PATHS.get(s.live_path, s.live_path),
    )
    return dataclasses.replace(plan, serve=serve)


def _meta(name: str, opts: Options, cluster: bool = False, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if opts.namespace and not cluster:
        meta["namespace"] = opts.namespace
    meta["labels"] = {"app.kubernetes.io/name": "mlserve"}
    meta.update(extra)
    return meta


def serving_runtime(plan: Plan, opts: Options) -> dict[str, Any]:
    """The runtime: image, port, probes, drain and security; no bundle in it."""
    s = plan.serve
    kind = "ClusterServingRuntime" if opts.cluster_runtime else "ServingRuntime"
    container = {
        "name": "kserve-container",  # the name KServe merges the predictor's model container into
        "image": opts.image,
        "ports": [{"containerPort": s.port, "protocol": "TCP"}],
        **pod.probes(plan, opts, s.ready_path, s.live_path, port=s.port),
        "lifecycle": pod.lifecycle(opts),
        "securityContext": pod.container_security(),
    }
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": kind,
        "metadata": _meta(opts.runtime, opts, cluster=opts.cluster_runtime),
        "spec": {
            "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "3", "autoSelect": False}],
            "protocolVersions": ["v2"],
            "containers": [container],
        },
    }


def inference_service(plan: Plan, opts: Options, name: str) -> dict[str, Any]:
    """The InferenceService: the pinned bundle, its init containers, volumes, limits and grace period."""
    digests = ",".join(m.digest for m in plan.models)
    annotations = {"serving.kserve.io/deploymentMode": "RawDeployment", "mlserve.dev/digests": digests}
    model = {
        "modelFormat": {"name": MODEL_FORMAT, "version": "3"},
        "runtime": opts.runtime,
        "protocolVersion": "v2",
        # All of `serve`'s arguments here, none in the runtime: right whether KServe appends or replaces.
        "args": pod.pinned_args(plan, opts),
        "env": pod.env(plan),
        "resources": pod.resources(plan, opts),
        "volumeMounts": pod.mounts(plan, opts),
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": _meta(name, opts, annotations=annotations),
        "spec": {
            "predictor": {
                "minReplicas": opts.replicas,
                "maxReplicas": opts.replicas,
                "automountServiceAccountToken": False,
                "securityContext": pod.pod_security(),
                "terminationGracePeriodSeconds": pod.grace_period(plan, opts),
                "initContainers": pod.init_containers(plan, opts),
                "volumes": pod.volumes(plan, opts),
                "model": model,
            }
        },
    }


def render(plan: Plan, opts: Options) -> dict[str, str]:
    """``kserve/servingruntime.yaml`` and ``kserve/inferenceservice.yaml``."""
    check(plan, opts)
    plan = kserve_plan(plan)
    pod.check(plan, opts)  # the mapped probe paths and prefix too
    name = pod.object_name(plan, opts)
    refs = ", ".join(f"{m.name}:{m.version} ({m.digest})" for m in plan.models)
    bundles = "; ".join(
        f"`mlserve export {m.name}:{m.version} -o {pod.bundle_file(m.name, m.version)}`" for m in plan.models
    )
    header = (
        f"Rendered by `mlserve deploy kserve` for {refs}.\n"
        f"Before applying: put {bundles} into the PersistentVolumeClaim {opts.bundles_claim};\n"
        "create the keys and TLS Secrets as for `mlserve deploy k8s` (its README.md).\n"
        f"OpenAI routes: /v1 and {plan.serve.route_prefix}/v1; probes: {plan.serve.ready_path}, {plan.serve.live_path}."
    )
    return {
        "kserve/servingruntime.yaml": pod.dump([serving_runtime(plan, opts)], header),
        "kserve/inferenceservice.yaml": pod.dump([inference_service(plan, opts, name)], header),
    }
