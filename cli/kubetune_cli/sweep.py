"""`kubetune sweep`: a FineTuneSweep run on this machine, its trials one after another.

The same search as the operator's (`kubetune_operator.search`: the study rebuilt from the trials so far, the
same samplers, seeds and pruners) and the same trials (`kubetune_operator.sweep.build_trial`), each run as
`kubetune run` runs a FineTuneJob (`local.execute`). While a trial trains, each evaluation it reports goes to
the pruner; a pruned trial is stopped as a pod is (SIGTERM: it checkpoints, exits 3). A table row is printed as
each trial finishes, and the best trial at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

from kubetune_cli.local import LocalRunError, execute, in_workdir, prepare
from kubetune_operator.api import FineTuneJob, FineTuneJobSpec, FineTuneSweep, ObjectMeta
from kubetune_operator.search import Search, TrialRecord
from kubetune_operator.sweep import build_trial, record_of, trial_name
from kubetune_trainer.contract import EXIT_PREEMPTED, Progress

COLUMNS = ("TRIAL", "STATE", "VALUE", "STEP", "PARAMETERS")


def trial_job(sweep: FineTuneSweep, number: int, parameters: dict[str, Any]) -> FineTuneJob:
    """Trial `number` as the operator would create it, without what only a cluster has (owner, namespace)."""
    body = build_trial(sweep, number, parameters)
    metadata = body["metadata"]
    return FineTuneJob(
        api_version="kubetune.dev/v1alpha1",
        kind="FineTuneJob",
        metadata=ObjectMeta(name=metadata["name"], labels=metadata["labels"], annotations=metadata["annotations"]),
        spec=FineTuneJobSpec.model_validate(body["spec"], by_alias=True, by_name=False),
    )


def format_row(sweep_name: str, record: TrialRecord) -> str:
    value = record.reported()
    cells = (
        trial_name(sweep_name, record.number),
        record.state,
        f"{value:.4f}" if value is not None else "-",
        str(record.last_step) if record.last_step is not None else "-",
        ", ".join(f"{name}={_short(v)}" for name, v in record.parameters.items()),
    )
    return "  ".join(f"{cell:<{width}}" for cell, width in zip(cells, (24, 10, 10, 6, 0), strict=True)).rstrip()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_trial(
    sweep: FineTuneSweep, records: list[TrialRecord], workdir: Path, *, max_steps: int | None, s3_endpoint: str | None
) -> TrialRecord:
    """Ask for the next trial, run it here with the pruner watching its evaluations; its record."""
    search = Search(sweep.spec, sweep.metadata.name, records)
    number, parameters = search.next_number, search.next_parameters()
    job = trial_job(sweep, number, parameters)
    run = prepare(job, workdir / job.metadata.name, max_steps=max_steps, s3_endpoint=s3_endpoint)
    metric = sweep.spec.objective.metric
    seen: dict[str, Any] = {}

    def prune(progress: Progress) -> bool:
        seen["progress"] = progress.wire()
        running = record_of(number, parameters, {"phase": "Running", "progress": seen["progress"]}, metric, False)
        if running.last_step is None or running.last_step == seen.get("judged"):
            return False
        seen["judged"] = running.last_step
        seen["pruned"] = Search(sweep.spec, sweep.metadata.name, [*records, running]).should_prune(running)
        return bool(seen["pruned"])

    with (run.workdir / "progress.log").open("w") as log:
        code, status = execute(run, log, on_progress=prune)
    if code == EXIT_PREEMPTED and not seen.get("pruned"):
        raise KeyboardInterrupt  # stopped by Ctrl-C (the trainer saved a checkpoint): the sweep stops too
    return record_of(
        number, parameters, {**status, "progress": seen.get("progress")}, metric, seen.get("pruned", False)
    )


def run_sweep(
    path: Path, workdir: Path | None, *, max_steps: int | None, s3_endpoint: str | None, out: IO[str] = sys.stdout
) -> int:
    """`kubetune sweep`: 0 when the sweep found a best trial, 1 for an invalid file or when no trial succeeded."""
    from kubetune_cli.manifests import load_finetunesweep

    def run(sweep: FineTuneSweep, where: Path) -> int:
        return _run_trials(sweep, where, path, max_steps=max_steps, s3_endpoint=s3_endpoint, out=out)

    return in_workdir(path, load_finetunesweep, workdir, run)


def _run_trials(
    sweep: FineTuneSweep, workdir: Path, path: Path, *, max_steps: int | None, s3_endpoint: str | None, out: IO[str]
) -> int:
    records: list[TrialRecord] = []
    print(f"sweep {sweep.metadata.name}: trials and their logs under {workdir}", file=out)
    print(format_row_header(), file=out, flush=True)
    while not Search(sweep.spec, sweep.metadata.name, records).done():
        try:
            record = run_trial(sweep, records, workdir, max_steps=max_steps, s3_endpoint=s3_endpoint)
        except LocalRunError as error:
            print(f"{path}: {error}", file=sys.stderr)
            return error.exit_code
        except KeyboardInterrupt:
            print(f"stopped after {len(records)} finished trials", file=out)
            return EXIT_PREEMPTED
        records.append(record)
        print(format_row(sweep.metadata.name, record), file=out, flush=True)
    best = Search(sweep.spec, sweep.metadata.name, records).best()
    if best is None:
        print(f"no trial succeeded with {sweep.spec.objective.metric}", file=out)
        return 1
    pruned = sum(record.state == "Pruned" for record in records)
    print(
        f"best: {trial_name(sweep.metadata.name, best.number)} {sweep.spec.objective.metric} {best.value:.4f} "
        f"with {best.parameters} ({len(records)} trials, {pruned} pruned)",
        file=out,
    )
    return 0


def format_row_header() -> str:
    return "  ".join(f"{cell:<{width}}" for cell, width in zip(COLUMNS, (24, 10, 10, 6, 0), strict=True)).rstrip()
