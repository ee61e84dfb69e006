"""`python -m kubetune_trainer --config /etc/kubetune/config.json`: run one training, exit per the contract.

Exit codes (contract): 0 done (or already done), 2 invalid input, 3 stopped by SIGTERM after a checkpoint,
1 anything else. A TerminationMessage is written to the termination log on every exit path.

With `--nproc-per-node N` (N > 1) or `--nnodes M` (M > 1; `contract.launch_command` adds them) this process
is a launcher: it runs torchrun with N workers of itself (joining M - 1 other nodes through torchrun's c10d
rendezvous) and exits with the code its node's first worker recorded in the termination message (torchrun
itself only knows 0 or 1). Each node's first worker writes its own pod's termination message; only global
rank 0 writes checkpoints and artifacts and serves /progress.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune_trainer import runtime
from kubetune_trainer.config import TrainerConfig, describe_errors, error_path
from kubetune_trainer.contract import (
    CONFIG_PATH,
    DEFAULT_WORKDIR,
    EXIT_FAILED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    EXIT_PREEMPTED,
    RENDEZVOUS_TIMEOUT_SECONDS,
    TERMINATION_LOG,
    TERMINATION_LOG_ENV,
    WORKDIR_ENV,
    TerminationMessage,
    TrainerError,
    torchrun_args,
)

log = logging.getLogger("kubetune_trainer")


LOG_TAIL_LINES = 40  # torchrun's last lines, kept for the termination message when no worker wrote one


def torchrun_command(args: argparse.Namespace, argv: list[str]) -> list[str]:
    options = torchrun_args(
        args.nproc_per_node,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        node_address=args.node_address,
        endpoint=args.rdzv_endpoint,
        run_id=args.rdzv_id,
        timeout_seconds=args.rdzv_timeout,
    )
    return [sys.executable, "-m", "torch.distributed.run", *options, "-m", "kubetune_trainer", *argv]


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
    nodes = parser.add_argument_group("multi-node (torchrun c10d rendezvous)")
    nodes.add_argument("--nnodes", type=int, default=1, help="nodes of the run; > 1 runs torchrun with c10d")
    nodes.add_argument("--node-rank", type=int, default=0, help="this node's index; node 0 hosts the rendezvous")
    nodes.add_argument("--node-address", default=None, help="this node's name or address its peers can reach")
    nodes.add_argument("--rdzv-endpoint", default=None, help="host:port of node 0's rendezvous store")
    nodes.add_argument("--rdzv-id", default="kubetune", help="the run's rendezvous id (the same on every node)")
    nodes.add_argument(
        "--rdzv-timeout",
        type=int,
        default=RENDEZVOUS_TIMEOUT_SECONDS,
        help="seconds to wait for every node to join before failing",
    )
    return parser.parse_args(argv)


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def write_termination(path: str, message: TerminationMessage) -> None:
    """The pod's termination message, written by the first worker of each node (its launcher reads it)."""
    if _local_rank() != 0:
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
        where = error_path(exc.errors()[0]["loc"]) or "(root)"
        problems = "; ".join(describe_errors(exc))
        raise InvalidInput("InvalidConfig", f"{path}: {problems}", field=where, file=path) from exc


def configure_logging() -> None:
    level = logging.INFO if _rank() == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _follow(stream: Any, tail: deque[str]) -> None:
    """Copy torchrun's stderr to ours (the pod log), keeping its last lines."""
    for line in stream:
        sys.stderr.write(line)
        sys.stderr.flush()
        if line.strip():
            tail.append(line.rstrip())


def _launch(args: argparse.Namespace) -> int:
    """Run torchrun with N workers (on M nodes) and report what this node's first worker recorded."""
    passthrough = ["--config", args.config, "--termination-log", args.termination_log, "--workdir", args.workdir]
    if not args.termination_log.startswith("/dev/"):
        Path(args.termination_log).unlink(missing_ok=True)  # a stale message must not pass for this run's
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    child = subprocess.Popen(torchrun_command(args, passthrough), stderr=subprocess.PIPE, text=True, errors="replace")
    follower = threading.Thread(target=_follow, args=(child.stderr, tail), daemon=True)
    follower.start()
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    code = child.wait()
    follower.join(timeout=5)
    try:
        recorded = json.loads(Path(args.termination_log).read_text(encoding="utf-8"))
        return int(recorded["exitCode"])
    except (OSError, ValueError, KeyError):
        if code == 0:
            return EXIT_OK
        write_termination(args.termination_log, _launcher_failure(args, code, list(tail)))
        return EXIT_FAILED


