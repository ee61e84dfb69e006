"""The FineTuneJob API: the models and the generated CRD accept and reject the same objects.

Every bad object must be rejected twice — by `kubetune validate` (the pydantic models) and by what the API
server would do with the generated CRD (schema + CEL, see tests/support/admission.py) — each time with a
message that names the field.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_cli.main import main
from kubetune_operator.api import FineTuneJob, SpecError, parse_finetunejob, parse_finetunesweep
from kubetune_operator.crd import finetunejob_crd, render_crd_yaml
from tests.support.admission import CRD_PATH, admit, apply_defaults, crd_schema
from tests.support.catalog import BAD, BASE, GOOD_EDGE_CASES, IMMUTABLE_CHANGES, MUTABLE_CHANGES, UNSERVED, with_changes

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def model_errors(obj: dict[str, Any]) -> list[str]:
    try:
        (parse_finetunesweep if obj.get("kind") == "FineTuneSweep" else parse_finetunejob)(obj)
    except SpecError as error:
        return error.problems
    return []


@pytest.mark.parametrize(("case", "obj", "names"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_object_is_rejected_by_models_and_by_the_crd(case: str, obj: dict[str, Any], names: str) -> None:
    from_models = model_errors(obj)
    from_server = admit(obj)
    assert from_models, f"{case}: the models accepted it"
    assert from_server, f"{case}: the CRD schema and CEL rules accepted it"
    assert any(names in problem for problem in from_models), from_models
    assert any(names in problem for problem in from_server), from_server
    if case in UNSERVED:  # kubectl's words for an apiVersion no API serves (tests/cluster checks them)
        assert any(UNSERVED[case] in problem for problem in from_server), from_server


@pytest.mark.parametrize(("case", "obj"), GOOD_EDGE_CASES, ids=[case for case, _ in GOOD_EDGE_CASES])
def test_valid_edge_case_is_accepted_by_both(case: str, obj: dict[str, Any]) -> None:
    assert model_errors(obj) == []
    assert admit(obj) == []


def test_catalog_is_big_enough() -> None:
    assert len(BAD) >= 25


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_examples_pass_both(path: Path) -> None:
    for obj in yaml.safe_load_all(path.read_text()):
        assert model_errors(obj) == []
        assert admit(obj) == []


def test_there_are_examples_of_each_kind() -> None:
    specs = [yaml.safe_load(path.read_text())["spec"] for path in EXAMPLES]
    assert any(spec.get("dataset", {}).get("format") == "chat" for spec in specs)
    assert any(spec.get("resources", {}).get("gpus", 1) > 1 for spec in specs)
    assert any(spec.get("scheduling", {}).get("queueName") for spec in specs)
    assert any(spec.get("scheduling", {}).get("tolerations") for spec in specs)


def test_models_and_server_defaults_agree() -> None:
    """What the API server stores after defaulting is what the models would fill in."""
    stored = apply_defaults(copy.deepcopy(BASE), crd_schema())
    job = FineTuneJob.model_validate(stored)
    from_models = job.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert stored["spec"] == from_models
    assert stored["spec"]["method"] == {"type": "qlora"}  # quantization/lora: effective defaults, not stored
    method = job.spec.method
    quantization, lora = method.effective_quantization(), method.effective_lora()
    assert quantization is not None and (quantization.bits, quantization.type, quantization.double_quant) == (
        4,
        "nf4",
        True,
    )
    assert lora is not None and lora.target_modules == ["all-linear"] and (lora.r, lora.alpha) == (16, 32)
    assert stored["spec"]["training"]["learningRate"] == 2e-4
    assert "gradientCheckpointing" not in stored["spec"]["training"]  # unset: on with a GPU, off on a CPU
    assert stored["spec"]["dataset"]["packing"] is True


@pytest.mark.parametrize(("section", "value"), IMMUTABLE_CHANGES, ids=[section for section, _ in IMMUTABLE_CHANGES])
def test_training_fields_are_immutable(section: str, value: Any) -> None:
    updated = with_changes((f"spec.{section}", value))
    errors = admit(updated, old=BASE)
    assert any(f"spec.{section} is immutable" in error for error in errors), errors


def test_suspend_and_scheduling_may_change() -> None:
    updated = with_changes(*MUTABLE_CHANGES)
    assert admit(updated, old=BASE) == []


def test_committed_crd_is_what_the_models_generate() -> None:
    stale = "crds/ is stale: run `kubetune crd -o crds/kubetune.dev_finetunejobs.yaml`"
    assert CRD_PATH.read_text() == render_crd_yaml(), stale


def _walk(schema: dict[str, Any], path: str) -> list[str]:
    missing = [] if schema.get("description") else [path]
    for name, child in schema.get("properties", {}).items():
        missing += _walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict) and "properties" in schema["items"]:
        missing += _walk(schema["items"], f"{path}[]")
    return missing


def test_the_field_reference_is_what_the_crd_generates() -> None:
    from kubetune_operator.reference import render_reference

    reference = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
    stale = "docs/reference.md is stale: run `kubetune crd --reference -o docs/reference.md`"
    assert reference.read_text() == render_reference(), stale
    text = reference.read_text()
    for field in ("learningRate", "`disk`", "## `spec.pod`", "imagePullSecrets", "must be s3://bucket/key"):
        assert field in text


def test_the_operators_parse_refuses_snake_case_with_the_field_meant() -> None:
    """The operator parses with the same function as `kubetune validate`: a field the CRD does not have is an
    unknown field there too (the API server would have pruned or refused it), with the spelling meant."""
    from kubetune_operator.api import SpecError, parse_finetunejob

    with pytest.raises(SpecError) as refused:
        parse_finetunejob(with_changes(("spec.training", {"learning_rate": 1e-4})))
    assert refused.value.problems == ["spec.training.learning_rate: unknown field; did you mean `learningRate`?"]


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    # metadata is the one exception: a CRD may give it nothing but its type (the real apiserver refuses a
    # description there; tests/cluster installs the CRD into one).
    assert _walk(crd_schema(), "finetunejob") == ["finetunejob.metadata"]


def test_every_default_passes_its_own_cel_rules() -> None:
    """The API server evaluates a node's CEL rules on its schema default when the CRD is created, as given
    (no nested defaulting): a rule reading a field the default lacks makes the CRD itself invalid."""
    import celpy

    environment = celpy.Environment()
    failures = []

    def check(schema: dict[str, Any], path: str) -> None:
        if "default" in schema:
            for rule in schema.get("x-kubernetes-validations", []):
                if "oldSelf" in rule["rule"]:
                    continue
                program = environment.program(environment.compile(rule["rule"]))
                try:
                    outcome = program.evaluate({"self": celpy.json_to_cel(schema["default"])})
                except celpy.CELEvalError as error:  # e.g. "no such member in mapping: 'labels'"
                    outcome = error
                if isinstance(outcome, celpy.CELEvalError) or not outcome:
                    failures.append(f"{path}: {rule['rule']}: {outcome}")
        for name, child in schema.get("properties", {}).items():
            check(child, f"{path}.{name}")
        if isinstance(schema.get("items"), dict):
            check(schema["items"], f"{path}[]")

    check(crd_schema(), "finetunejob")
    assert not failures


def test_crd_is_structural() -> None:
    def check(schema: dict[str, Any], path: str) -> None:
        assert "type" in schema, f"{path} has no type"
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title", "const"):
            assert forbidden not in schema, f"{path} has {forbidden}"
        for name, child in schema.get("properties", {}).items():
            check(child, f"{path}.{name}")
        if isinstance(schema.get("items"), dict):
            check(schema["items"], f"{path}[]")
        if isinstance(schema.get("additionalProperties"), dict):
            check(schema["additionalProperties"], f"{path}{{}}")

    check(crd_schema(), "finetunejob")


def test_crd_has_no_fractional_bounds() -> None:
    # kube-apiserver truncates a bound to an integer when the value is one (`evalSplit: 0` failed
    # `exclusiveMaximum: 0.5`); the generator writes such bounds as CEL rules instead.
    def check(schema: dict[str, Any], path: str) -> None:
        for bound in ("minimum", "maximum"):
            assert float(schema.get(bound, 0)).is_integer(), f"{path} has {bound} {schema[bound]}"
        for name, child in schema.get("properties", {}).items():
            check(child, f"{path}.{name}")
        for nested in ("items", "additionalProperties"):
            if isinstance(schema.get(nested), dict):
                check(schema[nested], f"{path}[]")

    check(crd_schema(), "finetunejob")
    eval_split = crd_schema()["properties"]["spec"]["properties"]["dataset"]["properties"]["evalSplit"]
    assert {"rule": "self < 0.5", "message": "must be less than 0.5"} in eval_split["x-kubernetes-validations"]


def test_crd_shape() -> None:
    crd = finetunejob_crd()
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    assert "kubetune" in crd["spec"]["names"]["categories"]
    assert version["subresources"] == {"status": {}}
    columns = [column["name"] for column in version["additionalPrinterColumns"]]
    assert columns[:4] == ["Phase", "Progress", "Loss", "ETA"] and columns[-1] == "Age"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for field in ("phase", "conditions", "observedGeneration", "progress", "result", "artifacts", "checkpoint"):
        assert field in status


def test_validate_cli_reports_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = with_changes(("spec.training", {"learningRate": -1}))
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump_all([BASE, {"apiVersion": "v1", "kind": "Secret"}, bad], sort_keys=False))
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert f"{path}: FineTuneJob support-bot: OK" in out
    assert "skipped: Secret is not a FineTuneJob" in out
    line = next(
        number for number, text in enumerate(path.read_text().splitlines(), start=1) if "learningRate: -1" in text
    )
    assert f"{path}:{line}: spec.training.learningRate: Input should be greater than 0" in err


def test_validate_cli_on_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, EXAMPLES)]) == 0
    assert capsys.readouterr().out.count(": OK") == len(EXAMPLES)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("spec: [unclosed\n", ":2: not valid YAML"),
        ("- just\n- a list\n", ":1: a document must be a mapping"),
        ("", "no YAML documents"),
    ],
)
def test_validate_cli_on_broken_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 1
    assert expected in capsys.readouterr().err


def test_validate_cli_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def _bounded_leaves(schema: dict[str, Any], path: str) -> Any:
    """(dotted path, schema) of every scalar or scalar list in the spec, through nested objects."""
    for name, child in schema.get("properties", {}).items():
        dotted = f"{path}.{name}"
        if child.get("type") == "object":
            yield from _bounded_leaves(child, dotted)
        elif child.get("type") in ("string", "integer", "number") or (
            child.get("type") == "array" and child.get("items", {}).get("type") == "string"
        ):
            yield dotted, child


SPEC_LEAVES = list(_bounded_leaves(crd_schema()["properties"]["spec"], "spec"))


def _just_outside(schema: dict[str, Any]) -> list[Any]:
    """Values just beyond each bound the CRD declares for a field."""
    kind = schema["type"]
    if kind == "string":
        return ["a" * (schema["maxLength"] + 1)] if "maxLength" in schema else []
    if kind == "array":
        items = schema["items"]
        return [["a" * (items["maxLength"] + 1)]] if "maxLength" in items else []
    out: list[Any] = []
    if kind == "integer":
        out += [schema["maximum"] + 1] if "maximum" in schema else []
        out += [schema["minimum"] - 1] if "minimum" in schema else []
    return out


@pytest.mark.parametrize(("path", "schema"), SPEC_LEAVES, ids=[path for path, _ in SPEC_LEAVES])
def test_models_and_crd_agree_on_every_bound(path: str, schema: dict[str, Any]) -> None:
    """Derived from the CRD: every string and string item has a length limit, every integer fits int64, and a
    value just beyond any bound is refused by both, naming the field; no number field takes inf or nan."""
    kind = schema["type"]
    if kind == "string" and "enum" not in schema:
        assert "maxLength" in schema, f"{path}: no maxLength"
    if kind == "array":
        assert "maxLength" in schema["items"] and "maxItems" in schema, f"{path}: unbounded list"
    if kind == "integer" and "enum" not in schema:
        assert "maximum" in schema and "minimum" in schema, f"{path}: unbounded (the API server stores int64)"
        # within int64, and exact as a JSON number (float64), which is how the API server reads a bound
        assert schema["minimum"] >= -(2**53 - 1) and schema["maximum"] <= 2**53 - 1, path
    field = path.rsplit(".", 1)[1]
    for value in _just_outside(schema):
        obj = with_changes((path, value))
        assert any(field in problem for problem in model_errors(obj)), (path, model_errors(obj))
        assert any(field in problem for problem in admit(obj)), (path, admit(obj))
    if kind == "number":
        for value in (float("inf"), float("-inf"), float("nan")):
            assert any(field in problem for problem in model_errors(with_changes((path, value)))), (path, value)


@pytest.mark.parametrize("namespace", ["Team_A", "a" * 64, "-x", ""])
def test_invalid_namespace_is_refused(namespace: str) -> None:
    assert any(
        "metadata.namespace" in problem for problem in model_errors(with_changes(("metadata.namespace", namespace)))
    )
