"""The pod both Kubernetes targets run: the mlserve container, how the bundle gets in, probes, security, volumes.

``k8s.py`` wraps it in a Deployment; ``kserve.py`` splits it into a ServingRuntime (the
container) and an InferenceService (the pod around it). The bundle is pinned by digest either
way: init containers ``mlserve import`` the exported tar from a read-only volume and ``mlserve
verify sha256:DIGEST`` (exit 1 on a hash mismatch, 2 when the tar held another bundle), and the
server serves ``sha256:DIGEST``, never a name that could resolve to something else.

The container runs as the Dockerfile's non-root user with a read-only root filesystem; its
only writable paths are ``$MLSERVE_HOME`` and ``/tmp``, both emptyDirs. API keys (a Secret
holding ``keys.json``, which has only hashes) and TLS (a ``kubernetes.io/tls`` Secret) are
mounted read-only.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from mlserve import __version__
from mlserve.deploy.plan import LIVE_PATHS, READY_PATHS, Plan, check_settings
from mlserve.errors import UsageError

UID = 10001  # the Dockerfile's `mlserve` user and group
MIB = 1 << 20
BUNDLES_MOUNT = "/bundles"
# After the drain, uvicorn's own graceful shutdown may take this long (mlserve/server/run.py).
SERVER_SHUTDOWN_S = 5
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class PodOptions:
    """Settings of the pod, shared by the Kubernetes and KServe targets."""

    image: str = field(
        default=f"mlserve:{__version__}",
        metadata={"help": "Container image built from the Dockerfile (push it to your registry and name it here)."},
    )
    name: str | None = field(default=None, metadata={"help": "Object name (default: mlserve-NAME)."})
    namespace: str | None = field(default=None, metadata={"help": "Namespace of every object (default: none set)."})
    cpu: int | None = field(
        default=None, metadata={"help": "CPU cores per pod, requested and limited (default: --threads, else 2)."}
    )
    memory_mib: int | None = field(
        default=None, metadata={"help": "Memory per pod in MiB (default: the estimate); below the estimate is refused."}
    )
    gpus: int = field(default=0, metadata={"help": "nvidia.com/gpu per pod (needs an image built with CUDA)."})
    bundles_claim: str = field(
        default="mlserve-bundles",
        metadata={"help": "PersistentVolumeClaim holding the exported bundle tars (mounted read-only)."},
    )
    keys_secret: str = field(
        default="mlserve-keys", metadata={"help": "Secret with keys.json (from $MLSERVE_HOME), with --api-keys."}
    )
    tls_secret: str = field(default="mlserve-tls", metadata={"help": "kubernetes.io/tls Secret, with --tls-cert."})
    audit_claim: str | None = field(
        default=None,
        metadata={"help": "PersistentVolumeClaim for audit logs, one folder per pod (default: the pod's emptyDir)."},
    )
    startup_seconds: int = field(
        default=600, metadata={"help": "How long loading and warming the model may take before a restart."}
    )
    pre_stop_seconds: int = field(
        default=5, metadata={"help": "Pause before SIGTERM while the endpoint leaves load balancers."}
    )
    grace_period: int | None = field(
        default=None,
        metadata={
            "help": "terminationGracePeriodSeconds (default: pause + drain + 5); below pause + drain is refused."
        },
    )


def bundle_file(name: str, version: str) -> str:
    """The file ``mlserve export NAME:VERSION -o FILE`` should write into the bundles volume."""
    return f"{name}-{version}.tar"


def object_name(plan: Plan, opts: PodOptions) -> str:
    """A DNS-1035 label (Services need one): ``--name``, else ``mlserve-NAME`` with other characters as ``-``."""
    if opts.name is not None:
        if not DNS_LABEL.fullmatch(opts.name):
            raise UsageError(
                f"Name {opts.name!r} is not a valid Kubernetes name.",
                "Use lower-case letters, digits and '-', starting with a letter, at most 63 characters.",
            )
        return opts.name
    derived = re.sub(r"[^a-z0-9-]", "-", "mlserve-" + plan.name)[:63].rstrip("-")
    if not DNS_LABEL.fullmatch(derived):
        raise UsageError(f"Cannot derive a Kubernetes name from {plan.name!r}.", "Pass --name.")
    return derived


def cpus(plan: Plan, opts: PodOptions) -> int:
    """CPU cores per pod: ``--cpu``, else ``--threads``, else 2."""
    return opts.cpu or plan.serve.threads or 2


def grace_period(plan: Plan, opts: PodOptions) -> int:
    """terminationGracePeriodSeconds: given, else the pause, the drain and the server's own shutdown."""
    if opts.grace_period is not None:
        return opts.grace_period
    return math.ceil(opts.pre_stop_seconds + plan.serve.drain_timeout + SERVER_SHUTDOWN_S)


