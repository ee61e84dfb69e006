"""Files `kubetune validate` and `render` must refuse as `FILE:LINE: message`, never with a traceback:
deep nesting, bytes that are not UTF-8, keys given twice (the API server's strict decoding refuses them),
and a misspelled kind of our own API group."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_cli.main import main
from tests.support.admission import admit
from tests.support.catalog import WRITTEN
from tests.support.tools import kubectl_reads

EXAMPLE = (Path(__file__).parents[2] / "examples" / "qlora-minimal.yaml").read_bytes()


CASES = {
    # (file content, line, what the message says)
    "deep-flow": (
        EXAMPLE.replace(b"spec:\n", b"spec:\n  x: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
        10,
        "nested deeper",
    ),
    "deep-block": (
        EXAMPLE + b"extra:\n" + b"\n".join(b"  " * (i + 1) + b"k:" for i in range(5000)) + b" 1\n",
        None,
        "nested deeper",
    ),
    "latin-1": (EXAMPLE.replace(b"support-bot/", "support-b\u00f6t/".encode("latin-1")), 15, "not UTF-8"),
    "duplicate-key": (
        EXAMPLE.replace(b"  name: support-bot\n", b"  name: support-bot\n  name: other\n"),
        9,
        "duplicate key 'name' (first on line 8)",
    ),
    "misspelled-kind": (
        EXAMPLE.replace(b"kind: FineTuneJob", b"kind: FineTuneJobs"),
        6,
        "'FineTuneJobs' is not a kind of kubetune.dev",
    ),
}


@pytest.mark.parametrize("command", ["validate", "render"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_files_are_located_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, case: str
) -> None:
    content, line, message = CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(content)
    assert main([command, str(path)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and (command == "validate" or out == "")
    first = err.splitlines()[0]
    assert first.startswith(f"{path}:") and message in first, err[:500]
    if line is not None:
        assert first.startswith(f"{path}:{line}: "), first
    else:
        assert first.split(":")[1].isdigit(), first


def test_other_groups_kinds_are_still_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_bytes(EXAMPLE + b"---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\n")
    assert main(["validate", str(path)]) == 0
    assert "skipped: Secret is not a FineTuneJob" in capsys.readouterr().out


@pytest.mark.parametrize(("case", "text", "says"), WRITTEN, ids=[case for case, _, _ in WRITTEN])
def test_validate_gives_the_verdict_kubectl_apply_would_get(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, text: str, says: str | None
) -> None:
    """The file as kubectl reads it, judged by the apiserver's rules (offline here; tests/cluster asks the real
    one), and `kubetune validate` agree: both accept it, or both refuse it and validate says why in words."""
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    sent = kubectl_reads(path)
    server_refuses = isinstance(sent, str) or bool(admit(sent))
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert server_refuses == (says is not None), sent if isinstance(sent, str) else admit(sent)
    assert code == (1 if server_refuses else 0), err
    if says is not None:
        assert err.startswith(f"{path}:") and says in err, err


@pytest.mark.parametrize("command", ["run", "plan", "render"])
def test_run_plan_and_render_refuse_what_validate_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    case, text, says = next(entry for entry in WRITTEN if entry[0] == "snake-case-field")
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    assert main([command, str(path)]) == 1
    err = capsys.readouterr().err
    assert says is not None and says in err and "spec.training.learning_rate" in err, err
