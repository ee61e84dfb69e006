"""YAML read the way kubectl reads it, so that `kubetune validate` sees the object `kubectl apply` would send.

kubectl turns YAML into JSON with sigs.k8s.io/yaml, which resolves plain scalars with go-yaml v2's rules. They
are neither YAML 1.1 (PyYAML's) nor YAML 1.2 (ruamel.yaml's) but a mix of both:

- numbers as YAML 1.2 writes them: `2e-4` and `1e3` are numbers (PyYAML 1.1 reads them as strings);
  integers as Go's `strconv.ParseInt(s, 0, 64)` reads them once underscores are dropped (0x1F, 0o17, 0755,
  0b11); no sexagesimal (`1:30` is a string);
- booleans as YAML 1.1 writes them: y, yes, on, n, no, off (any of three cases) are booleans (YAML 1.2 and
  ruamel's 1.2 loader read them as strings);
- timestamps stay strings;
- then JSON: a float with no fraction is sent as an integer (`maxSteps: 100.0` is 100), an integer beyond int64
  as a float, keys as strings.

So neither library's loader matches kubectl as it is; `KubectlLoader` is PyYAML's SafeLoader with go-yaml v2's
resolver. tests/unit/test_kubeyaml.py holds it to kubectl itself (`kubectl label --local -o json`) over a set
of scalars.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from decimal import Decimal
from typing import Any

import yaml

NULL, BOOL, INT, FLOAT, STR, MERGE = (
    f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "str", "merge")
)
_WORDS: dict[str, tuple[str, Any]] = {
    **{word: (NULL, None) for word in ("", "~", "null", "Null", "NULL")},
    **{word: (BOOL, True) for word in ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")},
    **{word: (BOOL, False) for word in ("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")},
    **{word: (FLOAT, math.nan) for word in (".nan", ".NaN", ".NAN")},
    **{word: (FLOAT, math.inf) for word in (".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF")},
    **{word: (FLOAT, -math.inf) for word in ("-.inf", "-.Inf", "-.INF")},
    "<<": (MERGE, "<<"),
}
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")  # go-yaml v2's yamlStyleFloat
_DIGITS = {2: "01", 8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}
# Go prints a float64 without an exponent (so JSON reads it back as an integer when it has no fraction) below this.
_JSON_EXPONENT_FROM = 1e21


def go_int(text: str) -> int | None:
    """`strconv.ParseInt(text, 0, 64)`, or `ParseUint` where that fails: the value, or None."""
    sign, body = (text[0], text[1:]) if text[:1] in ("+", "-") else ("", text)
    prefix = body[:2].lower()
    if prefix in ("0x", "0o", "0b"):
        base, digits = {"0x": 16, "0o": 8, "0b": 2}[prefix], body[2:]
    elif body.startswith("0") and len(body) > 1:
        base, digits = 8, body[1:]
    else:
        base, digits = 10, body
    if not digits or any(char not in _DIGITS[base] for char in digits):
        return None
    value = int(digits, base) * (-1 if sign == "-" else 1)
    if -(2**63) <= value < 2**63 or (not sign and 0 <= value < 2**64):
        return value
    return None


def _number(text: str) -> tuple[str, Any] | None:
    """go-yaml v2's reading of a plain scalar that starts like a number: int, float, or None (a string)."""
    if text.startswith("."):
        return (FLOAT, float(text)) if _FLOAT.match(text) else None
    plain = text.replace("_", "")
    value = go_int(plain)
    if value is not None:  # JSON carries a uint64 beyond int64 as a float
        return (INT, value) if value < 2**63 else (FLOAT, float(value))
    if _FLOAT.match(plain):
        return FLOAT, float(plain)
    return None


def resolve_plain(text: str) -> tuple[str, Any]:
    """The tag and value kubectl gives a plain (unquoted) scalar."""
    if text in _WORDS:
        return _WORDS[text]
    if text[:1] in ("+", "-", ".") or text[:1].isdigit():
        number = _number(text)
        if number is not None:
            return number
    return STR, text


def as_json(value: Any) -> Any:
    """A float as kubectl's JSON carries it: without a fraction, it is an integer on the wire."""
    if isinstance(value, float) and value.is_integer() and abs(value) < _JSON_EXPONENT_FROM:
        return int(Decimal(repr(value)))  # Go's shortest digits: 2**64 as a float is 18446744073709552000
    return value


def _json_key(key: Any) -> Any:
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, int | float):
        return str(as_json(key))
    return key


class KubectlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with go-yaml v2's scalar resolution and kubectl's JSON conversion."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0]:
            return resolve_plain(value)[0]
        return super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]

    def construct_kubectl_scalar(self, node: yaml.ScalarNode) -> Any:
        tag, value = resolve_plain(self.construct_scalar(node))
        if node.tag == FLOAT and tag == INT:  # an explicit !!float 1 is the float 1.0, which JSON sends as 1
            return as_json(float(value))
        if node.tag != tag:  # an explicit tag the text does not fit, e.g. !!int abc: kubectl refuses it too
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.value!r} as {node.tag.rpartition(':')[2]}", node.start_mark
            )
        return as_json(value)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Keys become JSON's strings as they are read: `on:` and `1:` are the keys "true" and "1", which
        # Python's True and 1 (equal, one dict key) would not keep apart.
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _json_key(self.construct_object(key_node, deep=deep))
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found an unhashable key", key_node.start_mark
                )
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


for _tag in (NULL, BOOL, INT, FLOAT):
    KubectlLoader.add_constructor(_tag, KubectlLoader.construct_kubectl_scalar)
# go-yaml v2 hands timestamps to JSON as the text they were written as.
KubectlLoader.add_constructor("tag:yaml.org,2002:timestamp", KubectlLoader.construct_yaml_str)  # type: ignore[type-var]