def memory_mib(plan: Plan, opts: PodOptions) -> int:
    """Memory per pod: ``--memory-mib``, else the plan's estimate rounded up."""
    return opts.memory_mib if opts.memory_mib is not None else math.ceil(plan.memory_bytes / MIB)


def check(plan: Plan, opts: PodOptions) -> None:
    """Refuse a pod that could not serve or could not stop cleanly (UsageError, exit 2)."""
    check_settings(plan.serve)
    s = plan.serve
    follows = [m.ref for m in plan.models if m.follows]
    if follows:
        raise UsageError(
            f"{follows[0]} follows a channel, but a pod serves only the bundle it imported.",
            "Deploy a version (NAME:VERSION); roll out the next one by rendering and applying again.",
        )
    if s.host in _LOOPBACK:
        raise UsageError(
            f"--host {s.host} is unreachable from the Service and from the kubelet's probes.",
            "Pass --host 0.0.0.0 with --tls-cert/--tls-key and --api-keys (or --insecure behind a mesh with mTLS).",
        )
    for what, path, allowed in (("readiness", s.ready_path, READY_PATHS), ("liveness", s.live_path, LIVE_PATHS)):
        if path not in allowed:  # check_settings says the same; kept here so no renderer can skip it
            raise UsageError(f"The {what} probe path {path!r} is not served by mlserve.", f"Use {allowed[0]}.")
    pause, drain, grace = opts.pre_stop_seconds, plan.serve.drain_timeout, grace_period(plan, opts)
    if pause < 0 or opts.startup_seconds < 1:
        raise UsageError("--pre-stop-seconds cannot be negative and --startup-seconds must be at least 1.")
    if grace < pause + drain:
        raise UsageError(
            f"Grace period {grace} s is shorter than the preStop pause {pause} s plus the drain timeout {drain:g} s: "
            "requests still draining would be killed.",
            f"Pass --grace-period {math.ceil(pause + drain + SERVER_SHUTDOWN_S)} or more, or lower --drain-timeout.",
        )
    estimate = math.ceil(plan.memory_bytes / MIB)
    if opts.memory_mib is not None and opts.memory_mib < estimate:
        raise UsageError(
            f"--memory-mib {opts.memory_mib} is below the estimate of {estimate} MiB: the pod would be OOM-killed.",
            f"Pass --memory-mib {estimate} or more, or lower --ctx-size/--parallel.",
        )
    if s.threads is not None and opts.cpu is not None and s.threads > opts.cpu:
        raise UsageError(f"--threads {s.threads} exceeds --cpu {opts.cpu}: llama.cpp threads would fight for cores.")
    if plan.gpu and opts.gpus < 1:
        raise UsageError(
            "--gpu-layers offloads to a GPU, but the pod requests none.", "Pass --gpus 1 and a CUDA image."
        )
    if s.tls_client_ca:
        raise UsageError(
            "--tls-client-ca makes the server require client certificates, which the kubelet's probes cannot present.",
            "Require client certificates at the ingress or service mesh instead (mTLS), and drop --tls-client-ca.",
        )
    if s.tls_cert and s.tls_key and posixpath.dirname(s.tls_cert) != posixpath.dirname(s.tls_key):
        raise UsageError("--tls-cert and --tls-key must be in one directory: one Secret is mounted there.")


def pinned_args(plan: Plan, opts: PodOptions) -> list[str]:
    """``mlserve serve`` arguments with each bundle pinned by digest and threads matched to the pod's CPUs."""
    models = tuple(dataclasses.replace(m, ref=m.digest) for m in plan.models)
    # Inside a container the CPU count llama.cpp sees is the node's, not the pod's limit.
    serve = dataclasses.replace(plan.serve, threads=plan.serve.threads or cpus(plan, opts))
    return dataclasses.replace(plan, models=models, serve=serve).serve_args()


