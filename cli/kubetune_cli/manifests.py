"""Reading FineTuneJob YAML files: documents, where each field sits (file and line), and validation.

Shared by `kubetune validate`, `kubetune render` and `kubetune run`, so all three report a bad file the
same way: `FILE:LINE: spec.path: message`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune_cli.kubeyaml import KubectlLoader
from kubetune_operator import API_GROUP, KIND, SWEEP_KIND
from kubetune_operator.api import FineTuneJob, FineTuneSweep, SpecError, parse_finetunejob, parse_finetunesweep

YAML_SUFFIXES = (".yaml", ".yml")
# Deeper than any Kubernetes object nests (affinity is the deepest, about 12): refused with its line before
# PyYAML's recursive composer (or anything after it) can run out of stack.
MAX_DEPTH = 64


class StrictLoader(KubectlLoader):
    """kubectl's reading of YAML (`kubeyaml`), refusing what the API server's strict decoding refuses (a key
    given twice) and nesting deeper than MAX_DEPTH, each as a YAML error with the line."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:  # the stubs mistype `anchor`
        node = super().compose_mapping_node(anchor)
        seen: dict[Any, int] = {}
        for key, _value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.value == "<<":
                continue
            if key.value in seen:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"duplicate key {key.value!r} (first on line {seen[key.value]})",
                    key.start_mark,
                )
            seen[key.value] = key.start_mark.line + 1
        return node


@dataclass
class Document:
    """One YAML document of a file, with what is needed to point at its fields."""

    path: Path
    index: int
    body: Any
    node: yaml.Node | None

    @property
    def where(self) -> str:
        return f"{self.path}#{self.index}" if self.index else str(self.path)

    def line_of(self, dotted: str) -> int:
        """1-based line of the deepest node of `dotted` (e.g. spec.training.epochs) that exists."""
        node = self.node
        line = node.start_mark.line + 1 if node is not None else 1
        for part in dotted.split("."):
            if isinstance(node, yaml.MappingNode):
                node = next((value for key, value in node.value if key.value == part), None)
            elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
                node = node.value[int(part)]
            else:
                node = None
            if node is None:
                break
            line = node.start_mark.line + 1
        return line


@dataclass
class Checked:
    """The outcome of validating one document."""

    document: Document
    job: FineTuneJob | None = None
    sweep: FineTuneSweep | None = None
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.skipped is None


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; directories become their YAML files, sorted."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in YAML_SUFFIXES))
        else:
            files.append(path)
    return files


def read_documents(path: Path) -> list[Document]:
    """Every non-empty document in a YAML file; a YAML syntax error becomes SpecError with its line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SpecError([f"{path}: cannot read: {error.strerror}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad_line = data[: error.start].count(b"\n") + 1
        raise SpecError([f"{path}:{bad_line}: not UTF-8 text (byte 0x{data[error.start]:02x})"]) from None
    try:
        nodes = list(yaml.compose_all(text, Loader=StrictLoader))
        bodies = list(yaml.load_all(text, Loader=StrictLoader))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        tab = _tab_in_indentation(text, mark.line + 1 if mark is not None else None)
        if tab is not None:
            raise SpecError(
                [f"{path}:{tab}: a tab in the indentation (YAML allows only spaces): indent with spaces"]
            ) from None
        line = f":{mark.line + 1}" if mark is not None else ""
        raise SpecError([f"{path}{line}: not valid YAML: {getattr(error, 'problem', error)}"]) from None
    return [
        Document(path, index, body, node)
        for index, (body, node) in enumerate(zip(bodies, nodes, strict=True))
        if body is not None
    ]


def _tab_in_indentation(text: str, error_line: int | None) -> int | None:
    """The first line up to the one a YAML error points at that is indented with a tab, if any: the usual
    cause of the error, which PyYAML words as "found character '\\t' that cannot start any token"."""
    for number, line in enumerate(text.splitlines(), start=1):
        if error_line is not None and number > error_line:
            break
        if "\t" in line[: len(line) - len(line.lstrip(" \t"))]:
            return number
    return None


def check_document(document: Document) -> Checked:
    body = document.body
    if not isinstance(body, dict):
        return Checked(document, problems=[f"{document.where}:1: a document must be a mapping (a Kubernetes object)"])
    if body.get("kind") not in (KIND, SWEEP_KIND):
        group = str(body.get("apiVersion", "")).partition("/")[0]
        if group == API_GROUP:  # ours, misspelled: skipping it would hide the mistake
            line = document.line_of("kind")
            return Checked(
                document,
                problems=[
                    f"{document.path}:{line}: kind: {body.get('kind')!r} is not a kind of {API_GROUP}; "
                    f"use {KIND} or {SWEEP_KIND}"
                ],
            )
        return Checked(document, skipped=f"{body.get('kind', 'object without kind')} is not a {KIND}")
    try:
        if body.get("kind") == SWEEP_KIND:
            return Checked(document, sweep=parse_finetunesweep(body))
        return Checked(document, job=parse_finetunejob(body))
    except SpecError as error:
        located = []
        for problem in error.problems:
            dotted, _, _message = problem.partition(": ")
            located.append(f"{document.path}:{document.line_of(dotted)}: {problem}")
        return Checked(document, problems=located)


def check_files(paths: list[Path]) -> list[Checked]:
    checked: list[Checked] = []
    for path in expand(paths):
        try:
            documents = read_documents(path)
        except SpecError as error:
            checked.append(Checked(Document(path, 0, None, None), problems=error.problems))
            continue
        if not documents:
            checked.append(Checked(Document(path, 0, None, None), problems=[f"{path}: no YAML documents"]))
        checked.extend(check_document(document) for document in documents)
    return checked


def _checked(path: Path) -> list[Checked]:
    results = [checked for checked in check_files([path]) if checked.skipped is None]
    problems = [problem for checked in results for problem in checked.problems]
    if problems:
        raise SpecError(problems)
    return results


def load_finetunejob(path: Path) -> FineTuneJob:
    """The one FineTuneJob in a file, or SpecError with every problem located."""
    jobs = [checked.job for checked in _checked(path) if checked.job is not None]
    if len(jobs) != 1:
        raise SpecError([f"{path}: expected exactly one {KIND}, found {len(jobs)}"])
    return jobs[0]


def load_finetunesweep(path: Path) -> FineTuneSweep:
    """The one FineTuneSweep in a file, or SpecError with every problem located."""
    sweeps = [checked.sweep for checked in _checked(path) if checked.sweep is not None]
    if len(sweeps) != 1:
        raise SpecError([f"{path}: expected exactly one {SWEEP_KIND}, found {len(sweeps)}"])
    return sweeps[0]
