"""The real kube-apiserver admits exactly what the models admit: the admission catalog against the helm-installed CRD.

`tests/unit/test_api.py` runs the same catalog (`tests/support/catalog.py`) against the pydantic models and an
offline emulation of the apiserver; here the apiserver itself answers: its OpenAPI schema checks, CEL rules,
structural defaulting, transition rules on update and strict field validation.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from kubetune_cli.main import main as kubetune
from kubetune_operator.api import FineTuneJob
from tests.cluster.conftest import GROUP, PLURAL, VERSION, Kube, wait_for
from tests.support.catalog import (
    BAD,
    BASE,
    GOOD_EDGE_CASES,
    IMMUTABLE_CHANGES,
    MUTABLE_CHANGES,
    SWEEP_BAD,
    UNSERVED,
    WRITTEN,
    changed,
    with_changes,
)

pytestmark = pytest.mark.usefixtures("installed")

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def namespace(kube: Kube) -> Iterator[str]:
    """One namespace for the module: a dry run stores nothing, and what is stored has a name of its own."""
    name = f"admission-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name)))
    yield name
    kube.core.delete_namespace(name)


def rehomed(obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    moved = copy.deepcopy(obj)
    moved.setdefault("metadata", {})["namespace"] = namespace
    return moved


def dry_run_create(kube: Kube, obj: dict[str, Any]) -> str | None:
    """The apiserver's refusal of `obj`, or None when it would store it; strict, as `kubectl apply` asks."""
    plural = "finetunesweeps" if obj.get("kind") == "FineTuneSweep" else PLURAL
    try:
        kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, obj["metadata"]["namespace"], plural, obj, dry_run="All", field_validation="Strict"
        )
    except kubernetes.client.ApiException as error:
        body = error.body or "{}"
        return str(json.loads(body).get("message", body))
    return None


def kubectl_dry_run_apply(kube: Kube, obj: dict[str, Any]) -> tuple[int, str]:
    result = kube.kubectl("apply", "--dry-run=server", "-f", "-", check=False, input_text=yaml.safe_dump(obj))
    return result.returncode, result.stderr


@pytest.fixture
def created(kube: Kube, namespace: str) -> Iterator[str]:
    """BASE, stored under a name of its own; the name. Deleted at once, the namespace only after the catalog:
    an operator of the same session that is still reconciling it must not find its namespace terminating."""
    name = f"stored-{uuid.uuid4().hex[:6]}"
    body = rehomed(BASE, namespace)
    body["metadata"]["name"] = name
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    yield name
    kube.delete_ftj(namespace, name)
    wait_for(lambda: kube.ftj(namespace, name) is None, 30, f"FineTuneJob {namespace}/{name} to go")


def test_stored_defaults_are_the_models_defaults(kube: Kube, namespace: str, created: str) -> None:
    stored = kube.ftj(namespace, created)
    assert stored is not None
    from_models = FineTuneJob.model_validate(BASE).spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert stored["spec"] == from_models


@pytest.mark.parametrize(("section", "value"), IMMUTABLE_CHANGES, ids=[section for section, _ in IMMUTABLE_CHANGES])
def test_training_fields_are_immutable(kube: Kube, namespace: str, created: str, section: str, value: Any) -> None:
    # A merge patch: an update with no resourceVersion to conflict on, through the same transition rules.
    with pytest.raises(kubernetes.client.ApiException) as refused:
        kube.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, created, changed({}, (f"spec.{section}", value)), dry_run="All"
        )
    assert refused.value.status == 422
    assert f"spec.{section} is immutable: create a new FineTuneJob instead" in str(refused.value.body)


def test_run_policy_and_scheduling_may_change(kube: Kube, namespace: str, created: str) -> None:
    changed = with_changes(*MUTABLE_CHANGES)["spec"]
    patch = {"spec": {section: changed[section] for section in ("runPolicy", "scheduling")}}
    kube.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, created, patch)
    updated = kube.ftj(namespace, created)
    assert updated is not None
    assert updated["spec"]["runPolicy"]["suspend"] is True
    assert updated["spec"]["scheduling"]["nodeSelector"] == {"pool": "h100"}


