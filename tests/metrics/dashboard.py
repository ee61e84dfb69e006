"""Reading the shipped Grafana dashboard: its panels, their PromQL, and the variables Grafana would substitute."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD_PATH = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "dashboards" / "kubetune.json"
DATASOURCE_UID = "${datasource}"

# Panels whose metrics a trainer exports only with CUDA (kubetune_trainer_gpu_memory_*): on this CPU-only
# machine their queries must be valid and come back empty. Every other panel must show data.
GPU_ONLY_PANELS = frozenset({"GPU memory"})
# Panels of the metrics only an objective dpo run exports (kubetune_trainer_reward_*): empty for an SFT run,
# shown by a DPO run (`test_preference_panels_show_a_dpo_run`).
DPO_PANELS = frozenset({"Reward accuracy", "Reward margin", "Chosen and rejected rewards"})
# Panels of a FineTuneSweep's metrics (kubetune_sweep_*): empty without a sweep, as in the live run here; their
# series are checked on the operator's own exposition (tests/unit/test_sweep.py).
SWEEP_PANELS = frozenset({"Sweep trials by state", "Best objective by sweep"})

# PromQL function names and keywords, so that what is left of an expression are metric names.
_NOT_METRICS = frozenset(
    (
        *("sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile"),
        *("by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"),
        *("le", "inf", "nan", "offset"),
    )
)
_LABEL_MATCHERS = re.compile(r"\{[^{}]*\}")
_STRINGS = re.compile(r'"[^"]*"')
_RANGES = re.compile(r"\[[^\]]*\]")
_IDENTIFIERS = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_GROUPINGS = re.compile(r"\b(by|without|on|ignoring)\s*\([^)]*\)")


@dataclass(frozen=True)
class Query:
    panel: str
    ref_id: str
    expr: str
    instant: bool

    @property
    def gpu_only(self) -> bool:
        return self.panel in GPU_ONLY_PANELS

    @property
    def sweep_only(self) -> bool:
        return self.panel in SWEEP_PANELS

    @property
    def dpo_only(self) -> bool:
        return self.panel in DPO_PANELS


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD_PATH.read_text()))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows are containers), including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from (p for p in panel.get("panels", []) if p["type"] != "row")
        else:
            yield panel


def queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(panel["title"], target["refId"], target["expr"], bool(target.get("instant")))
        for panel in panels(dashboard)
        for target in panel["targets"]
    ]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """What Grafana sends: `$name` / `${name}` replaced. Longer names first, so $__range never hits $__r..."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    if "$" in expr:
        raise ValueError(f"unsubstituted variable in {expr!r}")
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, by elimination (strings, label sets, ranges, groupings)."""
    text = _STRINGS.sub(" ", expr)
    text = _LABEL_MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPINGS.sub(" ", text)
    names = {word for word in _IDENTIFIERS.findall(text) if word not in _NOT_METRICS}
    return {name for name in names if not re.fullmatch(r"[0-9.e]+", name)}


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """name -> label_values(...) query of each query variable."""
    found = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found[variable["name"]] = query["query"] if isinstance(query, dict) else query
    return found


def parse_label_values(query: str) -> tuple[str, str]:
    """`label_values(<selector>, <label>)` -> (selector, label)."""
    match = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)", query.strip())
    if not match:
        raise ValueError(f"not a label_values(selector, label) query: {query}")
    return match.group(1), match.group(2)
