"""One trainer per destination (issue 29, items 1 and 2): the destination's lease, on a local path and on S3
(moto and SeaweedFS, whose conditional writes both answer 412), and two real trainers racing for one destination."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_trainer.config import StorageSpec
from kubetune_trainer.destination import LEASE, LEASE_SECONDS_ENV, Holder, Lease
from kubetune_trainer.errors import InvalidInput
from kubetune_trainer.storage import Storage
from tests.support.outage import outage_proxy
from tests.support.s3 import S3Endpoint
from tests.trainer.conftest import S3Run, TrainerProcess, s3_env

TERM = 1.5  # seconds: a short lease, renewed every 0.5 s


@pytest.fixture(params=["file", "moto", pytest.param("seaweedfs", marks=pytest.mark.slow)])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str]:
    if request.param == "file":
        return Storage(), str(tmp_path / "out") + "/"
    s3: S3Endpoint = request.getfixturevalue("s3_moto" if request.param == "moto" else "s3_seaweed")
    request.getfixturevalue("s3_credentials")(s3)
    bucket = s3.make_bucket(request.getfixturevalue("s3_bucket_name"))
    return Storage(StorageSpec(endpoint=s3.url, region=s3.region)), f"s3://{bucket}/out/"


def _lease(place: tuple[Storage, str], run: str) -> Lease:
    return Lease(place[0], place[1], run, seconds=TERM, poll=0.1)


def test_another_run_is_refused_while_the_holder_renews_and_waits_for_nothing_once_it_lets_go(
    place: tuple[Storage, str],
) -> None:
    first = _lease(place, "local/job in /work-a")
    first.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(InvalidInput) as refused:
            _lease(place, "local/job in /work-b").acquire()
        assert refused.value.error.reason == "DestinationInUse" and refused.value.exit_code == 2
        assert first.holder.name in str(refused.value) and "another output.destination" in str(refused.value)
        assert time.monotonic() - started < TERM * 2  # refused at the first renewal seen, not after the term
    finally:
        first.release()
    assert place[0].read_versioned(place[1] + LEASE) is None
    started = time.monotonic()
    second = _lease(place, "local/job in /work-b")
    second.acquire()
    second.release()
    assert time.monotonic() - started < 1


def test_a_holder_gone_without_letting_go_is_taken_over_after_its_term(place: tuple[Storage, str]) -> None:
    gone = _lease(place, "local/job in /work-a")
    gone.acquire()
    gone._stop.set()  # what SIGKILL leaves: the lease, no renewals
    time.sleep(TERM / 3 + 0.2)
    started = time.monotonic()
    taker = _lease(place, "local/job in /work-b")
    taker.acquire()
    try:
        assert TERM * 0.9 <= time.monotonic() - started < TERM * 4
        stored = Holder.decode(place[0].read_versioned(place[1] + LEASE)[0])
        assert stored is not None and stored.id == taker.holder.id
    finally:
        taker.release()


def test_a_holder_whose_process_is_gone_from_this_host_is_taken_over_at_once(place: tuple[Storage, str]) -> None:
    import dataclasses
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = Holder.this_process("local/job in /work", 3600)  # a term no test waits out
    place[0].write_if(place[1] + LEASE, dataclasses.replace(gone, pid=dead.pid).encode(), version=None)
    started = time.monotonic()
    rerun = _lease(place, "local/job in /work")
    rerun.acquire()
    rerun.release()
    assert time.monotonic() - started < 2


def test_a_holder_of_the_same_run_is_waited_for_and_a_race_has_one_winner(place: tuple[Storage, str]) -> None:
    old = _lease(place, "local/job in /work")
    old.acquire()
    threading.Timer(TERM * 2, old.release).start()  # still saving its checkpoint for two terms, renewing
    started = time.monotonic()
    waits: list[str] = []
    rerun = _lease(place, "local/job in /work")
    rerun.acquire(on_wait=waits.append)
    assert time.monotonic() - started >= TERM * 2 - 0.2 and waits and old.holder.name in waits[0]
    rerun.release()

    winners: list[str] = []
    errors: list[BaseException] = []

    def contend(name: str) -> None:
        lease = _lease(place, f"local/job in /work-{name}")
        try:
            lease.acquire()
            winners.append(name)
            time.sleep(TERM)
            lease.release()
        except InvalidInput as refused:
            errors.append(refused)

    threads = [threading.Thread(target=contend, args=(name,)) for name in "abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(winners) >= 1 and len(winners) + len(errors) == 4
    # never two at once: every winner after the first came after a release (they hold for TERM each)


@contextlib.contextmanager
def paused(trainer: TrainerProcess) -> Iterator[None]:
    """The trainer stopped (SIGSTOP) for the block, continued after. Its lease is not renewed meanwhile, but a
    waiter times the term from when it first reads the lease, and the block ends as soon as one has."""
    trainer.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        trainer.process.send_signal(signal.SIGCONT)


def wait_for_log(trainer: TrainerProcess, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in trainer.log():
        assert time.monotonic() < deadline and trainer.process.poll() is None, trainer.log()[-3000:]
        time.sleep(0.1)


@pytest.mark.slow
def test_two_work_dirs_on_one_destination_train_once(s3_moto: S3Endpoint, s3_run: S3Run, tmp_path: Path) -> None:
    """The same job started from two work dirs: the second is refused (exit 2) naming the first; the first
    trains to the end. Before the lease both trained from scratch at once and both exited 0."""
    bucket = s3_run.bucket
    cfg = s3_run.config(
        "run",
        rows=40,
        training={"maxSteps": 30, "checkpointEverySteps": 10, "evalEverySteps": 100},
    )
    env = {**s3_env(s3_moto), LEASE_SECONDS_ENV: "3"}
    first = TrainerProcess(cfg, tmp_path, "first", env)
    second = None
    try:
        first.wait_for_step(1, 120)
        # Held still until the second has seen its lease: on a quiet machine the tiny model's 30 steps end before a
        # second trainer is through its imports, and the second then finds a finished run, not a running one.
        with paused(first):
            second = TrainerProcess(cfg, tmp_path, "second", env)
            wait_for_log(second, "to let go of")
        assert second.wait(60) == 2, second.log()[-3000:]
        error = second.result()["error"]
        assert error["reason"] == "DestinationInUse" and "first-work" in error["message"], error
        assert first.wait(300) == 0, first.log()[-3000:]
    finally:
        first.kill()
        if second is not None:
            second.kill()
    complete = json.loads(s3_moto.read(bucket, "run/COMPLETE"))
    assert complete["result"]["steps"] == 30
    assert "run/lease.json" not in s3_moto.list_keys(bucket, "run/")  # let go at the end


@pytest.mark.slow
def test_a_rerun_while_the_stopped_trainer_still_saves_waits_for_it(
    s3_moto: S3Endpoint, s3_run: S3Run, tmp_path: Path
) -> None:
    """`kubetune run` SIGKILLed: its trainer gets SIGTERM (the parent-death signal) and saves a checkpoint,
    slowly (0.5 s of latency on every storage request), while the rerun in the same work dir has started.
    The rerun waits for it and resumes from the checkpoint it saved; before the lease the two overlapped and
    the rerun resumed from an older checkpoint while the old trainer was still uploading a newer one."""
    bucket = s3_run.bucket
    with outage_proxy(s3_moto.url) as proxy:
        cfg = s3_run.config(
            "run",
            rows=40,
            training={"maxSteps": 14, "checkpointEverySteps": 4, "evalEverySteps": 100, "checkpointsToKeep": 5},
            storage={"endpoint": proxy.url, "region": s3_moto.region},
        )
        env = {**s3_env(s3_moto), LEASE_SECONDS_ENV: "3"}
        old = TrainerProcess(cfg, tmp_path, "job", env)
        rerun = None
        try:
            old.wait_for_step(6, 180)
            # Held still until the rerun has reached the lease (the tiny model's steps are faster than the rerun's
            # imports on a quiet machine), then stopped as a killed CLI stops it.
            with paused(old):
                # The same work dir: the same run (a log and termination message of its own, to read both).
                rerun = TrainerProcess(cfg, tmp_path, "rerun", env, ["--workdir", str(tmp_path / "job-work")])
                wait_for_log(rerun, "to let go of")
                proxy.latency = 0.5
            old.process.send_signal(signal.SIGTERM)
            assert old.wait(120) == 3, old.log()[-3000:]
            saved = old.result()["checkpoint"]["step"]
            proxy.latency = 0.0
            assert rerun.wait(300) == 0, rerun.log()[-3000:]
        finally:
            old.kill()
            if rerun is not None:
                rerun.kill()
    metrics = json.loads(s3_moto.read(bucket, "run/metrics.json"))
    assert metrics["resumed_from_step"] == saved >= 6 and metrics["steps"] == 14
