"""``mlserve deploy TARGET REF ...``: render the configuration of an existing engine for bundles.

Each target is one renderer module, ``mlserve.deploy.<target>``, with an ``Options`` dataclass
and ``render(plan, opts) -> {path: text}`` (see ``mlserve/deploy/plan.py``). The flags every
target shares (how ``mlserve serve`` runs) are declared here once; each target's own flags are
made from its ``Options`` fields, so a renderer adds a flag by adding a field.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import typer

from mlserve.bundles.store import Store
from mlserve.cli.app import app
from mlserve.cli.console import emit_json, info
from mlserve.deploy.plan import Plan, ServeSettings, build_plan
from mlserve.errors import UsageError

TARGETS = {
    "systemd": "A hardened systemd unit for one on-prem server.",
    "haproxy": "haproxy.cfg for two or more servers: health checks, leastconn, retries of unanswered requests.",
    "k8s": "Kubernetes Deployment, Service, PodDisruptionBudget, autoscaler and Dockerfile.",
    "kserve": "KServe ServingRuntime and InferenceService.",
    "ray": "A Ray Serve application running one mlserve engine per replica.",
}
deploy_app = typer.Typer(
    help="Render configuration for systemd, HAProxy, Kubernetes, KServe or Ray.", no_args_is_help=True
)
app.add_typer(deploy_app, name="deploy")


def _opt(default: Any, *names: str, help: str, **kw: Any) -> Any:
    return typer.Option(default, *names, help=help, **kw)


# name -> (annotation, typer default): the `mlserve serve` settings every target renders from.
_COMMON: dict[str, tuple[Any, Any]] = {
    "output": (Optional[Path], _opt(None, "-o", "--output", help="Write the files into this directory.")),
    "as_json": (bool, _opt(False, "--json", help="Print one JSON document (plan and files) on stdout.")),
    "host": (str, _opt("127.0.0.1", "--host", help="Address `mlserve serve` binds on the target.")),
    "port": (int, _opt(8000, "--port", help="Port `mlserve serve` listens on.")),
    "ctx_size": (Optional[int], _opt(None, "--ctx-size", min=16, help="Context per sequence (default: recipe's).")),
    "parallel": (Optional[int], _opt(None, "--parallel", min=1, max=256, help="Sequences decoded together.")),
    "threads": (Optional[int], _opt(None, "--threads", min=1, help="CPU threads.")),
    "gpu_layers": (Optional[int], _opt(None, "--gpu-layers", min=-1, help="Layers offloaded to a GPU.")),
    "request_timeout": (float, _opt(600.0, "--request-timeout", min=0, help="Per-request deadline, s (0: none).")),
    "drain_timeout": (float, _opt(30.0, "--drain-timeout", min=0, help="Seconds in-flight requests get on SIGTERM.")),
    "max_queue": (int, _opt(64, "--max-queue", min=0, help="Requests that may wait per model.")),
    "tls_cert": (Optional[str], _opt(None, "--tls-cert", help="Server certificate path on the target (HTTPS).")),
    "tls_key": (Optional[str], _opt(None, "--tls-key", help="Server key path on the target.")),
    "tls_client_ca": (Optional[str], _opt(None, "--tls-client-ca", help="Require client certificates (path).")),
    "api_keys": (bool, _opt(False, "--api-keys", help="The server has API keys (`mlserve keys create`).")),
    "insecure": (bool, _opt(False, "--insecure", help="Serve a non-loopback address without TLS and keys.")),
    "home": (str, _opt("/var/lib/mlserve", "--home", help="MLSERVE_HOME on the target.")),
    "exec_path": (str, _opt("/usr/local/bin/mlserve", "--exec-path", help="The mlserve executable on the target.")),
    "route_prefix": (Optional[str], _opt(None, "--route-prefix", help="OpenAI routes also under this prefix.")),
    "ready_path": (str, _opt("/health/ready", "--ready-path", help="Readiness probe path.")),
    "live_path": (str, _opt("/health/live", "--live-path", help="Liveness probe path.")),
}
_SERVE_FIELDS = {f.name for f in dataclasses.fields(ServeSettings)}


def _target_module(target: str) -> types.ModuleType | None:
    """``mlserve.deploy.<target>``, or None while that renderer is not built."""
    try:
        return importlib.import_module(f"mlserve.deploy.{target}")
    except ModuleNotFoundError as exc:
        if exc.name != f"mlserve.deploy.{target}":
            raise
        return None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option_param(f: dataclasses.Field[Any], hint: Any) -> inspect.Parameter:
    """A typer option for one ``Options`` field."""
    help_text = f.metadata.get("help", "")
    # Options fields all have defaults (plan.py's interface); a factory's value is built once here.
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    args = typing.get_args(hint)
    if hint is bool:
        flag = _flag(f.name)
        return _param(f.name, bool, typer.Option(default, f"{flag}/--no-{flag[2:]}", help=help_text))
    if typing.get_origin(hint) is tuple:  # tuple[str, ...]: a repeatable flag
        return _param(f.name, Optional[list[args[0]]], typer.Option(None, _flag(f.name), help=help_text))  # type: ignore[valid-type]
    return _param(f.name, hint, typer.Option(default, _flag(f.name), help=help_text))


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _options(module: types.ModuleType, values: dict[str, Any]) -> Any:
    """The target's ``Options`` from its flags' values (lists back to tuples)."""
    cls = module.Options
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = values[f.name]
        if typing.get_origin(hints[f.name]) is tuple:
            value = tuple(value or ())
        kwargs[f.name] = value
    return cls(**kwargs)


def _safe_path(rel: str) -> PurePosixPath:
    """A renderer's relative path, refused if it would escape the output directory."""
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise UsageError(f"Renderer produced an unsafe path {rel!r}.")
    return path


