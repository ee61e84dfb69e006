"""`python -m kubetune_trainer --config /etc/kubetune/config.json`: run one training, exit per the contract.

Exit codes (contract): 0 done (or already done), 2 invalid input, 3 stopped by SIGTERM after a checkpoint,
1 anything else. A TerminationMessage is written to the termination log on every exit path.

With `--nproc-per-node N` (N > 1; `contract.launch_command` adds it) this process is a launcher: it runs
torchrun with N workers of itself and exits with the code rank 0 recorded in the termination message
(torchrun itself only knows 0 or 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import (
    CONFIG_PATH,
    DEFAULT_WORKDIR,
    EXIT_FAILED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    EXIT_PREEMPTED,
    TERMINATION_LOG,
    TERMINATION_LOG_ENV,
    WORKDIR_ENV,
    TerminationMessage,
    TrainerError,
)

log = logging.getLogger("kubetune_trainer")


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "kubetune_trainer",
        *argv,
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG_PATH, help=f"config.json path (default {CONFIG_PATH})")
    parser.add_argument(
        "--termination-log",
        default=os.environ.get(TERMINATION_LOG_ENV, TERMINATION_LOG),
        help=f"where the final JSON goes (default ${TERMINATION_LOG_ENV} or {TERMINATION_LOG})",
    )
    parser.add_argument(
        "--workdir",
        default=os.environ.get(WORKDIR_ENV, DEFAULT_WORKDIR),
        help="local scratch for the model, checkpoints and artifacts before upload",
    )
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs); > 1 runs torchrun")
    return parser.parse_args(argv)


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def write_termination(path: str, message: TerminationMessage) -> None:
    if _rank() != 0:
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(message.encode())
    except OSError as exc:
        log.error("cannot write the termination message to %s: %s", path, exc)


def load_config(path: str) -> TrainerConfig:
    from kubetune_trainer.errors import InvalidInput

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput("InvalidConfig", f"cannot read config {path}: {exc.strerror}", file=path) from exc
    try:
        return TrainerConfig.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput("InvalidConfig", f"{path}: {problems}", field=where, file=path) from exc


def configure_logging() -> None:
    level = logging.INFO if _rank() == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run torchrun with N workers and report what rank 0 recorded."""
    passthrough = ["--config", args.config, "--termination-log", args.termination_log, "--workdir", args.workdir]
    if not args.termination_log.startswith("/dev/"):
        Path(args.termination_log).unlink(missing_ok=True)  # a stale message must not pass for this run's
    child = subprocess.Popen(torchrun_command(args.nproc_per_node, passthrough))
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    code = child.wait()
    try:
        recorded = json.loads(Path(args.termination_log).read_text(encoding="utf-8"))
        return int(recorded["exitCode"])
    except (OSError, ValueError, KeyError):
        message = f"torchrun exited with {code} and rank 0 left no termination message"
        write_termination(
            args.termination_log,
            TerminationMessage(
                outcome="failed", exit_code=EXIT_FAILED, error=TrainerError(reason="WorkerFailed", message=message)
            ),
        )
        return EXIT_FAILED if code != 0 else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args, argv or sys.argv[1:])

    from kubetune_trainer.errors import TrainerFailure

    termination = args.termination_log
    try:
        cfg = load_config(args.config)
    except TrainerFailure as exc:
        log.error("invalid config: %s", exc)
        write_termination(
            termination, TerminationMessage(outcome="invalid", exit_code=EXIT_INVALID_INPUT, error=exc.error)
        )
        return EXIT_INVALID_INPUT
    return execute(cfg, Path(args.workdir), termination)


def execute(cfg: TrainerConfig, workdir: Path, termination: str, *, serve_port: int | None = None) -> int:
    """Run with SIGTERM handling, /metrics and /progress, and a termination message whatever happens."""
    from kubetune_trainer import server, train
    from kubetune_trainer.checkpoints import Preempted, StopRequest
    from kubetune_trainer.errors import TrainerFailure

    stop = StopRequest()
    stop.install()
    stop.on_timeout = lambda: write_termination(
        termination,
        TerminationMessage(
            outcome="failed",
            exit_code=EXIT_FAILED,
            error=TrainerError(reason="StopTimeout", message=f"no checkpoint within {stop.grace:.0f} s of SIGTERM"),
        ),
    )
    telemetry = server.Telemetry()
    http: Any = None
    if _rank() == 0:
        try:
            http = server.serve(telemetry, serve_port)
        except OSError as exc:  # a busy port must not cost the run
            log.warning("cannot serve metrics: %s", exc)
    try:
        outcome = train.run(cfg, workdir, telemetry=telemetry, stop=stop)
    except Preempted:
        telemetry.set_stage("done")
        write_termination(termination, TerminationMessage(outcome="preempted", exit_code=EXIT_PREEMPTED))
        return EXIT_PREEMPTED
    except TrainerFailure as exc:
        telemetry.set_stage("failed")
        log.error("%s: %s", exc.error.reason, exc.error.message)
        outcome_name = "invalid" if exc.exit_code == EXIT_INVALID_INPUT else "failed"
        write_termination(
            termination, TerminationMessage(outcome=outcome_name, exit_code=exc.exit_code, error=exc.error)
        )
        return exc.exit_code
    except Exception as exc:
        telemetry.set_stage("failed")
        log.exception("training failed")
        error = TrainerError(reason=type(exc).__name__, message=str(exc)[:2000] or type(exc).__name__)
        write_termination(termination, TerminationMessage(outcome="failed", exit_code=EXIT_FAILED, error=error))
        return EXIT_FAILED
    finally:
        stop.finish()
        if http is not None:
            http.shutdown()
            http.server_close()
    if outcome.status == "preempted":
        telemetry.set_stage("done")
        log.warning("preempted; resume from %s", outcome.checkpoint.uri if outcome.checkpoint else "nothing")
        write_termination(
            termination,
            TerminationMessage(outcome="preempted", exit_code=EXIT_PREEMPTED, checkpoint=outcome.checkpoint),
        )
        return EXIT_PREEMPTED
    telemetry.set_stage("done")
    write_termination(
        termination,
        TerminationMessage(outcome="succeeded", exit_code=EXIT_OK, result=outcome.result, artifacts=outcome.artifacts),
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
