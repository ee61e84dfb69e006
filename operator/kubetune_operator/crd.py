"""The FineTuneJob CustomResourceDefinition, generated from the API models (the one source of truth).

Pydantic writes JSON Schema (draft 2020-12); Kubernetes wants a *structural* OpenAPI v3 schema: no $ref,
no anyOf-with-null, boolean exclusive bounds, every node typed. `finetunejob_crd()` converts one into
the other and adds what only Kubernetes knows: printer columns, the status subresource, CEL rules that
cross whole sections (name length, immutability).
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic.json_schema import GenerateJsonSchema

from kubetune_operator import API_GROUP, API_VERSION, KIND, PLURAL, SWEEP_KIND, SWEEP_PLURAL
from kubetune_operator.api import (
    IMMUTABLE_SECTIONS,
    MAX_NAME_LENGTH,
    MAX_SWEEP_NAME_LENGTH,
    SCHEDULING_IMMUTABLE,
    FineTuneJob,
    FineTuneSweep,
)

_DROPPED_KEYS = {"title", "additionalProperties", "discriminator"}
_ROOT_DESCRIPTION = (
    "A FineTuneJob fine-tunes a language model (QLoRA by default) from object storage to object storage. "
    "kubetune runs it as a batch/v1 Job and reports progress, results and failures in its status."
)


class _WithFactoryDefaults(GenerateJsonSchema):
    """Pydantic leaves out defaults made by a default_factory; Kubernetes should apply them too."""

    def default_schema(self, schema: Any) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            schema = {key: value for key, value in schema.items() if key != "default_factory"}
            schema["default"] = factory()
        return super().default_schema(schema)


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every $ref (the models have no recursion)."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        # Keys beside a $ref (a field's description, default) win over the referenced model's.
        merged = {**target, **{key: value for key, value in node.items() if key != "$ref"}}
        return _resolve(merged, defs)
    return {key: _resolve(value, defs) for key, value in node.items()}


# JSON Schema bound -> (CEL operator, words for the message).
_CEL_BOUNDS = {
    "minimum": (">=", "at least"),
    "exclusiveMinimum": (">", "greater than"),
    "maximum": ("<=", "at most"),
    "exclusiveMaximum": ("<", "less than"),
}


def _fractional_bounds_as_rules(node: dict[str, Any]) -> dict[str, Any]:
    """A `number` node's fractional bounds, as CEL rules.

    kube-apiserver checks a bound against a value that arrived as an integer by first truncating the bound
    to an integer (kube-openapi's MaximumNativeType: `int64(0.5) == 0`), so `evalSplit: 0` would fail
    `exclusiveMaximum: 0.5`. CEL sees a `number` field as a double whatever the JSON looked like.
    """
    if node.get("type") != "number":
        return node
    rules = []
    for key, (operator, words) in _CEL_BOUNDS.items():
        bound = node.get(key)
        if isinstance(bound, float) and not bound.is_integer():
            del node[key]
            rules.append({"rule": f"self {operator} {bound!r}", "message": f"must be {words} {bound!r}"})
    if rules:
        node["x-kubernetes-validations"] = [*node.get("x-kubernetes-validations", []), *rules]
    return node


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """One JSON Schema node as a structural OpenAPI v3 node."""
    node = dict(node)
    if "anyOf" in node:  # pydantic's `X | None`: optional in Kubernetes means absent, not null
        variants = [variant for variant in node.pop("anyOf") if variant.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express a union of {len(variants)} types structurally: {variants}")
        node = {**variants[0], **node}
    if node.get("default", ...) is None:
        del node["default"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    node = _fractional_bounds_as_rules(node)
    for bound in ("Minimum", "Maximum"):
        if f"exclusive{bound}" in node:
            node[bound.lower()] = node.pop(f"exclusive{bound}")
            node[f"exclusive{bound}"] = True
    extra_properties = node.get("additionalProperties")
    out: dict[str, Any] = {key: value for key, value in node.items() if key not in _DROPPED_KEYS}
    if "properties" in node:
        out["properties"] = {name: _structural(child) for name, child in node["properties"].items()}
        # A nested object defaults to {} so that the API server fills in its fields' defaults.
        for child in out["properties"].values():
            if child.get("type") == "object" and isinstance(child.get("default"), dict) and "properties" in child:
                child["default"] = {}
    elif isinstance(extra_properties, dict):
        out["additionalProperties"] = _structural(extra_properties)
    if "items" in node:
        out["items"] = _structural(node["items"])
    if node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in out:
        out.pop("additionalProperties", None)  # any value at all (a sweep's choices and parameter values)
    elif "type" not in out:
        raise ValueError(f"schema node without a type: {node}")
    return out


def _name_rule() -> dict[str, str]:
    return {
        "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (it names the Job and labels its pods)",
    }


def _immutable(section: str) -> dict[str, str]:
    return {"rule": "self == oldSelf", "message": f"spec.{section} is immutable: create a new FineTuneJob instead"}


def _immutable_field(field: str, parent: str) -> dict[str, str]:
    """The rule, on `parent`, keeping its optional scalar `field` as it was (a rule on the field alone would not
    see it set or unset)."""
    return {
        "rule": f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})",
        "message": f"{parent}.{field} is immutable: create a new FineTuneJob instead",
    }


def _object_schema(model: type[Any], kind: str, description: str) -> dict[str, Any]:
    """The structural openAPIV3Schema of one of the API's kinds, before its kind's own rules."""
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_WithFactoryDefaults)
    resolved = _resolve({key: value for key, value in raw.items() if key != "$defs"}, raw.get("$defs", {}))
    schema = _structural(resolved)
    schema["description"] = description
    properties = schema["properties"]
    properties["apiVersion"] = {"type": "string", "description": "kubetune.dev/v1alpha1"}
    properties["kind"] = {"type": "string", "description": kind}
    # The apiserver refuses anything but `type` here (kubectl explain shows ObjectMeta's own description).
    properties["metadata"] = {"type": "object"}
    schema["required"] = ["spec"]
    status = properties["status"]
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def openapi_schema() -> dict[str, Any]:
    """The structural openAPIV3Schema of a FineTuneJob."""
    schema = _object_schema(FineTuneJob, KIND, _ROOT_DESCRIPTION)
    properties = schema["properties"]
    schema["x-kubernetes-validations"] = [_name_rule()]

    spec = properties["spec"]
    for section in IMMUTABLE_SECTIONS:
        if section in ("image", "serviceAccountName"):  # optional scalars: a rule on one alone misses set/unset
            spec.setdefault("x-kubernetes-validations", []).append(_immutable_field(section, "spec"))
            continue
        spec["properties"][section].setdefault("x-kubernetes-validations", []).append(_immutable(section))
    # A Job's pods keep their priority class, and Kueue's Workload its queue: neither can follow an edit.
    scheduling = spec["properties"]["scheduling"]
    for field in SCHEDULING_IMMUTABLE:
        scheduling.setdefault("x-kubernetes-validations", []).append(_immutable_field(field, "spec.scheduling"))
    return schema


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Where the run is."},
    {
        "name": "Progress",
        "type": "number",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of training steps done.",
    },
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.trainLoss", "description": "Training loss."},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta", "description": "Time left in training."},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1, "description": "Why."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _crd(
    kind: str, plural: str, short_name: str, columns: list[dict[str, Any]], schema: dict[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": ["kubetune", "all"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def finetunejob_crd() -> dict[str, Any]:
    """The whole FineTuneJob CustomResourceDefinition manifest."""
    return _crd(KIND, PLURAL, "ftj", PRINTER_COLUMNS, openapi_schema())


_SWEEP_DESCRIPTION = (
    "A FineTuneSweep searches hyperparameters of a FineTuneJob template with Optuna: each trial is a FineTuneJob "
    "it owns, bad trials are pruned on their live evaluation metric, and its status names the best trial."
)
# What a running sweep's search may change: how many trials, and how many at once. The rest defines the study.
SWEEP_IMMUTABLE_SECTIONS = ("template", "parameters", "objective", "algorithm", "pruner")

SWEEP_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Trials", "type": "string", "jsonPath": ".status.progress", "description": "Trials finished / in all."},
    {"name": "Running", "type": "integer", "jsonPath": ".status.running", "description": "Trials running now."},
    {"name": "Best", "type": "number", "jsonPath": ".status.bestValue", "description": "The best objective so far."},
    {"name": "Best trial", "type": "string", "jsonPath": ".status.bestTrial", "description": "Its FineTuneJob."},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "priority": 1, "description": "Where it is."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def sweep_openapi_schema() -> dict[str, Any]:
    """The structural openAPIV3Schema of a FineTuneSweep."""
    schema = _object_schema(FineTuneSweep, SWEEP_KIND, _SWEEP_DESCRIPTION)
    schema["x-kubernetes-validations"] = [
        {
            "rule": f"self.metadata.name.size() <= {MAX_SWEEP_NAME_LENGTH}",
            "message": f"metadata.name must be at most {MAX_SWEEP_NAME_LENGTH} characters (trials are named "
            "<sweep>-<number>)",
        }
    ]
    spec = schema["properties"]["spec"]
    for section in SWEEP_IMMUTABLE_SECTIONS:
        spec["properties"][section].setdefault("x-kubernetes-validations", []).append(
            {"rule": "self == oldSelf", "message": f"spec.{section} is immutable: create a new FineTuneSweep instead"}
        )
    return schema


def finetunesweep_crd() -> dict[str, Any]:
    """The whole FineTuneSweep CustomResourceDefinition manifest."""
    return _crd(SWEEP_KIND, SWEEP_PLURAL, "fts", SWEEP_PRINTER_COLUMNS, sweep_openapi_schema())


CRD_KINDS = {KIND: finetunejob_crd, SWEEP_KIND: finetunesweep_crd}


def render_crd_yaml(kind: str = KIND) -> str:
    header = "# Generated by `kubetune crd` from the API models. Do not edit: change the models and regenerate.\n"
    return header + yaml.safe_dump(CRD_KINDS[kind](), sort_keys=False, width=120, allow_unicode=True)