def resources(plan: Plan, opts: PodOptions) -> dict[str, Any]:
    """Requests equal to limits (Guaranteed QoS: evicted last, and CPUs can be pinned)."""
    amounts: dict[str, Any] = {"cpu": str(cpus(plan, opts)), "memory": f"{memory_mib(plan, opts)}Mi"}
    if opts.gpus:
        amounts["nvidia.com/gpu"] = str(opts.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def pod_security() -> dict[str, Any]:
    """Pod-level securityContext: the image's non-root user; Secrets readable by its group."""
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict[str, Any]:
    """Container-level securityContext: no privilege escalation, read-only root, no capabilities."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(path: str, port: int | str, scheme: str, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port, "scheme": scheme.upper()},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def probes(plan: Plan, opts: PodOptions, ready: str, live: str, port: int | str = "http") -> dict[str, Any]:
    """Startup and readiness on the ready path (503 while loading or draining), liveness on the live path."""
    scheme = plan.serve.scheme
    return {
        "startupProbe": _probe(ready, port, scheme, 2, math.ceil(opts.startup_seconds / 2), 2),
        "readinessProbe": _probe(ready, port, scheme, 5, 1, 3),
        "livenessProbe": _probe(live, port, scheme, 10, 3, 5),
    }


def lifecycle(opts: PodOptions) -> dict[str, Any]:
    """A pause before SIGTERM, so endpoints stop sending before the server starts refusing (then it drains)."""
    return {"preStop": {"exec": {"command": ["sleep", str(opts.pre_stop_seconds)]}}}


def env(plan: Plan) -> list[dict[str, Any]]:
    """``MLSERVE_HOME`` on its emptyDir, ``HOME`` on /tmp, and the pod's name (audit folder)."""
    return [
        {"name": "MLSERVE_HOME", "value": plan.serve.home},
        {"name": "HOME", "value": "/tmp"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]


def mounts(plan: Plan, opts: PodOptions, *, bundles: bool = False) -> list[dict[str, Any]]:
    """The writable emptyDirs, the read-only Secrets, and (for init containers) the bundles volume."""
    s = plan.serve
    found: list[dict[str, Any]] = [
        {"name": "mlserve-home", "mountPath": s.home},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if bundles:
        found.append({"name": "bundles", "mountPath": BUNDLES_MOUNT, "readOnly": True})
        return found
    if s.api_keys:
        # subPath: the server reads $MLSERVE_HOME/keys.json; a changed Secret reaches it on the next rollout.
        found.append(
            {"name": "keys", "mountPath": posixpath.join(s.home, "keys.json"), "subPath": "keys.json", "readOnly": True}
        )
    if s.tls_cert:
        found.append({"name": "tls", "mountPath": posixpath.dirname(s.tls_cert), "readOnly": True})
    if opts.audit_claim:
        found.append({"name": "audit", "mountPath": posixpath.join(s.home, "audit"), "subPathExpr": "$(POD_NAME)"})
    return found


def volumes(plan: Plan, opts: PodOptions) -> list[dict[str, Any]]:
    """emptyDirs sized for the imported blobs, the bundles claim, and the Secrets (group-readable only)."""
    s = plan.serve
    home_mib = math.ceil(sum(m.model_bytes for m in plan.models) / MIB) + 512  # blobs, audit, staging
    found: list[dict[str, Any]] = [
        {"name": "mlserve-home", "emptyDir": {"sizeLimit": f"{home_mib}Mi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
        {"name": "bundles", "persistentVolumeClaim": {"claimName": opts.bundles_claim, "readOnly": True}},
    ]
    if s.api_keys:
        found.append({"name": "keys", "secret": {"secretName": opts.keys_secret, "defaultMode": 0o440}})
    if s.tls_cert and s.tls_key:
        items = [{"key": "tls.crt", "path": posixpath.basename(s.tls_cert)}]
        items.append({"key": "tls.key", "path": posixpath.basename(s.tls_key)})
        found.append({"name": "tls", "secret": {"secretName": opts.tls_secret, "defaultMode": 0o440, "items": items}})
    if opts.audit_claim:
        found.append({"name": "audit", "persistentVolumeClaim": {"claimName": opts.audit_claim}})
    return found


def init_containers(plan: Plan, opts: PodOptions) -> list[dict[str, Any]]:
    """Per bundle: import its tar into the pod's store, then verify the digest (the pod starts only if it matches)."""
    steps: list[dict[str, Any]] = []
    for i, m in enumerate(plan.models):
        for step, args in (
            ("import", ["import", posixpath.join(BUNDLES_MOUNT, bundle_file(m.name, m.version))]),
            ("verify", ["verify", m.digest]),
        ):
            steps.append(
                {
                    "name": f"{step}-{i}",
                    "image": opts.image,
                    "args": args,
                    "env": env(plan),
                    # Same as the server's: the pod's request stays the server's, and QoS stays Guaranteed.
                    "resources": resources(plan, opts),
                    "securityContext": container_security(),
                    "volumeMounts": mounts(plan, opts, bundles=True),
                }
            )
    return steps


def port(plan: Plan) -> dict[str, Any]:
    """The container port, named ``http`` (probes and Services refer to the name)."""
    return {"name": "http", "containerPort": plan.serve.port, "protocol": "TCP"}


class _Plain(yaml.SafeDumper):
    """Writes a repeated value (labels used as selectors) out again instead of as an anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(docs: list[dict[str, Any]], header: str) -> str:
    """YAML documents in the given order, keys as written, after a comment header."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    text = yaml.dump_all(docs, Dumper=_Plain, sort_keys=False, default_flow_style=False, width=1000)
    return comment + text
