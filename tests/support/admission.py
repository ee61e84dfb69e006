"""What the API server does to a FineTuneJob (or FineTuneSweep) on create/update, emulated from the generated CRD.

Structural defaulting, strict field validation (unknown fields rejected, as `kubectl apply` asks for), the
uniqueness of keys in `x-kubernetes-list-type: map` lists,
the openAPIV3Schema checked by a JSON-schema validator, and every `x-kubernetes-validations` CEL rule
evaluated with cel-python (transition rules too, when an old object is given). Tests use it to prove the
CRD rejects what the models reject, with a message naming the field.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "kubetune.dev_finetunejobs.yaml"
CRD_PATHS = {"FineTuneJob": CRD_PATH, "FineTuneSweep": CRD_PATH.with_name("kubetune.dev_finetunesweeps.yaml")}


@cache
def crd(kind: str = "FineTuneJob") -> dict[str, Any]:
    return yaml.safe_load(CRD_PATHS[kind].read_text())


def crd_schema(kind: str = "FineTuneJob") -> dict[str, Any]:
    return crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting: absent fields with a default get it, then their children are defaulted."""
    if isinstance(value, dict) and "properties" in schema:
        for name, child in schema["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(value[name], child)
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key in value:
            value[key] = apply_defaults(value[key], schema["additionalProperties"])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as strict field validation sees it: objects with known properties allow no others."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {name: _strict(child) for name, child in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = _strict(schema["items"])
    return out


@cache
def _validator(kind: str) -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 schemas use draft-4 style boolean exclusiveMinimum/exclusiveMaximum.
    return jsonschema.Draft4Validator(_strict(crd_schema(kind)))


def _path(parts: Any) -> str:
    return ".".join(str(part) for part in parts)


_CEL = celpy.Environment()


@cache
def _program(rule: str) -> Any:
    return _CEL.program(_CEL.compile(rule))


def _as_cel_sees_it(value: Any, schema: dict[str, Any]) -> Any:
    """`value` with every integer in a `number` field made a double, as the apiserver hands it to CEL
    (`evalSplit: 0` arrives as JSON integer 0; `self < 0.5` compares it as 0.0)."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict) and "properties" in schema:
        return {key: _as_cel_sees_it(child, schema["properties"].get(key, {})) for key, child in value.items()}
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {key: _as_cel_sees_it(child, schema["additionalProperties"]) for key, child in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_as_cel_sees_it(item, schema["items"]) for item in value]
    return value


def _cel_errors(value: Any, old: Any, schema: dict[str, Any], path: list[str]) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"] and old is None:
            continue  # transition rules apply to updates only
        activation = {"self": celpy.json_to_cel(_as_cel_sees_it(value, schema))}
        if old is not None:
            activation["oldSelf"] = celpy.json_to_cel(_as_cel_sees_it(old, schema))
        outcome = _program(rule["rule"]).evaluate(activation)
        if isinstance(outcome, celpy.CELEvalError):
            raise AssertionError(f"CEL rule {rule['rule']!r} failed to evaluate at {_path(path)}: {outcome}")
        if not outcome:
            errors.append(f"{_path(path)}: {rule['message']}" if path else rule["message"])
    if isinstance(value, dict):
        children = schema.get("properties", {})
        for name, child in children.items():
            if name in value:
                old_child = old.get(name) if isinstance(old, dict) else None
                errors += _cel_errors(value[name], old_child, child, [*path, name])
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += _cel_errors(item, None, schema["items"], [*path, str(index)])
    return errors


def _list_map_errors(value: Any, schema: dict[str, Any], path: list[str]) -> list[str]:
    """A list of `x-kubernetes-list-type: map` holds each key (e.g. a name) once: "Duplicate value"."""
    errors = []
    if isinstance(value, list) and schema.get("x-kubernetes-list-type") == "map":
        keys = [tuple(item.get(key) for key in schema["x-kubernetes-list-map-keys"]) for item in value]
        errors += [f"{_path(path)}[{i}]: Duplicate value: {key}" for i, key in enumerate(keys) if key in keys[:i]]
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name in value:
                errors += _list_map_errors(value[name], child, [*path, name])
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += _list_map_errors(item, schema["items"], [*path, str(index)])
    return errors


def admit(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Errors the API server would answer for this create (or update, with `old`); [] if admitted."""
    kind = obj.get("kind") if obj.get("kind") in CRD_PATHS else "FineTuneJob"
    served = f"{crd(kind)['spec']['group']}/{crd(kind)['spec']['versions'][0]['name']}"
    if obj.get("apiVersion") != served:  # the request would be routed nowhere
        return [f'apiVersion: no matches for kind "{obj.get("kind")}" in version "{obj.get("apiVersion")}"']
    schema = crd_schema(kind)
    defaulted = apply_defaults(copy.deepcopy(obj), schema)
    schema_errors = sorted(
        f"{_path(error.absolute_path)}: {error.message}" for error in _validator(kind).iter_errors(defaulted)
    ) + _list_map_errors(defaulted, schema, [])
    if schema_errors:
        return schema_errors  # the API server runs CEL only on schema-valid objects
    old_defaulted = apply_defaults(copy.deepcopy(old), schema) if old is not None else None
    return _cel_errors(defaulted, old_defaulted, schema, [])