@pytest.mark.parametrize(("case", "obj", "names"), BAD, ids=[case for case, _, _ in BAD])
def test_the_apiserver_refuses_each_bad_object_naming_the_field(
    kube: Kube, namespace: str, case: str, obj: dict[str, Any], names: str
) -> None:
    if case in UNSERVED:  # no API to send it to: kubectl refuses it before any admission
        code, message = kubectl_dry_run_apply(kube, rehomed(obj, namespace))
        assert code != 0 and UNSERVED[case] in message, message
        return
    refusal = dry_run_create(kube, rehomed(obj, namespace))
    assert refusal is not None, f"{case}: the apiserver accepted it"
    assert names in refusal, refusal


@pytest.mark.parametrize(("case", "obj"), GOOD_EDGE_CASES, ids=[case for case, _ in GOOD_EDGE_CASES])
def test_the_apiserver_accepts_each_valid_edge_case(kube: Kube, namespace: str, case: str, obj: dict[str, Any]) -> None:
    assert dry_run_create(kube, rehomed(obj, namespace)) is None


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_the_apiserver_accepts_the_examples(kube: Kube, namespace: str, path: Path) -> None:
    for obj in yaml.safe_load_all(path.read_text()):
        assert dry_run_create(kube, rehomed(obj, namespace)) is None


@pytest.mark.parametrize(("case", "obj", "names"), SWEEP_BAD, ids=[case for case, _, _ in SWEEP_BAD])
def test_the_apiserver_refuses_bad_sweeps_naming_the_field(
    kube: Kube, namespace: str, case: str, obj: dict[str, Any], names: str
) -> None:
    """Unknown parameter paths, min above max, a grid over a float, parallelTrials above trials, an objective or a
    pruner that needs evaluations on a template without an eval set: refused at `kubectl apply`."""
    refusal = dry_run_create(kube, rehomed(obj, namespace))
    assert refusal is not None, f"{case}: admitted"
    assert names in refusal, refusal


@pytest.mark.parametrize("case", ["unknown-top-field", "unknown-nested-field"])
def test_kubectl_apply_refuses_unknown_fields(kube: Kube, namespace: str, case: str) -> None:
    _, obj, names = next(entry for entry in BAD if entry[0] == case)
    code, message = kubectl_dry_run_apply(kube, rehomed(obj, namespace))
    assert code != 0
    assert "strict decoding error" in message and names in message, message


# Every object of the catalog as a file (JSON is YAML, and leaves no scalar to interpretation), and the files as
# people write them: (id, file text, whether the API must refuse it).
FILES: list[tuple[str, str, bool]] = [
    *((case, json.dumps(obj), True) for case, obj, _ in BAD),
    *((case, json.dumps(obj), False) for case, obj in GOOD_EDGE_CASES),
    *((case, text, says is not None) for case, text, says in WRITTEN),
]


@pytest.mark.parametrize(("case", "text", "refused"), FILES, ids=[case for case, _, _ in FILES])
def test_kubetune_validate_and_kubectl_apply_give_one_verdict(
    kube: Kube,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    text: str,
    refused: bool,
) -> None:
    """The same file, `kubectl apply --dry-run=server` (kubectl's YAML reading, the apiserver's strict field
    validation, schema and CEL) and `kubetune validate`: both accept it or both refuse it."""
    path = tmp_path / f"{case}.yaml"
    path.write_text(text.replace('"namespace": "default"', f'"namespace": "{namespace}"'))
    applied = kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    validated = kubetune(["validate", str(path)])
    said = capsys.readouterr().err
    assert (applied.returncode != 0) == refused, applied.stderr
    assert (validated != 0) == refused, said
