"""Which JSON Schemas a grammar can enforce, and the plain schema the grammar converter is given.

llama.cpp's JSON-Schema-to-GBNF converter (``llama_cpp.llama_grammar``) looks at each schema node's
first recognised keyword and silently drops the others: ``{"type": "string", "pattern": ...}``
becomes "any string", ``{"type": "integer", "minimum": 1}`` "any integer". ``check_schema`` walks a
schema the way the converter will and refuses (InvalidRequest: 400, naming the keyword) every
keyword the grammar would not enforce, so a response is never a 200 that ignored the schema.

What it accepts, and returns in the plain form the converter handles exactly: ``type`` (one or
a list), ``enum``, ``const``, ``properties`` + ``required`` + ``additionalProperties`` (false, or a
schema when there are no ``properties``), ``items`` / ``prefixItems`` + ``minItems`` / ``maxItems``,
``minLength`` / ``maxLength``, ``format`` uuid / date / time / date-time, ``anyOf``, ``oneOf`` whose
branches cannot overlap (then anyOf is exact), ``allOf`` of one schema or of object schemas with
distinct properties (merged), local ``$ref`` (``#/...``, inlined), ``{}`` / ``true`` (any value),
and annotations (title, description, default, examples, ...), which constrain nothing.

Refused: ``pattern``, ``patternProperties``, ``propertyNames``, ``minimum`` / ``maximum`` /
``exclusiveMinimum`` / ``exclusiveMaximum`` / ``multipleOf``, ``minProperties`` / ``maxProperties``,
``uniqueItems: true``, ``contains`` (and its min/max), ``not``, ``if`` / ``then`` / ``else``,
``dependentRequired`` / ``dependentSchemas`` / ``dependencies``, ``unevaluated*``, other
``format`` values, remote or recursive ``$ref``, ``$dynamicRef`` and anchors, ``nullable``,
``additionalProperties`` beside ``properties`` (the grammar could repeat a declared key),
``required`` naming an undeclared property, overlapping ``oneOf`` branches, keywords beside
``$ref`` / ``anyOf`` / ``const`` / ``enum`` that the converter would drop, ``false`` schemas, and
keywords mlserve does not know. Sizes are bounded so a schema cannot grow a grammar without limit.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

from mlserve.engine.api import InvalidRequest

MAX_REPEAT = 256  # largest minLength/maxLength/minItems/maxItems (the grammar spells each repeat out)
MAX_NODES = 4096  # schema nodes (and enum values) after $refs are inlined
MAX_DEPTH = 48
MAX_ONE_OF = 64  # oneOf branches, checked pairwise for overlap
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
ANY: dict[str, Any] = {"type": ["object", "array", "string", "number", "boolean", "null"]}
FORMATS = ("uuid", "date", "time", "date-time")
ANNOTATIONS = frozenset(
    ("title", "description", "default", "examples", "example", "$comment", "deprecated", "readOnly", "writeOnly")
    + ("$schema", "discriminator", "$defs", "definitions")
)
# Keywords named in refusals (a key outside this list is client text, so it is not echoed).
KNOWN = (
    frozenset(
        """$ref $id $anchor $dynamicRef $dynamicAnchor $recursiveRef $recursiveAnchor $vocabulary type enum const
    properties required additionalProperties patternProperties propertyNames minProperties maxProperties
    items prefixItems additionalItems minItems maxItems uniqueItems contains minContains maxContains
    minLength maxLength pattern format contentEncoding contentMediaType contentSchema minimum maximum
    exclusiveMinimum exclusiveMaximum multipleOf anyOf oneOf allOf not if then else dependentRequired
    dependentSchemas dependencies unevaluatedProperties unevaluatedItems nullable xml externalDocs""".split()
    )
    | ANNOTATIONS
)
# Keywords that apply to one instance type only: a ``type`` list with them is split into anyOf.
FOR_TYPE = {
    "string": {"minLength", "maxLength", "format", "pattern"},
    "array": {"items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems"},
    "object": {"properties", "required", "additionalProperties"},
}


class _Walk:
    """One schema's walk: the root (for ``$ref``), the refs being expanded, and the size so far."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.nodes = 0

    def refuse(self, keyword: str, path: tuple[str, ...], why: str = "") -> InvalidRequest:
        name = f"'{keyword}'" if keyword in KNOWN else "a keyword mlserve does not know"
        where = f" (at {'/'.join(path)})" if path else ""
        reason = f": {why}" if why else ""
        return InvalidRequest(f"The JSON schema uses {name}{where}, which mlserve cannot enforce{reason}.")

    def node(self, schema: Any, path: tuple[str, ...], refs: tuple[str, ...]) -> dict[str, Any]:
        """The plain form of one schema node (see the module docstring)."""
        self.nodes += 1
        if self.nodes > MAX_NODES or len(path) > MAX_DEPTH:
            raise InvalidRequest(f"The JSON schema is too large or too deep to enforce (limits: {MAX_NODES} nodes).")
        if schema is True:
            return dict(ANY)
        if not isinstance(schema, dict):
            raise self.refuse("type", path, "every schema must be a JSON object (or true)")
        if "$id" in schema and path:
            raise self.refuse("$id", path, "only the root may set $id")
        body = {k: v for k, v in schema.items() if k not in ANNOTATIONS and k != "$id" and not k.startswith("x-")}
        if "$ref" in body:
            self._only(body, {"$ref"}, path, "beside $ref")
            return self._ref(body["$ref"], path, refs)
        if "oneOf" in body or "anyOf" in body:
            return self._union(body, path, refs)
        if "const" in body or "enum" in body:
            return self._values(body, path)
        kind = body.get("type")
        if isinstance(kind, list):
            return self._type_list(body, path, refs)
        if kind is not None and kind not in TYPES:
            raise self.refuse("type", path, f"the type must be one of {', '.join(TYPES)}")
        if "allOf" in body:
            return self._all_of(body, path, refs)
        if kind == "object" or kind is None and ("properties" in body or "additionalProperties" in body):
            return self._object(body, path, refs)
        if kind == "array" or kind is None and ("items" in body or "prefixItems" in body):
            return self._array(body, path, refs)
        if kind == "string" or kind is None and body.keys() & FOR_TYPE["string"]:
            return self._string(body, path)
        if kind is None:
            if body:
                key = next(iter(body))
                raise self.refuse(key, path, "it is not enforced by the grammar")
            return dict(ANY)
        self._only(body, {"type"}, path, f"for type {kind}")
        return {"type": kind}

    def _only(self, body: dict[str, Any], allowed: set[str], path: tuple[str, ...], where: str) -> None:
        for key in body:
            if key not in allowed:
                raise self.refuse(key, path, f"it is not enforced {where}")

    def _ref(self, ref: Any, path: tuple[str, ...], refs: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")) or "%" in ref:
            raise self.refuse("$ref", path, "only references inside the schema ('#/...') are supported")
        if ref in refs:
            raise self.refuse("$ref", path, "recursive references are not supported")
        target = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            else:
                raise self.refuse("$ref", path, "it points to nothing in the schema")
        return self.node(target, path + ("$ref",), refs + (ref,))

    def _union(self, body: dict[str, Any], path: tuple[str, ...], refs: tuple[str, ...]) -> dict[str, Any]:
        key = "oneOf" if "oneOf" in body else "anyOf"
        self._only(body, {key}, path, f"beside {key}")
        options = body[key]
        if not isinstance(options, list) or not options:
            raise self.refuse(key, path, "it must be a non-empty list of schemas")
        if key == "oneOf" and len(options) > MAX_ONE_OF:
            raise self.refuse(key, path, f"more than {MAX_ONE_OF} branches cannot be checked for overlap")
        plain = [self.node(o, path + (key, str(i)), refs) for i, o in enumerate(options)]
        if key == "oneOf" and not all(_disjoint(a, b) for a, b in itertools.combinations(plain, 2)):
            raise self.refuse(key, path, "its branches may overlap (exactly one must match); use anyOf")
        return plain[0] if len(plain) == 1 else {"anyOf": plain}

    def _type_list(self, body: dict[str, Any], path: tuple[str, ...], refs: tuple[str, ...]) -> dict[str, Any]:
        kinds = body["type"]
        if not kinds or len(set(map(str, kinds))) != len(kinds) or any(k not in TYPES for k in kinds):
            raise self.refuse("type", path, f"a type list must hold distinct types among {', '.join(TYPES)}")
        rest = {k: v for k, v in body.items() if k != "type"}
        typed = set().union(*FOR_TYPE.values())
        self._only(rest, typed, path, "beside a list of types")
        if not rest:
            return {"type": list(kinds)} if len(kinds) > 1 else {"type": kinds[0]}
        # Type-specific keywords bind only instances of their type: one branch per type is exact.
        branches = [{"type": k, **{n: v for n, v in rest.items() if n in FOR_TYPE.get(k, set())}} for k in kinds]
        return self._union({"anyOf": branches}, path, refs)

    def _values(self, body: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        key = "const" if "const" in body else "enum"
        self._only(body, {key, "type"}, path, f"beside {key}")
        values = [body["const"]] if key == "const" else body["enum"]
        if key == "enum" and (not isinstance(values, list) or not values):
            raise self.refuse("enum", path, "it must be a non-empty list")
        self.nodes += len(values)
        kind = body.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else None
        if kinds is not None and any(k not in TYPES for k in kinds):
            raise self.refuse("type", path, f"the type must be one of {', '.join(TYPES)}")
        for value in values:
            if not _finite(value):
                raise self.refuse(key, path, "it holds a number JSON cannot carry (NaN or infinity)")
            if kinds is not None and not any(_is_type(value, k) for k in kinds):
                raise self.refuse(key, path, f"it holds a value that is not of type {'/'.join(map(str, kinds))}")
        return {"const": values[0]} if key == "const" else {"enum": list(values)}

    def _all_of(self, body: dict[str, Any], path: tuple[str, ...], refs: tuple[str, ...]) -> dict[str, Any]:
        self._only(body, {"allOf"}, path, "beside allOf")
        parts = body["allOf"]
        if not isinstance(parts, list) or not parts:
            raise self.refuse("allOf", path, "it must be a non-empty list of schemas")
        plain = [self.node(p, path + ("allOf", str(i)), refs) for i, p in enumerate(parts)]
        if len(plain) == 1:
            return plain[0]
        merged: dict[str, Any] = {}
        required: list[str] = []
        for part in plain:
            props = part.get("properties")
            if part.get("type") != "object" or props is None or "additionalProperties" in part:
                raise self.refuse("allOf", path, "only object schemas with properties can be combined")
            if merged.keys() & props.keys():
                raise self.refuse("allOf", path, "two parts declare the same property")
            merged.update(props)
            required += part.get("required", [])
        return {"type": "object", "properties": merged, "required": required}

    def _object(self, body: dict[str, Any], path: tuple[str, ...], refs: tuple[str, ...]) -> dict[str, Any]:
        self._only(body, {"type", "properties", "required", "additionalProperties"}, path, "for objects")
        props = body.get("properties", {})
        if not isinstance(props, dict):
            raise self.refuse("properties", path, "it must map names to schemas")
        required = body.get("required", [])
        if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
            raise self.refuse("required", path, "it must be a list of property names")
        if any(r not in props for r in required) or len(set(required)) != len(required):
            raise self.refuse("required", path, "it names a property that is not in properties (or twice)")
        extra = body.get("additionalProperties")
        out: dict[str, Any] = {"type": "object"}
        if "properties" in body:
            if extra is not None and extra is not False:
                raise self.refuse("additionalProperties", path, "only false is enforced beside properties")
            out["properties"] = {k: self.node(v, path + ("properties", "*"), refs) for k, v in props.items()}
            out["required"] = list(required)
        elif extra is False:
            out["additionalProperties"] = False  # only {}
        elif extra is not None and extra is not True and extra != {}:
            out["additionalProperties"] = self.node(extra, path + ("additionalProperties",), refs)
        return out

    def _array(self, body: dict[str, Any], path: tuple[str, ...], refs: tuple[str, ...]) -> dict[str, Any]:
        allowed = {"type", "items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems"}
        self._only(body, allowed, path, "for arrays")
        if body.get("uniqueItems", False) is not False:
            raise self.refuse("uniqueItems", path, "the grammar cannot keep items distinct")
        low, high = self._bounds(body, "minItems", "maxItems", path)
        items = body.get("items")
        tuple_items = body.get("prefixItems", items if isinstance(items, list) else None)
        if tuple_items is not None and not isinstance(tuple_items, list):
            raise self.refuse("prefixItems", path, "it must be a list of schemas")
        if "prefixItems" in body and not (items is None or items is False or items is True):
            raise self.refuse("prefixItems", path, "items beside prefixItems is not enforced")
        if tuple_items is not None or items is False:
            fixed = [self.node(s, path + ("prefixItems", str(i)), refs) for i, s in enumerate(tuple_items or [])]
            if low > len(fixed) or high is not None and high < len(fixed):
                raise self.refuse("minItems", path, "a tuple has exactly as many items as it lists")
            return {"type": "array", "prefixItems": fixed}
        each = dict(ANY) if items is None or items is True or items == {} else self.node(items, path + ("items",), refs)
        out: dict[str, Any] = {"type": "array", "items": each}
        if low:
            out["minItems"] = low
        if high is not None:
            out["maxItems"] = high
        return out

    def _string(self, body: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        self._only(body, {"type", "minLength", "maxLength", "format", "pattern"}, path, "for strings")
        if "pattern" in body:
            raise self.refuse("pattern", path, "the converter's regular expressions can break JSON escaping")
        fmt = body.get("format")
        if fmt is not None:
            if fmt not in FORMATS:
                raise self.refuse("format", path, f"only {', '.join(FORMATS)} are enforced")
            if "minLength" in body or "maxLength" in body:
                raise self.refuse("minLength" if "minLength" in body else "maxLength", path, "beside format")
            return {"type": "string", "format": fmt}
        low, high = self._bounds(body, "minLength", "maxLength", path)
        out: dict[str, Any] = {"type": "string"}
        if low or high is not None:
            out["minLength"] = low
            if high is not None:
                out["maxLength"] = high
        return out

    def _bounds(self, body: dict[str, Any], lo: str, hi: str, path: tuple[str, ...]) -> tuple[int, int | None]:
        for key in (lo, hi):
            value = body.get(key)
            if value is not None and (not _is_type(value, "integer") or not 0 <= value <= MAX_REPEAT):
                raise self.refuse(key, path, f"it must be a whole number from 0 to {MAX_REPEAT}")
        low = int(body.get(lo) or 0)
        high = body.get(hi)
        if high is not None and int(high) < low:
            raise self.refuse(hi, path, f"it is below {lo}")
        return low, None if high is None else int(high)


def check_schema(schema: Any) -> dict[str, Any]:
    """The plain, enforceable form of ``schema``; InvalidRequest naming the first keyword that is not."""
    if not isinstance(schema, dict):
        raise InvalidRequest("The JSON schema must be a JSON object.")
    try:
        return _Walk(schema).node(schema, (), ())
    except RecursionError:
        raise InvalidRequest("The JSON schema is nested too deeply to enforce.") from None


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _is_type(value: Any, kind: str) -> bool:
    """JSON Schema's type test (1.0 is an integer; booleans are not numbers)."""
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int) or isinstance(value, float) and value.is_integer()
    classes: dict[str, Any] = {"number": (int, float), "string": str, "array": list, "object": dict}
    return isinstance(value, classes[kind])


def _types(plain: dict[str, Any]) -> set[str]:
    """The instance types a plain schema admits (integer counted as number)."""
    if "anyOf" in plain:
        return set().union(*(_types(p) for p in plain["anyOf"]))
    if "const" in plain or "enum" in plain:
        values = [plain["const"]] if "const" in plain else plain["enum"]
        return {next(t for t in TYPES if t != "integer" and _is_type(v, t)) for v in values}
    kinds = plain["type"] if isinstance(plain["type"], list) else [plain["type"]]
    return {"number" if k == "integer" else k for k in kinds}


def _values(plain: dict[str, Any]) -> set[str] | None:
    """The admitted values (canonical JSON) when the schema is a const or an enum."""
    if "const" in plain or "enum" in plain:
        values = [plain["const"]] if "const" in plain else plain["enum"]
        return {json.dumps(v, sort_keys=True) for v in values}
    return None


def _disjoint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether no instance can match both: distinct types, distinct constants, or a distinct tag property."""
    if not _types(a) & _types(b):
        return True
    va, vb = _values(a), _values(b)
    if va is not None and vb is not None:
        return not va & vb
    if a.get("type") == b.get("type") == "object" and "properties" in a and "properties" in b:
        for name in set(a.get("required", ())) & set(b.get("required", ())):
            ta, tb = _values(a["properties"][name]), _values(b["properties"][name])
            if ta is not None and tb is not None and not ta & tb:
                return True
    return False
