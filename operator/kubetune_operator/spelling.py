"""Words for the mistakes people make writing a FineTuneJob by hand.

A field written in snake_case (`learning_rate`) or mistyped (`trainig`) is an unknown field to the API server;
here it also gets the field that was meant. A memory size written the way disks are sold (`32GB`) is no
Kubernetes quantity; here it gets the quantity to write instead. Pure: used by `api` when it explains a
refusal, so `kubetune validate`, `run`, `plan` and the operator all say the same.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.alias_generators import to_camel


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The model class an annotation holds (`X`, `X | None`, `list[X]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = model_in(argument)
        if found is not None:
            return found
    return None


def _wire_names(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _model_at(root: type[BaseModel], location: Sequence[int | str]) -> type[BaseModel] | None:
    """The model that describes the object at `location` (wire names; list indexes are skipped)."""
    model: type[BaseModel] | None = root
    for part in location:
        if isinstance(part, int):
            continue
        if model is None:
            return None
        field = next((f for name, f in model.model_fields.items() if (f.alias or name) == part), None)
        if field is None:
            return None
        model = model_in(field.annotation)
    return model


def meant_field(root: type[BaseModel], location: Sequence[int | str]) -> str | None:
    """The known field an unknown one at `location` most likely meant: its camelCase spelling, the same
    letters in another case, or a close misspelling. None when nothing is close."""
    *parents, unknown = location
    model = _model_at(root, parents)
    if model is None or not isinstance(unknown, str):
        return None
    known = _wire_names(model)
    folded = {name.lower(): name for name in known}
    for candidate in (to_camel(unknown), unknown.replace("-", "_")):
        if candidate in known:
            return candidate
    squashed = re.sub(r"[-_\s]", "", unknown).lower()
    if squashed in folded:
        return folded[squashed]
    close = difflib.get_close_matches(unknown, known, n=1, cutoff=0.75)
    if not close:
        close = [folded[m] for m in difflib.get_close_matches(squashed, list(folded), n=1, cutoff=0.75)]
    return close[0] if close else None


# Units people borrow from disks and RAM sticks, and what Kubernetes spells them as: (binary, decimal).
_UNIT_WORDS = {
    "k": ("Ki", "k"),
    "kb": ("Ki", "k"),
    "kib": ("Ki", "k"),
    "m": ("Mi", "M"),
    "mb": ("Mi", "M"),
    "mib": ("Mi", "M"),
    "g": ("Gi", "G"),
    "gb": ("Gi", "G"),
    "gib": ("Gi", "G"),
    "t": ("Ti", "T"),
    "tb": ("Ti", "T"),
    "tib": ("Ti", "T"),
    "p": ("Pi", "P"),
    "pb": ("Pi", "P"),
    "pib": ("Pi", "P"),
}
_NUMBER_AND_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*$")


def quantity_problem(text: str) -> str:
    """Why `text` is no Kubernetes quantity, in words, with the spelling to use where one can be guessed."""
    suffixes = "a number with an optional suffix: Ki Mi Gi Ti (powers of 2), k M G T (powers of 10), m (thousandths)"
    match = _NUMBER_AND_UNIT.match(text)
    if match and match.group(2).lower() in _UNIT_WORDS:
        number, unit = match.groups()
        binary, decimal = _UNIT_WORDS[unit.lower()]
        return f"{text!r} is not a Kubernetes quantity: use {number}{binary} or {number}{decimal} ({suffixes})"
    return f"{text!r} is not a Kubernetes quantity: use {suffixes}, e.g. 64Gi or 500m"
