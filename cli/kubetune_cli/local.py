"""`kubetune run`: the FineTuneJob a cluster would run, run on this machine instead.

The trainer runs as a child process exactly as in a pod: the same command and environment from the contract
(`launch_command`, `launch_env`), its /metrics and /progress served, a termination message at the end, so
what works here works there. This module is the pod's surroundings: it validates like the API server,
renders config.json like the operator, follows /progress like the operator's poll, stops the trainer as the
kubelet does (SIGTERM, then SIGKILL after the pod's grace), and ends with the status the operator's own
`trainer_ending` computes. It never imports torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

import yaml

from kubetune_operator.api import FineTuneJob, FineTuneSweep, SpecError
from kubetune_operator.status import trainer_ending
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import (
    EXIT_FAILED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    EXIT_PREEMPTED,
    PROGRESS_PATH,
    TERMINATION_GRACE_SECONDS,
    WORKDIR_ENV,
    Progress,
    TerminationMessage,
    launch_command,
    launch_env,
)
from kubetune_trainer.storage import parse_uri

LOCAL_NAMESPACE = "local"
PR_SET_PDEATHSIG = 1  # prctl(2)
LOG_EVERY_SECONDS = 10.0  # the most a log (not a terminal) waits for a line while steps go on


class LocalRunError(Exception):
    """A problem found before the trainer starts; `exit_code` follows the trainer's contract."""

    def __init__(self, message: str, exit_code: int = EXIT_INVALID_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class LocalRun:
    job: FineTuneJob
    config: TrainerConfig
    workdir: Path

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.json"

    @property
    def termination_log(self) -> Path:
        return self.workdir / "termination-log"

    @property
    def trainer_log(self) -> Path:
        return self.workdir / "trainer.log"


def local_config(job: FineTuneJob, *, max_steps: int | None = None, s3_endpoint: str | None = None) -> TrainerConfig:
    """The trainer config of a FineTuneJob, with the overrides a laptop run allows."""
    config = job.spec.trainer_config()
    if max_steps is not None:
        training = config.training.model_copy(update={"max_steps": max_steps, "epochs": None})
        config = config.model_copy(update={"training": training})
    if s3_endpoint is not None:
        config = config.model_copy(update={"storage": config.storage.model_copy(update={"endpoint": s3_endpoint})})
    return TrainerConfig.model_validate(config.trainer_json())  # re-validated: overrides obey the rules too


def preflight(config: TrainerConfig, *, connect_timeout: float = 3.0) -> None:
    """Fail in seconds, naming the path or URL, on what would otherwise fail minutes into a run."""
    inputs = {"spec.model.source": config.model.source, "spec.dataset.train": config.dataset.train}
    if config.dataset.eval:
        inputs["spec.dataset.eval"] = config.dataset.eval
    locations = {field: parse_uri(uri) for field, uri in inputs.items()}
    for field, location in locations.items():
        if location.scheme == "file" and not Path(location.path).exists():
            raise LocalRunError(f"{field}: {location.path} does not exist")
    uses_s3 = any(loc.scheme == "s3" for loc in (*locations.values(), parse_uri(config.output.destination)))
    if uses_s3 and config.storage.endpoint:
        endpoint = urlparse(config.storage.endpoint)
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        try:
            socket.create_connection((endpoint.hostname or "", port), timeout=connect_timeout).close()
        except OSError as error:
            # Transient (the endpoint may be back in a minute), not invalid input: exit 1, as the trainer does.
            raise LocalRunError(
                f"spec.storage.endpoint: cannot reach {config.storage.endpoint}: {error.strerror or error}",
                EXIT_FAILED,
            ) from None


def lock_workdir(workdir: Path) -> IO[str]:
    """Hold `workdir/lock` for this process's life: two runs of one job would share the scratch space and the
    destination (one failed with BadDigest). The lock goes with the process, however it ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    handle = (workdir / "lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise LocalRunError(f"{workdir} is in use: already running as pid {holder}", EXIT_FAILED) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def trainer_command(run: LocalRun) -> list[str]:
    """The pod's command with this run's paths; one process, whatever spec.resources says (it is ignored here)."""
    return launch_command(1, str(run.config_path), str(run.termination_log), python=sys.executable)


def trainer_env(run: LocalRun, port: int) -> dict[str, str]:
    """The pod's trainer environment (the contract's), plus where this run's scratch space is."""
    namespace = run.job.metadata.namespace or LOCAL_NAMESPACE
    return {
        **launch_env(run.job.metadata.name, namespace, metrics_port=port),
        WORKDIR_ENV: str(run.workdir / "scratch"),
    }


