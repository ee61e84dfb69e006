"""Every reason the operator can write into a FineTuneJob's status, and every error reason the trainer can put
in its termination message, is documented in docs/operator.md; the reasons are read from the code itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "kubetune_operator"
TRAINER = ROOT / "trainer" / "kubetune_trainer"
REASON = re.compile(r"^[A-Z][A-Za-z0-9]+$")  # CamelCase, as Kubernetes writes reasons


def _strings(node: ast.AST, constants: dict[str, ast.expr], local: dict[str, list[ast.expr]]) -> set[str]:
    """The reason-like string constants an expression can evaluate to (through names bound to constants)."""
    if isinstance(node, ast.Constant):
        return {node.value} if isinstance(node.value, str) and REASON.match(node.value) else set()
    if isinstance(node, ast.Name):
        bound = local.get(node.id) or ([constants[node.id]] if node.id in constants else [])
        return set().union(*(_strings(value, constants, {}) for value in bound))
    return set().union(*(_strings(child, constants, local) for child in ast.iter_child_nodes(node)))


def reasons_passed(path: Path, callees: set[str], position: int) -> set[str]:
    """The reasons given to calls of `callees` in `path`: positional argument `position`, or `reason=`."""
    tree = ast.parse(path.read_text())
    constants = {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
    }
    found: set[str] = set()
    for scope in ast.walk(tree):
        if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        local: dict[str, list[ast.expr]] = {}
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                local.setdefault(node.targets[0].id, []).append(node.value)
        for node in ast.walk(scope):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name not in callees:
                continue
            arg = node.args[position] if len(node.args) > position else None
            arg = arg or next((k.value for k in node.keywords if k.arg == "reason"), None)
            if arg is not None:
                found |= _strings(arg, constants, local)
    return found


def status_reasons() -> set[str]:
    from kubetune_operator.status import STUCK_REASONS

    written = reasons_passed(OPERATOR / "status.py", {"Verdict", "Ending"}, 1)
    refused = reasons_passed(OPERATOR / "reconcile.py", {"_refuse"}, 1)
    # The kubelet's reasons for a container that does not start pass through when they are these.
    return written | refused | set(STUCK_REASONS)


def trainer_reasons() -> set[str]:
    found: set[str] = set()
    for path in sorted(TRAINER.glob("*.py")):
        found |= reasons_passed(path, {"InvalidInput", "TrainerFailure"}, 0)
        found |= reasons_passed(path, {"TrainerError"}, 99)  # keyword only
    return found


def documented() -> set[str]:
    return set(re.findall(r"`([A-Z][A-Za-z0-9]+)`", (ROOT / "docs" / "operator.md").read_text()))


def test_the_reason_finder_sees_the_reasons_it_is_meant_to() -> None:
    # Literal, module constant (CREATE_REFUSED), a default inside an expression (Unschedulable), a local
    # variable (the launcher's RendezvousFailed), a `reason=` keyword (StopTimeout), a _refuse call (InvalidSpec).
    assert {"TrainerRunning", "CreateRefused", "StorageRetrying", "Unschedulable", "Resuming"} <= status_reasons()
    assert {"InvalidSpec", "NameConflict", "NoTerminationMessage", "InvalidImageName"} <= status_reasons()
    assert {"RendezvousFailed", "WorkerFailed", "StopTimeout", "DiskTooSmall", "InvalidDataset"} <= trainer_reasons()


def test_every_status_reason_is_documented() -> None:
    missing = status_reasons() - documented()
    assert not missing, f"reasons the operator writes that docs/operator.md's Status tables do not list: {missing}"


def test_every_trainer_error_reason_is_documented() -> None:
    missing = trainer_reasons() - documented()
    assert not missing, f"trainer error reasons that docs/operator.md does not list: {missing}"
