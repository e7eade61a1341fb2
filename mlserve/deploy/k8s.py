"""``mlserve deploy k8s``: Deployment, Service, PodDisruptionBudget and a queue-depth autoscaler.

The pod is ``pod.py``'s (bundle imported and verified by digest, non-root, read-only root,
Secrets for keys and TLS). Around it: a Deployment that rolls one pod at a time and never
drops below capacity, a Service, a PodDisruptionBudget, and a HorizontalPodAutoscaler
(autoscaling/v2) on ``mlserve_queue_depth``, the requests waiting for a sequence slot, with
the prometheus-adapter rule that makes it a custom metric. HPA rather than a KEDA
ScaledObject: HPA is built into every cluster and validates against Kubernetes' own schemas,
while KEDA is one more operator a hospital's platform team must run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from mlserve.deploy import pod
from mlserve.deploy.plan import Plan
from mlserve.errors import UsageError

QUEUE_METRIC = "mlserve_queue_depth"


@dataclass(frozen=True)
class Options(pod.PodOptions):
    """Settings only the Kubernetes target has (plus the pod's)."""

    min_replicas: int = field(default=2, metadata={"help": "Fewest pods (the Deployment's replicas)."})
    max_replicas: int = field(default=6, metadata={"help": "Most pods the autoscaler may run."})
    queue_target: float = field(
        default=2.0, metadata={"help": "Scale out above this many queued requests per pod (mlserve_queue_depth)."}
    )


def check(plan: Plan, opts: Options) -> None:
    """The pod's checks, and replica counts that make sense."""
    pod.check(plan, opts)
    if opts.min_replicas < 1 or opts.max_replicas < opts.min_replicas:
        raise UsageError(
            f"--max-replicas {opts.max_replicas} must be at least --min-replicas {opts.min_replicas}, "
            "and --min-replicas at least 1."
        )
    if opts.queue_target <= 0:
        raise UsageError("--queue-target must be above 0.")


def _meta(name: str, opts: Options, labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    meta["labels"] = labels
    meta.update(extra)
    return meta


def _quantity(value: float) -> str:
    """A Kubernetes quantity: ``2`` or ``500m``."""
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def deployment(plan: Plan, opts: Options, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """The Deployment: the pinned server, its probes, drain and limits."""
    s = plan.serve
    digests = ",".join(m.digest for m in plan.models)
    container = {
        "name": "mlserve",
        "image": opts.image,
        "args": pod.pinned_args(plan, opts),
        "ports": [pod.port(plan)],
        "env": pod.env(plan),
        "resources": pod.resources(plan, opts),
        **pod.probes(plan, opts, s.ready_path, s.live_path),
        "lifecycle": pod.lifecycle(opts),
        "securityContext": pod.container_security(),
        "volumeMounts": pod.mounts(plan, opts),
    }
    scrape = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(s.port),
        "prometheus.io/path": "/metrics",
        "prometheus.io/scheme": s.scheme,
        "mlserve.dev/digests": digests,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, opts, labels, annotations={"mlserve.dev/digests": digests}),
        "spec": {
            "replicas": opts.min_replicas,
            "selector": {"matchLabels": labels},
            # A new pod must be ready before an old one leaves: capacity never drops during a rollout.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels, "annotations": scrape},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": pod.pod_security(),
                    "terminationGracePeriodSeconds": pod.grace_period(plan, opts),
                    "initContainers": pod.init_containers(plan, opts),
                    "containers": [container],
                    "volumes": pod.volumes(plan, opts),
                },
            },
        },
    }


def service(plan: Plan, opts: Options, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A ClusterIP Service on the server's port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, opts, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [
                {
                    "name": "http",
                    "port": plan.serve.port,
                    "targetPort": "http",
                    "protocol": "TCP",
                    "appProtocol": plan.serve.scheme,
                }
            ],
        },
    }


