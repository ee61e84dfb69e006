"""`kubetune run` launches the trainer as the Job does and reports the status the operator computes."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune_cli import local
from kubetune_operator.builders import build_trainer_job
from kubetune_operator.status import compute_status, trainer_ending
from kubetune_trainer import contract
from kubetune_trainer.contract import TerminationMessage
from tests.objects import INVALID_MESSAGE, NOW, SUCCEEDED_MESSAGE, finetunejob, job, terminated_pod
from tests.unit.test_builders import SETTINGS, env, pod_spec, trainer

PORT = 19400


def local_run(gpus: int, workdir: Path) -> local.LocalRun:
    ftj = finetunejob(spec={"resources": {"gpus": gpus}})
    return local.LocalRun(ftj, ftj.spec.trainer_config(), workdir)


def pod_argv(argv: list[str], run: local.LocalRun) -> list[str]:
    """A local command line with the pod's interpreter and paths in place of this run's."""
    paths = {
        sys.executable: "python",
        str(run.config_path): contract.CONFIG_PATH,
        str(run.termination_log): contract.TERMINATION_LOG,
    }
    return [paths.get(arg, arg) for arg in argv]


@pytest.mark.parametrize("gpus", [0, 1])
def test_the_job_and_kubetune_run_launch_the_trainer_alike(gpus: int, tmp_path: Path) -> None:
    run = local_run(gpus, tmp_path)
    pod = build_trainer_job(run.job, SETTINGS)
    assert pod_argv(local.trainer_command(run), run) == trainer(pod)["command"]

    pod_env = {name: value for name, value in env(pod).items() if isinstance(value, str)}
    local_env = local.trainer_env(run, PORT)
    launched = set(contract.launch_env("x", "y"))
    assert launched <= set(pod_env) and launched <= set(local_env)
    for name in launched - {contract.METRICS_PORT_ENV}:  # the port is a free one locally
        assert local_env[name] == pod_env[name], name
    assert local_env[contract.METRICS_PORT_ENV] == str(PORT)
    # The stop grace both hand the trainer comes from the pod's own terminationGracePeriodSeconds.
    grace = pod_spec(pod)["terminationGracePeriodSeconds"]
    assert local_env[contract.STOP_GRACE_ENV] == str(contract.stop_grace_seconds(grace))


def test_several_gpus_go_through_the_trainers_launcher(tmp_path: Path) -> None:
    run = local_run(4, tmp_path)
    command = trainer(build_trainer_job(run.job, SETTINGS))["command"]
    assert command == contract.launch_command(4)
    # kubetune run ignores spec.resources: one process, otherwise the pod's command line.
    assert pod_argv(local.trainer_command(run), run) == contract.launch_command(1)


def status_of_pod(exit_code: int, message: str) -> dict[str, Any]:
    observed = (
        job(("Complete", "CompletionsReached", ""), succeeded=1)
        if exit_code == 0
        else job(("Failed", "PodFailurePolicy", "exit code 2"), failed=1)
    )
    return compute_status(finetunejob(), observed, [terminated_pod(exit_code, message)], {}, NOW)


@pytest.mark.parametrize("exit_code, message", [(0, SUCCEEDED_MESSAGE), (2, INVALID_MESSAGE)])
def test_kubetune_run_reports_what_the_operator_writes(exit_code: int, message: str) -> None:
    operator = status_of_pod(exit_code, message)
    ending = trainer_ending(TerminationMessage.model_validate_json(message), exit_code).status()
    for key in ("phase", "reason", "message", "result", "artifacts", "checkpoint"):
        assert ending.get(key) == operator.get(key), key
    assert "error" not in ending  # the status schema has no such field; the error is in the message


def test_a_stopped_local_run_is_suspended_with_its_checkpoint() -> None:
    message = TerminationMessage(
        outcome="preempted", exit_code=3, checkpoint=contract.CheckpointRef(step=7, uri="s3://a/checkpoints/step-7/")
    )
    status = trainer_ending(message, contract.EXIT_PREEMPTED).status()
    assert status["phase"] == "Suspended" and status["checkpoint"]["step"] == 7
    assert "step 7" in status["message"]


def test_an_ending_without_a_message_says_so() -> None:
    status = trainer_ending(None, 139).status()
    assert (status["phase"], status["reason"]) == ("Failed", "NoTerminationMessage")
    assert "139" in status["message"]


def test_a_second_run_of_the_same_work_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two `kubetune run` of one job would share the scratch space and the destination."""
    import os

    job_file = Path(__file__).parents[2] / "examples" / "qlora-minimal.yaml"
    workdir = tmp_path / "work"
    with local.lock_workdir(workdir):  # the first run, still going
        code = local.run_file(job_file, workdir, max_steps=None, s3_endpoint=None)
        assert code == contract.EXIT_FAILED
        assert f"already running as pid {os.getpid()}" in capsys.readouterr().err
    with local.lock_workdir(workdir):  # it ended: the lock went with it
        pass


