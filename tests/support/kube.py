"""Offline validation of rendered Kubernetes objects: Kubernetes' own schemas, and KServe's models.

Built-in kinds are checked with ``kubernetes-validate`` in strict mode (an unknown field is an
error, as ``kubectl apply --validate=strict`` makes it). KServe's kinds are checked against the
``kserve`` package's generated models, which name every field of ServingRuntime and
InferenceService, down into the ``kubernetes`` client's models for the pod fields they embed:
every key must be a field of its model, every value of its declared type, and each model is
constructed with client-side validation on, so a missing required field (a container's name)
or a value outside an enum is refused too.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

K8S_VERSIONS = ("1.35.0", "1.37.0")  # the oldest and newest release the offline schemas know and upstream supports
# kserve writes ``list[X]`` and ``dict(str, X)``; the kubernetes client ``List[X]`` and ``Dict[str, X]``.
_LIST = re.compile(r"[Ll]ist\[(.+)\]")
_DICT = re.compile(r"dict\(str, (.+)\)|Dict\[str, (.+)\]")
_SCALARS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
    "ResourceQuantity": (str, int, float),
}


class Invalid(AssertionError):
    """A rendered object does not match its schema; the message names the field's path."""


def documents(text: str) -> list[dict[str, Any]]:
    """Every YAML document in ``text``."""
    return [d for d in yaml.safe_load_all(text) if d is not None]


def validate_k8s(doc: dict[str, Any], versions: tuple[str, ...] = K8S_VERSIONS) -> None:
    """Strict schema validation of a built-in kind for each Kubernetes version; Invalid on the first error."""
    import kubernetes_validate

    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise Invalid(f"{doc['kind']} for Kubernetes {version}: {exc.message} at {list(exc.path)}") from exc


def _model(name: str) -> Any:
    import kserve
    import kubernetes.client

    found = getattr(kserve, name, None) or getattr(kubernetes.client, name, None)
    if found is None:
        raise Invalid(f"no model named {name}")
    return found


def build(value: Any, kind: str, path: str = "") -> Any:
    """``value`` as an instance of ``kind`` (an OpenAPI type string); Invalid naming ``path`` when it is not one."""
    if kind == "object":
        return value
    if kind in _SCALARS:
        if isinstance(value, bool) and kind != "bool" or not isinstance(value, _SCALARS[kind]):
            raise Invalid(f"{path}: expected {kind}, got {type(value).__name__} {value!r}")
        return value
    if m := _LIST.fullmatch(kind):
        if not isinstance(value, list):
            raise Invalid(f"{path}: expected a list")
        return [build(v, m.group(1), f"{path}[{i}]") for i, v in enumerate(value)]
    if m := _DICT.fullmatch(kind):
        if not isinstance(value, dict):
            raise Invalid(f"{path}: expected a mapping")
        inner = m.group(1) or m.group(2)
        return {k: build(v, inner, f"{path}.{k}") for k, v in value.items()}
    cls = _model(kind)
    if not isinstance(value, dict):
        raise Invalid(f"{path}: expected a {kind} mapping")
    by_json = {j: a for a, j in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(by_json))
    if unknown:
        raise Invalid(f"{path}: {kind} has no field {', '.join(unknown)}")
    kwargs = {by_json[k]: build(v, cls.openapi_types[by_json[k]], f"{path}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise Invalid(f"{path}: {kind}: {exc}") from exc


def validate_kserve(doc: dict[str, Any]) -> Any:
    """A KServe object (``serving.kserve.io/VERSION``, its kind) built from the kserve package's models."""
    group, _, version = doc["apiVersion"].partition("/")
    if group != "serving.kserve.io":
        raise Invalid(f"{doc['apiVersion']} is not a KServe API")
    return build(doc, f"V{version[1:]}{doc['kind']}", doc["kind"])