def disruption_budget(opts: Options, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """Voluntary evictions (node drains) take one pod at a time; each drains before it goes."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, opts, labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    }


def autoscaler(opts: Options, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """Scale on queued requests per pod: out quickly, in slowly (a scale-in drains a pod)."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(name, opts, labels),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": opts.min_replicas,
            "maxReplicas": opts.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        "target": {"type": "AverageValue", "averageValue": _quantity(opts.queue_target)},
                    },
                }
            ],
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                },
            },
        },
    }


def adapter_rule() -> dict[str, Any]:
    """The prometheus-adapter rule that serves ``mlserve_queue_depth`` per pod (summed over models)."""
    return {
        "seriesQuery": f'{QUEUE_METRIC}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{QUEUE_METRIC}$", "as": QUEUE_METRIC},
        "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
    }


def adapter_config(opts: Options, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A ConfigMap in prometheus-adapter's config format holding the rule (merge it into yours)."""
    config = yaml.safe_dump({"rules": [adapter_rule()]}, sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(f"{name}-adapter-rule", opts, labels),
        "data": {"config.yaml": config},
    }


def _notes(plan: Plan, opts: Options, name: str) -> str:
    s = plan.serve
    ns = f" -n {opts.namespace}" if opts.namespace else ""
    lines = [
        f"# {name} on Kubernetes",
        "",
        "1. Build and push the image: `docker build -t IMAGE .` in the mlserve checkout,",
    ]
    lines.append(f"   then render with `--image IMAGE` (now: `{opts.image}`).")
    lines.append(f"2. Put each bundle into the PersistentVolumeClaim `{opts.bundles_claim}` (read-only in the pod):")
    for m in plan.models:
        lines.append(f"   `mlserve export {m.name}:{m.version} -o {pod.bundle_file(m.name, m.version)}` ({m.digest})")
    step = 3
    if s.api_keys:
        lines.append(
            f"{step}. `kubectl{ns} create secret generic {opts.keys_secret} "
            "--from-file=keys.json=$MLSERVE_HOME/keys.json`"
        )
        lines.append("   (hashes only). After `mlserve keys revoke`, update the Secret and `kubectl rollout restart`.")
        step += 1
    if s.tls_cert:
        lines.append(f"{step}. `kubectl{ns} create secret tls {opts.tls_secret} --cert=server.crt --key=server.key`")
        step += 1
    lines.append(
        f"{step}. `kubectl apply -f mlserve.yaml`; merge `prometheus-adapter-rule.yaml` into your adapter config."
    )
    if s.api_keys:
        lines.append("   Prometheus needs a metrics key: `mlserve keys create prometheus --scope metrics`.")
    return "\n".join(lines) + "\n"


def render(plan: Plan, opts: Options) -> dict[str, str]:
    """``k8s/mlserve.yaml`` (Deployment, Service, PDB, HPA), the adapter rule, and the steps to apply them."""
    check(plan, opts)
    name = pod.object_name(plan, opts)
    labels = {"app.kubernetes.io/name": "mlserve", "app.kubernetes.io/instance": name}
    refs = ", ".join(f"{m.name}:{m.version} ({m.digest})" for m in plan.models)
    docs = [
        deployment(plan, opts, name, labels),
        service(plan, opts, name, labels),
        disruption_budget(opts, name, labels),
        autoscaler(opts, name, labels),
    ]
    header = (
        f"Rendered by `mlserve deploy k8s` for {refs}.\nREADME.md beside this file: the steps before `kubectl apply`."
    )
    return {
        "k8s/mlserve.yaml": pod.dump(docs, header),
        "k8s/prometheus-adapter-rule.yaml": pod.dump(
            [adapter_config(opts, name, labels)],
            "prometheus-adapter rule for the HorizontalPodAutoscaler's mlserve_queue_depth metric.\n"
            "Merge `rules` into your adapter's config (a ConfigMap of this shape, or the Helm chart's rules.custom).",
        ),
        "k8s/README.md": _notes(plan, opts, name),
    }