def _launcher_failure(args: argparse.Namespace, code: int, tail: list[str]) -> TerminationMessage:
    """Why torchrun failed before any worker reported: a peer that never joined, or a worker that crashed."""
    last = next((line for line in reversed(tail) if "Error" in line), tail[-1] if tail else "")
    if args.nnodes > 1 and "Rendezvous" in "\n".join(tail):
        reason = "RendezvousFailed"
        message = (
            f"node {args.node_rank} of {args.nnodes}: not every node joined the rendezvous at "
            f"{args.rdzv_endpoint} within {args.rdzv_timeout} s ({last})"
        )
    else:
        reason = "WorkerFailed"
        message = f"torchrun exited with {code} and no worker left a termination message" + (
            f" ({last})" if last else ""
        )
    return TerminationMessage(
        outcome="failed", exit_code=EXIT_FAILED, error=TrainerError(reason=reason, message=message[:2000])
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the process's own entry point: it may re-execute itself with tcmalloc first
        runtime.preload_allocator([sys.executable, "-m", "kubetune_trainer", *sys.argv[1:]])
    args = parse_args(argv)
    configure_logging()
    launcher = (args.nproc_per_node > 1 or args.nnodes > 1) and "WORLD_SIZE" not in os.environ
    # Before anything loads torch: a launcher's workers inherit it (torchrun would otherwise set 1 thread each).
    threads = runtime.configure(os.environ, workers=args.nproc_per_node if launcher else 1)
    log.info("%s; allocator %s", threads, runtime.allocator())
    if launcher:
        return _launch(args)

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
    from kubetune_trainer import server
    from kubetune_trainer.checkpoints import StopRequest

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
        message = _run_to_the_end(cfg, workdir, telemetry, stop)
    finally:
        stop.finish()
        if http is not None:
            http.shutdown()
            http.server_close()
    write_termination(termination, message)
    return message.exit_code


def _run_to_the_end(cfg: TrainerConfig, workdir: Path, telemetry: Any, stop: Any) -> TerminationMessage:
    """Train, and say how the run ended: its termination message."""
    from kubetune_trainer import train
    from kubetune_trainer.checkpoints import Preempted
    from kubetune_trainer.errors import TrainerFailure

    try:
        outcome = train.run(cfg, workdir, telemetry=telemetry, stop=stop)
    except Preempted:
        return _ended(telemetry, outcome="preempted", exit_code=EXIT_PREEMPTED)
    except TrainerFailure as exc:
        log.error("%s: %s", exc.error.reason, exc.error.message)
        outcome_name = "invalid" if exc.exit_code == EXIT_INVALID_INPUT else "failed"
        return _ended(telemetry, outcome=outcome_name, exit_code=exc.exit_code, error=exc.error)
    except Exception as exc:
        log.exception("training failed")
        error = TrainerError(reason=type(exc).__name__, message=str(exc)[:2000] or type(exc).__name__)
        return _ended(telemetry, outcome="failed", exit_code=EXIT_FAILED, error=error)
    if outcome.status == "preempted":
        log.warning("preempted; resume from %s", outcome.checkpoint.uri if outcome.checkpoint else "nothing")
        return _ended(telemetry, outcome="preempted", exit_code=EXIT_PREEMPTED, checkpoint=outcome.checkpoint)
    return _ended(telemetry, outcome="succeeded", exit_code=EXIT_OK, result=outcome.result, artifacts=outcome.artifacts)


def _ended(telemetry: Any, **fields: Any) -> TerminationMessage:
    """A termination message with the trackers' runs as they stand (status.tracking); /progress's stage
    becomes done (succeeded, preempted) or failed."""
    telemetry.set_stage("done" if fields["outcome"] in ("succeeded", "preempted") else "failed")
    return TerminationMessage(**fields, tracking=telemetry.progress().tracking)


if __name__ == "__main__":
    sys.exit(main())
