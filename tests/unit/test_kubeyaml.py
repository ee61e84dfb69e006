"""kubetune reads YAML as kubectl does: every scalar below gets the same JSON value from `KubectlLoader` as from
kubectl itself (`kubectl label --local -o json` reads a file and prints the object it would send, offline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_cli.kubeyaml import KubectlLoader
from tests.support.tools import kubectl_reads

SCALARS = [
    # numbers: YAML 1.2 floats, Go's integer prefixes, underscores, the int64/uint64 edges
    *("2e-4", "1E5", "1e+5", "-1e-3", "+.5", ".5", "5.", "1.0", "100.0", "1e20", "1e21", "0.1", "-0", "-0.0"),
    *("0.5e-3", "1_000", "1_", "_1", "1__0", "0x1F", "0x_1F", "0X1f", "0b101", "-0b101", "0o17", "017", "08"),
    *("09.5", "0x", "0xG", "1e", "e3", "12abc", "+12", "-12", "+", ".", "1.2.3", "1,000"),
    *("9223372036854775807", "9223372036854775808", "18446744073709551615", "18446744073709551616"),
    *("-9223372036854775808", "-9223372036854775809", "+9223372036854775808", "1:30", "190:20:30"),
    # booleans: YAML 1.1's words, in the three cases
    *("yes", "Yes", "YES", "yEs", "y", "Y", "n", "N", "no", "on", "On", "off", "OFF", "true", "False", "tRue"),
    # nulls, timestamps, strings that look like something
    *("null", "Null", "~", "", "2024-01-01", "2024-01-01T10:00:00Z", "2024-1-1", "2e-4Gi", "0.5Gi", "x: y"),
]


def kubectl_reads_text(text: str, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "object.yaml"
    path.write_text(text)
    obj = kubectl_reads(path)
    assert isinstance(obj, dict), obj
    return obj


def test_scalars_read_as_kubectl_reads_them(tmp_path: Path) -> None:
    quoted = {"x: y": "'x: y'"}
    lines = "".join(f"  k{index}: {quoted.get(text, text)}\n" for index, text in enumerate(SCALARS))
    text = f"apiVersion: example.com/v1\nkind: Thing\nmetadata:\n  name: scalars\ndata:\n{lines}"
    expected = kubectl_reads_text(text, tmp_path)["data"]
    ours = yaml.load(text, Loader=KubectlLoader)["data"]
    differing = {SCALARS[int(k[1:])]: (ours[k], expected.get(k)) for k in ours if ours[k] != expected.get(k)}
    assert not differing, f"scalar: (kubetune, kubectl): {differing}"
    # equal as Python values is not enough where 1 == 1.0 == True: the JSON types must agree too
    assert json.dumps(ours, sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_keys_become_strings_as_kubectl_sends_them(tmp_path: Path) -> None:
    text = "apiVersion: example.com/v1\nkind: Thing\nmetadata:\n  name: keys\ndata:\n  n: a\n  1: b\n  on: c\n"
    expected = kubectl_reads_text(text, tmp_path)["data"]
    assert yaml.load(text, Loader=KubectlLoader)["data"] == expected


@pytest.mark.parametrize("text", ["!!int abc", "!!float yes", "!!bool 1"])
def test_an_explicit_tag_the_text_does_not_fit_is_refused(text: str) -> None:
    with pytest.raises(yaml.YAMLError, match="cannot read"):
        yaml.load(f"value: {text}\n", Loader=KubectlLoader)