def _write(files: dict[str, str], out: Path) -> list[str]:
    written = []
    for rel, text in files.items():
        dest = out.joinpath(*_safe_path(rel).parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        written.append(str(dest))
    return written


def _describe(plan: Plan) -> dict[str, Any]:
    """The plan as JSON: settings, models with their estimates, total memory."""
    models = [{**dataclasses.asdict(m), "kv_bytes": m.kv_bytes, "memory_bytes": m.memory_bytes} for m in plan.models]
    return {"models": models, "serve": dataclasses.asdict(plan.serve), "memory_bytes": plan.memory_bytes}


def _run(target: str, module: types.ModuleType | None, refs: list[str], values: dict[str, Any]) -> None:
    if module is None:
        raise UsageError(f"The {target} renderer is not part of this build of mlserve.")
    settings = ServeSettings(**{k: v for k, v in values.items() if k in _SERVE_FIELDS})
    plan = build_plan(Store(), refs, settings)
    files: dict[str, str] = module.render(plan, _options(module, values))
    out: Path | None = values["output"]
    written = _write(files, out) if out is not None else []
    if values["as_json"]:
        emit_json({"target": target, "plan": _describe(plan), "files": files, "written": written})
        return
    for path in written:
        info(f"wrote {path}")
    if out is None:
        for rel, text in files.items():
            if len(files) > 1:
                typer.echo(f"# ==> {rel} <==")
            typer.echo(text, nl=not text.endswith("\n"))


def _register(target: str, help_text: str) -> None:
    module = _target_module(target)
    params = [
        inspect.Parameter(
            "refs",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Argument(..., help="Bundles: NAME, NAME:VERSION, NAME@CHANNEL (followed) or sha256:HEX."),
            annotation=list[str],
        )
    ]
    params += [_param(name, ann, default) for name, (ann, default) in _COMMON.items()]
    own: list[str] = []
    if module is not None:
        hints = typing.get_type_hints(module.Options)
        for f in dataclasses.fields(module.Options):
            if f.name in _COMMON or f.name == "refs":
                raise RuntimeError(f"mlserve.deploy.{target}.Options.{f.name} clashes with a common deploy flag")
            params.append(_option_param(f, hints[f.name]))
            own.append(f.name)

    def command(**kwargs: Any) -> None:
        refs = kwargs.pop("refs")
        _run(target, module, refs, kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = help_text
    deploy_app.command(name=target, help=help_text)(command)


for _target, _help in TARGETS.items():
    _register(_target, _help)