def _fake_trainer(monkeypatch: pytest.MonkeyPatch, run: local.LocalRun, message: str | None) -> None:
    """A trainer that writes `message` (if any) to the termination log, then is SIGKILLed."""
    script = "import os, signal, sys\n"
    if message is not None:
        script += f"open({str(run.termination_log)!r}, 'w').write({message!r})\n"
    script += "os.kill(os.getpid(), signal.SIGKILL)\n"
    monkeypatch.setattr(local, "trainer_command", lambda run: [sys.executable, "-c", script])


def test_a_trainer_that_recorded_success_then_died_is_a_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    run = local_run(0, tmp_path)
    _fake_trainer(monkeypatch, run, SUCCEEDED_MESSAGE)
    code, status = local.execute(run, io.StringIO(), poll_seconds=0.05)
    assert (code, status["phase"]) == (contract.EXIT_OK, "Succeeded"), status
    assert status["result"]["steps"] == 10


def test_a_killed_trainer_is_reported_as_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    run = local_run(0, tmp_path)
    _fake_trainer(monkeypatch, run, None)
    code, status = local.execute(run, io.StringIO(), poll_seconds=0.05)
    assert code == 128 + 9 and status["phase"] == "Failed", status
    assert "killed by SIGKILL" in status["message"] and "exited with 1" not in status["message"], status
    # The operator says the same of a pod whose trainer the kubelet killed (exit code 137).
    assert "killed by SIGKILL" in trainer_ending(None, 137).status()["message"]


def test_the_console_says_which_step_a_run_resumes_from_once() -> None:
    import io

    out = io.StringIO()
    printer = local.ProgressPrinter(out)
    for step in (40, 41, 42):
        printer.show(contract.Progress(stage="train", step=step, total_steps=100, resumed_from_step=40))
    lines = out.getvalue().splitlines()
    assert lines[0] == "resuming from step 40 (its checkpoint)"
    assert sum("resuming" in line for line in lines) == 1
    fresh = io.StringIO()
    local.ProgressPrinter(fresh).show(contract.Progress(stage="train", step=1, total_steps=100))
    assert "resuming" not in fresh.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_line_says_when_the_trainer_rides_out_a_storage_outage() -> None:
    """It froze with no word for up to three minutes (issue 29.4): /progress had storageRetry, the CLI ignored it."""
    from kubetune_trainer.contract import Progress

    def retry(seconds: int) -> Progress:
        message = f"storage unreachable, retrying for {seconds} s of 180: cannot write s3://b/run/x: reset"
        return Progress(stage="checkpointing", step=5, total_steps=10, storage_retry=message)

    now = [0.0]
    terminal, log = _Terminal(), io.StringIO()
    on_terminal, in_log = local.ProgressPrinter(terminal), local.ProgressPrinter(log, clock=lambda: now[0])
    for seconds in (0, 5, 42, 50):
        now[0] = float(seconds)
        on_terminal.show(retry(seconds))
        in_log.show(retry(seconds))
    back = Progress(stage="train", step=6, total_steps=10, percent=60.0, train_loss=1.25)
    on_terminal.show(back)
    in_log.show(back)
    assert "\r\033[Kstorage unreachable, retrying for 42 s of 180: cannot write" in terminal.getvalue()
    assert (
        terminal.getvalue()
        .rstrip("\n")
        .endswith("storage reachable again\n\r\033[Ktrain     step 6/10 (60%)  loss 1.2500")
    )
    lines = log.getvalue().splitlines()
    retries = [line for line in lines if line.startswith("storage unreachable")]
    assert [line.split(" s of")[0][-2:].strip() for line in retries] == ["0", "42"]  # every 30 s in a log
    assert lines[-2:] == ["storage reachable again", "train     step 6/10 (60%)  loss 1.2500"]
