"""docs/reference.md: every FineTuneJob field as `kubectl explain` knows it, for readers without a cluster at hand.

Generated from the CRD's schema (itself generated from the API models), so it says what the API server
enforces: types, defaults, allowed values, bounds and the cross-field rules with their messages.
`kubetune crd --reference -o docs/reference.md` writes it; a unit test fails when it drifts.
"""

from __future__ import annotations

import json
from typing import Any

from kubetune_operator.crd import openapi_schema, sweep_openapi_schema

HEADER = """# FineTuneJob field reference

`kubetune.dev/v1alpha1`, kind `FineTuneJob`, short name `ftj`. Generated from the CRD by
`kubetune crd --reference -o docs/reference.md`; do not edit. On a cluster, `kubectl explain
finetunejob.spec --recursive` shows the same descriptions.

Each section is one object; `spec` and `metadata.name` are required, and a field marked *required* must be
set when its object is. Rules are checked by the API server at `kubectl apply` and by `kubetune validate`
offline, with the same message.
"""


def _type(node: dict[str, Any]) -> str:
    kind = node.get("type", "any" if node.get("x-kubernetes-preserve-unknown-fields") else "")
    if kind == "array":
        return f"list of {_type(node.get('items', {}))}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type(node['additionalProperties'])}"
    return str(kind)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{value}`" for value in node["enum"]))
    for key, words in (("minimum", ">="), ("maximum", "<=")):
        if key in node:
            exclusive = node.get(f"exclusive{key.capitalize()}")
            parts.append(f"{words.replace('=', '') if exclusive else words} {node[key]}")
    for key, words in (("minLength", "length >="), ("maxLength", "length <="), ("maxItems", "items <=")):
        if key in node:
            parts.append(f"{words} {node[key]}")
    if "maxProperties" in node:
        parts.append(f"entries <= {node['maxProperties']}")
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    if "properties" not in node:  # an object's own rules are listed in its section
        parts += [rule["message"] for rule in node.get("x-kubernetes-validations", [])]
    return "; ".join(parts)


def _default(node: dict[str, Any]) -> str:
    if "default" not in node or node["default"] in ({}, []):
        return ""
    return f"`{json.dumps(node['default'])}`"


def _objects(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every object node with properties under `node`, depth first, with its dotted path."""
    found = []
    if "properties" in node:
        found.append((path, node))
        for name, child in node["properties"].items():
            found += _objects(child, f"{path}.{name}")
    if "items" in node:
        found += _objects(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _objects(node["additionalProperties"], f"{path}.*")
    return found


def _section(path: str, node: dict[str, Any]) -> str:
    lines = [f"## `{path}`", "", _cell(node.get("description", "")), ""]
    rules = node.get("x-kubernetes-validations", [])
    for rule in rules:
        lines.append(f"- Rule: {rule['message']}")
    if node.get("x-kubernetes-preserve-unknown-fields"):
        lines.append("- Other fields are passed on as they are.")
    if rules or node.get("x-kubernetes-preserve-unknown-fields"):
        lines.append("")
    required = set(node.get("required", []))
    lines += ["| field | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
    for name, child in node["properties"].items():
        flag = " *required*" if name in required else ""
        lines.append(
            f"| `{name}`{flag} | {_type(child)} | {_default(child)} | {_cell(_constraints(child))} "
            f"| {_cell(child.get('description', ''))} |"
        )
    return "\n".join(lines) + "\n"


def render_reference() -> str:
    """The reference page, every object of the spec (the status is the operator's, not the user's)."""
    spec = openapi_schema()["properties"]["spec"]
    sweep = sweep_openapi_schema()["properties"]["spec"]
    # A sweep's template.spec is a FineTuneJob spec: its fields are those above.
    sweep_objects = [
        (path, node) for path, node in _objects(sweep, "spec") if not path.startswith("spec.template.spec.")
    ]
    return (
        HEADER
        + "".join("\n" + _section(path, node) for path, node in _objects(spec, "spec"))
        + SWEEP_HEADER
        + "".join("\n" + _section(path, node) for path, node in sweep_objects)
    )


SWEEP_HEADER = """
# FineTuneSweep field reference

`kubetune.dev/v1alpha1`, kind `FineTuneSweep`, short name `fts` (docs/sweeps.md). `spec.template.spec` is a
FineTuneJob spec, whose fields are listed above; each parameter's values are set into it for a trial.
"""