def read_progress(port: int, timeout: float = 1.0) -> Progress | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{PROGRESS_PATH}", timeout=timeout) as response:
            return Progress.model_validate(json.load(response))
    except (OSError, ValueError, urllib.error.URLError):
        return None


def progress_line(progress: Progress) -> str:
    parts = [f"{progress.stage:<8}"]
    if progress.total_steps:
        parts.append(f"step {progress.step}/{progress.total_steps} ({progress.percent or 0:.0f}%)")
    if progress.train_loss is not None:
        parts.append(f"loss {progress.train_loss:.4f}")
    if progress.eval_loss is not None:
        parts.append(f"eval {progress.eval_loss:.4f}")
    if progress.reward_accuracy is not None:  # objective dpo
        parts.append(f"reward acc {progress.reward_accuracy:.2f} margin {progress.reward_margin or 0:.3f}")
    if progress.tokens_per_second:
        parts.append(f"{progress.tokens_per_second:,.0f} tok/s")
    if progress.eta:
        parts.append(f"ETA {progress.eta}")
    return "  ".join(parts)


RETRY_LOG_SECONDS = 30.0  # in a log (not a terminal), a storage outage gets a line this often


class ProgressPrinter:
    """One live line on a terminal, rewritten in place (its ETA moves while a step runs); in a log, one line
    per logging interval and, between them, one per step at most every LOG_EVERY_SECONDS. Stage changes get
    lines of their own, and so do storage outages the trainer is riding out (their words come from /progress:
    "storage unreachable, retrying for 42 s of 180: ...")."""

    def __init__(self, out: IO[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.live = out.isatty()
        self.clock = clock
        self.last_line = ""
        self.last_logged: tuple[float | None, float | None] | None = None
        self.last_step = 0
        self.last_print = 0.0
        self.stages_seen: set[str] = set()
        self.resume_told = False
        self.retry_logged_at: float | None = None

    def show(self, progress: Progress) -> None:
        if progress.resumed_from_step is not None and not self.resume_told:
            self.finish()
            print(f"resuming from step {progress.resumed_from_step} (its checkpoint)", file=self.out, flush=True)
            self.resume_told = True
        if progress.stage not in self.stages_seen:  # training and evaluation alternate: announce each once
            self.finish()
            print(f"stage: {progress.stage}", file=self.out, flush=True)
            self.stages_seen.add(progress.stage)
        if self._show_retry(progress.storage_retry):
            return
        if not progress.total_steps or progress.stage not in ("train", "evaluating"):
            return
        line = progress_line(progress)
        if self.live:
            self._rewrite(line)
            return
        logged = (progress.train_loss, progress.eval_loss)
        now = self.clock()
        # A new loss, or a step done since the last line LOG_EVERY_SECONDS ago: slow steps never look frozen.
        stepped = progress.step != self.last_step and now - self.last_print >= LOG_EVERY_SECONDS
        if logged != self.last_logged or stepped:
            print(line, file=self.out, flush=True)
            self.last_logged, self.last_step, self.last_print = logged, progress.step, now

    def _show_retry(self, retry: str | None) -> bool:
        """The outage's line while the trainer retries (True), one line when it is over."""
        if retry is None:
            if self.retry_logged_at is not None:
                self.finish()
                print("storage reachable again", file=self.out, flush=True)
                self.retry_logged_at = None
            return False
        if self.live:
            self._rewrite(retry)
            if self.retry_logged_at is None:
                self.retry_logged_at = self.clock()
        elif self.retry_logged_at is None or self.clock() - self.retry_logged_at >= RETRY_LOG_SECONDS:
            print(retry, file=self.out, flush=True)
            self.retry_logged_at = self.clock()
        return True

    def _rewrite(self, line: str) -> None:
        if line != self.last_line:
            print(f"\r\033[K{line}", end="", file=self.out, flush=True)
            self.last_line = line

    def finish(self) -> None:
        if self.live and self.last_line:
            print(file=self.out, flush=True)
            self.last_line = ""


def prepare(job: FineTuneJob, workdir: Path, *, max_steps: int | None, s3_endpoint: str | None) -> LocalRun:
    config = local_config(job, max_steps=max_steps, s3_endpoint=s3_endpoint)
    preflight(config)
    workdir.mkdir(parents=True, exist_ok=True)
    run = LocalRun(job, config, workdir)
    run.config_path.write_text(json.dumps(config.trainer_json(), indent=2))
    run.termination_log.unlink(missing_ok=True)  # a stale message must not pass for this run's
    return run


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal, `kill`) stop the run as the first Ctrl-C does. SIGINT is set too:
    Python leaves it alone when it starts with SIGINT ignored (what a background job of a non-interactive
    shell inherits), and Ctrl-C was then lost: the run went on to its last step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_with_parent(parent: int) -> Callable[[], None] | None:
    """For the trainer's child process: SIGTERM when `parent` dies (Linux's parent-death signal)."""
    if not sys.platform.startswith("linux"):
        return None

    def arrange() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


def execute(
    run: LocalRun,
    out: IO[str] = sys.stdout,
    *,
    port: int | None = None,
    poll_seconds: float = 0.25,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    on_progress: Callable[[Progress], bool] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Run the trainer to its end (or to Ctrl-C: it checkpoints, exit 3). Returns (exit code, status).

    `on_progress` sees every progress read; when it returns True the trainer is stopped as a pod is (SIGTERM:
    it checkpoints and exits 3): a sweep's pruner stops a trial so."""
    port = port or free_port()
    env = {**os.environ, **trainer_env(run, port)}
    printer = ProgressPrinter(out)
    print(f"trainer log: {run.trainer_log}", file=out)
    print(f"metrics: http://127.0.0.1:{port}/metrics  progress: http://127.0.0.1:{port}{PROGRESS_PATH}", file=out)
    with run.trainer_log.open("ab") as log, _stop_signals_interrupt():
        # Its own session: Ctrl-C reaches us alone, and we stop the trainer the way Kubernetes does (SIGTERM).
        # If we die without stopping it (SIGKILL), the kernel sends it SIGTERM: it checkpoints and exits 3.
        child = subprocess.Popen(
            trainer_command(run),
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=_stop_with_parent(os.getpid()),
        )
        if on_start is not None:
            on_start(child)
        try:
            while child.poll() is None:
                progress = read_progress(port)
                if progress is not None:
                    printer.show(progress)
                    if on_progress is not None and on_progress(progress):
                        _stop_trainer(child)
                        break
                time.sleep(poll_seconds)
        except KeyboardInterrupt:
            printer.finish()
            print(
                "stopping: the trainer saves a checkpoint first; press Ctrl-C again to stop without saving "
                "(the steps since the last checkpoint are lost)",
                file=out,
                flush=True,
            )
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=TERMINATION_GRACE_SECONDS)  # the pod's grace, then SIGKILL as the kubelet
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                print("stopping at once, without saving: the newest complete checkpoint is kept", file=out)
                child.kill()
                child.wait()
        printer.finish()
    # Killed by signal N: 128 + N, as a shell and the kubelet report it (137: SIGKILL).
    code = child.returncode if child.returncode >= 0 else 128 - child.returncode
    try:
        message: TerminationMessage | None = TerminationMessage.model_validate_json(run.termination_log.read_text())
    except (OSError, ValueError):
        message = None
    if message is not None and message.outcome == "succeeded" and code != EXIT_OK:
        # The message is written after the destination's COMPLETE marker: the run is done, whatever came after.
        print(f"note: the trainer recorded success, then exited with {code}", file=out)
        code = EXIT_OK
    elif message is not None and code not in (EXIT_OK, EXIT_PREEMPTED, EXIT_INVALID_INPUT):
        code = message.exit_code or code
    return code, trainer_ending(message, code).status()


def _stop_trainer(child: subprocess.Popen[bytes]) -> None:
    """Stop the trainer as the kubelet stops a pod: SIGTERM (it checkpoints), SIGKILL after the pod's grace."""
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=TERMINATION_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def print_status(status: dict[str, Any], out: IO[str]) -> None:
    print("status:", file=out)
    print(yaml.safe_dump(status, sort_keys=False, width=120).rstrip().replace("\n", "\n  ").join(["  ", ""]), file=out)


def run_file(
    path: Path, workdir: Path | None, *, max_steps: int | None, s3_endpoint: str | None, out: IO[str] = sys.stdout
) -> int:
    """`kubetune run`: 1 for an invalid file (nothing loaded), else the trainer's exit code."""
    from kubetune_cli.manifests import load_finetunejob

    return in_workdir(
        path,
        load_finetunejob,
        workdir,
        lambda job, where: _run_locked(path, job, where, max_steps=max_steps, s3_endpoint=s3_endpoint, out=out),
    )


Loaded = TypeVar("Loaded", FineTuneJob, FineTuneSweep)


def in_workdir(
    path: Path, load: Callable[[Path], Loaded], workdir: Path | None, run: Callable[[Loaded, Path], int]
) -> int:
    """Load the file (1 when it is invalid, every problem printed), then `run` it holding its work directory's
    lock (default .kubetune/NAME) until it is over: `kubetune run` and `kubetune sweep`."""
    try:
        loaded = load(path)
    except SpecError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 1
    workdir = workdir or Path(".kubetune") / loaded.metadata.name
    try:
        lock = lock_workdir(workdir)
    except LocalRunError as error:
        print(f"{path}: {error}", file=sys.stderr)
        return error.exit_code
    with lock:
        return run(loaded, workdir)


def _run_locked(
    path: Path, job: FineTuneJob, workdir: Path, *, max_steps: int | None, s3_endpoint: str | None, out: IO[str]
) -> int:
    try:
        run = prepare(job, workdir, max_steps=max_steps, s3_endpoint=s3_endpoint)
    except (LocalRunError, SpecError) as error:
        print(f"{path}: {error}", file=sys.stderr)
        return error.exit_code if isinstance(error, LocalRunError) else 1
    ignored = [f"spec.{name}" for name in ("resources", "scheduling", "runPolicy") if name in job.spec.model_fields_set]
    notes = [f"{', '.join(ignored)} ignored"] if ignored else []
    if job.spec.storage.credentials_secret_ref:
        notes.append("S3 credentials come from the standard AWS environment, not the Secret")
    tracking = job.spec.tracking
    if (tracking.mlflow and tracking.mlflow.credentials_secret_ref) or (
        tracking.wandb and tracking.wandb.api_key_secret_ref
    ):
        notes.append("tracker credentials come from MLFLOW_TRACKING_* and WANDB_API_KEY here, not the Secrets")
    if notes:
        print(f"note: running locally: {'; '.join(notes)}", file=out)
    code, status = execute(run, out)
    print_status(status, out)
    if code == EXIT_PREEMPTED:
        print(f"run the same command again to resume ({path})", file=out)
    elif code not in (EXIT_OK,):
        print(f"trainer log: {run.trainer_log}", file=out)
    return code
