"""Runs that must never be lost: an interrupted final save (the rerun goes straight to saving), a destination
that looks like a checkpoint path, what /progress says after a resume, telemetry that cannot kill training."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from kubetune_trainer.storage import Storage
from tests.trainer.conftest import DATA, LIBRARY_WARNINGS, base_config, run_in_process, slice_jsonl

pytestmark = [pytest.mark.slow, *(pytest.mark.filterwarnings(w) for w in LIBRARY_WARNINGS)]


def _interrupted_final_save(destination: Path) -> None:
    """What a kill during the final upload leaves: every checkpoint, none of the final artifacts."""
    for entry in destination.iterdir():
        if entry.name != "checkpoints":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


@pytest.mark.parametrize("destination_name", ["out", "sweep/step-3"])
def test_resume_at_the_last_step_goes_straight_to_saving(
    tmp_path: Path, tiny_model_dir: Path, destination_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = slice_jsonl(DATA / "support-instructions.jsonl", tmp_path / "train.jsonl", 40)
    destination = tmp_path / destination_name
    cfg = base_config(
        str(tiny_model_dir),
        str(train),
        str(destination) + "/",
        training={"maxSteps": 6, "checkpointEverySteps": 3, "evalEverySteps": 3, "checkpointsToKeep": 1},
    )
    first = run_in_process(cfg, tmp_path, "first")
    assert first.code == 0, first.termination
    steps = sorted(p.name for p in (destination / "checkpoints").iterdir())
    assert steps == ["step-6"]  # checkpointsToKeep holds for a destination named like a checkpoint
    _interrupted_final_save(destination)

    seen = _record_stages(monkeypatch)
    second = run_in_process(cfg, tmp_path, "second")
    assert second.code == 0, second.termination
    # /progress shows the resumed step from the moment the checkpoint is found, never 0 again.
    after_resume = seen[[stage for stage, _ in seen].index("train") :]
    assert {step for _, step in after_resume} == {6}, seen
    assert [stage for stage, _ in after_resume][-4:] == ["save", "uploading", "cleanup", "done"]
    assert second.termination["result"]["steps"] == 6
    metrics = json.loads((destination / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 6 and metrics["steps"] == 6
    assert max(entry["step"] for entry in metrics["loss_history"]) == 6  # no step 7/6
    assert (destination / "adapter" / "adapter_model.safetensors").exists()
    assert (destination / "COMPLETE").exists()


def _record_stages(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(stage, progress step) at each stage change of the runs from now on."""
    from kubetune_trainer.server import Telemetry

    seen: list[tuple[str, int]] = []
    original = Telemetry.set_stage

    def set_stage(self: Telemetry, stage: str) -> None:
        original(self, stage)
        seen.append((stage, self.progress().step))

    monkeypatch.setattr(Telemetry, "set_stage", set_stage)
    return seen


def test_checkpoint_discovery_reads_only_below_the_destination(tmp_path: Path) -> None:
    from kubetune_trainer import checkpoints as ckpt

    storage = Storage()
    destination = str(tmp_path / "sweep" / "step-3") + "/"
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "adapter_model.safetensors").write_bytes(b"x")
    for step in (5, 10):
        ckpt.upload_checkpoint(storage, local, destination, step)
    complete, incomplete = ckpt.list_checkpoints(storage, destination)
    assert [c.step for c in complete] == [5, 10] and incomplete == []
    assert ckpt.latest_checkpoint(storage, destination) == ckpt.Checkpoint(10, ckpt.checkpoint_uri(destination, 10))
    assert ckpt.prune_checkpoints(storage, destination, keep=1) == [5]


def test_bad_progress_values_are_clamped_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    from kubetune_trainer.server import Telemetry

    telemetry = Telemetry(namespace="team", name="run")
    telemetry.update(step=61, total_steps=60, eta_seconds=-0.1, tokens_per_second=-3.0, learning_rate=float("nan"))
    progress = telemetry.progress()
    assert progress.step == 61 and progress.eta_seconds == 0.0 and progress.tokens_per_second == 0.0
    assert progress.learning_rate is None and progress.percent == 100.0
    assert "eta_seconds" in caplog.text
    telemetry.update(stage="nonsense", train_loss=1.5)  # no exception: the bad field is left out
    assert telemetry.progress().stage == "starting" and telemetry.progress().train_loss == 1.5


ROWS = [
    {"prompt": f"How do I export log {i}?", "response": f"Open Help > Export logs, then file {i}."} for i in range(12)
]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_utf8_bom_and_crlf_train(tmp_path: Path, tiny_model_dir: Path, suffix: str) -> None:
    """What Windows tools write: a byte order mark and CRLF line ends; pandas and datasets read it."""
    if suffix == "jsonl":
        text = "\r\n".join(json.dumps(row) for row in ROWS) + "\r\n"
    else:
        quoted = [f'"{row["prompt"]}","{row["response"]}"' for row in ROWS]
        text = "\r\n".join(["prompt,response", *quoted]) + "\r\n"
    train = tmp_path / f"train.{suffix}"
    train.write_bytes(b"\xef\xbb\xbf" + text.encode())
    cfg = base_config(str(tiny_model_dir), str(train), str(tmp_path / "out"), training={"maxSteps": 2})
    result = run_in_process(cfg, tmp_path)
    assert result.code == 0, result.termination
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train_examples"] + metrics["eval_examples"] == len(ROWS)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "latin-1"])
def test_other_encodings_are_refused_with_file_and_line(tmp_path: Path, tiny_model_dir: Path, encoding: str) -> None:
    rows = [*ROWS[:3], {"prompt": "Où est le café ?", "response": "À gauche."}]
    train = tmp_path / "train.jsonl"
    train.write_bytes("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode(encoding))
    cfg = base_config(str(tiny_model_dir), str(train), str(tmp_path / "out"), training={"maxSteps": 2})
    result = run_in_process(cfg, tmp_path)
    assert result.code == 2, result.termination
    error = result.termination["error"]
    line = 4 if encoding == "latin-1" else 1
    assert error["reason"] == "InvalidDataset" and error["file"] == str(train) and error["line"] == line, error
    assert f"{train}:{line}:" in error["message"] and "UTF-8" in error["message"]


def test_a_partial_model_download_is_not_trusted(
    tmp_path: Path, tiny_model_dir: Path, tiny_model_s3: str, s3_moto, s3_credentials
) -> None:
    """What a kill during the weight download left in the cache: config.json and a temp file."""
    s3_credentials(s3_moto)
    cached = tmp_path / "run-work" / "model"
    cached.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", cached / "config.json")
    (cached / "model.safetensors.a1b2c3").write_bytes(b"partial")
    train = slice_jsonl(DATA / "support-instructions.jsonl", tmp_path / "train.jsonl", 20)
    cfg = base_config(
        tiny_model_s3,
        str(train),
        str(tmp_path / "out"),
        training={"maxSteps": 2},
        storage={"endpoint": s3_moto.url, "region": s3_moto.region},
    )
    result = run_in_process(cfg, tmp_path)
    assert result.code == 0, result.termination
    assert (cached / "model.safetensors").exists() and not (cached / "model.safetensors.a1b2c3").exists()
    assert not (tmp_path / "run-work" / "model.partial").exists()


def test_writes_ride_out_a_storage_outage_and_show_it(
    tmp_path: Path, s3_moto, s3_bucket_name: str, s3_credentials
) -> None:
    import threading
    import time

    from kubetune_trainer.config import StorageSpec
    from kubetune_trainer.server import Telemetry
    from kubetune_trainer.storage import WRITE_RETRY_SECONDS
    from tests.support.outage import outage_proxy

    assert WRITE_RETRY_SECONDS >= 60  # the bar: an outage of a minute costs no run
    s3_credentials(s3_moto)
    s3_moto.make_bucket(s3_bucket_name)
    local = tmp_path / "adapter_model.safetensors"
    local.write_bytes(b"w" * 1000)
    telemetry = Telemetry()
    seen: list[str | None] = []
    with outage_proxy(s3_moto.url) as proxy:
        storage = Storage(StorageSpec(endpoint=proxy.url, region=s3_moto.region))
        storage.on_retry = lambda problem: (seen.append(problem), telemetry.update(storage_retry=problem))
        storage.write_bytes(f"s3://{s3_bucket_name}/warm", b"x")  # the client is made and connected
        proxy.down = True
        threading.Timer(6, lambda: setattr(proxy, "down", False)).start()
        started = time.monotonic()
        storage.upload_file(local, f"s3://{s3_bucket_name}/run/checkpoints/step-5/adapter_model.safetensors")
        storage.write_bytes(f"s3://{s3_bucket_name}/run/checkpoints/step-5/COMPLETE", b"{}")
        assert time.monotonic() - started >= 5 and proxy.refused > 0
    assert (
        seen and seen[0] is not None and seen[0].startswith("storage unreachable, retrying for ") and seen[-1] is None
    )
    assert telemetry.progress().storage_retry is None
    assert s3_moto.read(s3_bucket_name, "run/checkpoints/step-5/adapter_model.safetensors") == b"w" * 1000


def test_an_outage_past_the_window_fails_retryably_and_a_missing_bucket_at_once(
    tmp_path: Path, s3_moto, s3_bucket_name: str, s3_credentials
) -> None:
    import time

    from kubetune_trainer.config import StorageSpec
    from kubetune_trainer.errors import InvalidInput, TrainerFailure
    from tests.support.outage import outage_proxy

    s3_credentials(s3_moto)
    s3_moto.make_bucket(s3_bucket_name)
    with outage_proxy(s3_moto.url) as proxy:
        storage = Storage(StorageSpec(endpoint=proxy.url, region=s3_moto.region))
        storage.write_retry_seconds = 4
        proxy.down = True
        started = time.monotonic()
        with pytest.raises(TrainerFailure) as failure:
            storage.write_bytes(f"s3://{s3_bucket_name}/x", b"x")
        assert not isinstance(failure.value, InvalidInput) and failure.value.exit_code == 1
        assert 2 <= time.monotonic() - started < 30
        proxy.down = False
        started = time.monotonic()
        with pytest.raises(InvalidInput):
            storage.write_bytes("s3://no-such-bucket-here/x", b"x")
        assert time.monotonic() - started < 3  # what retrying cannot fix is not retried


def test_sigterm_during_a_long_model_download_stops_within_the_grace(
    tmp_path: Path, tiny_model_s3: str, s3_moto
) -> None:
    """A stop before training has nothing to checkpoint: it must end the download and exit 3, not wait for it
    to finish until the watchdog cuts it off with exit 1."""
    import signal
    import time

    from tests.support.outage import outage_proxy
    from tests.trainer.conftest import TrainerProcess, s3_env

    grace = 20
    train = slice_jsonl(DATA / "support-instructions.jsonl", tmp_path / "train.jsonl", 20)
    with outage_proxy(s3_moto.url) as proxy:
        proxy.bytes_per_second = 15_000  # the 0.8 MB model takes about a minute
        cfg = base_config(
            tiny_model_s3,
            str(train),
            str(tmp_path / "out"),
            storage={"endpoint": proxy.url, "region": s3_moto.region},
        )
        env = {**s3_env(s3_moto), "KUBETUNE_STOP_GRACE_SECONDS": str(grace)}
        trainer = TrainerProcess(cfg, tmp_path, "slow", env)
        try:
            deadline = time.monotonic() + 60
            while (trainer.progress() or {}).get("stage") != "downloading":
                assert time.monotonic() < deadline and trainer.process.poll() is None, trainer.log()[-3000:]
                time.sleep(0.2)
            time.sleep(1)  # well into the weights
            signalled = time.monotonic()
            trainer.process.send_signal(signal.SIGTERM)
            code = trainer.wait(timeout=grace + 30)
            stopped_in = time.monotonic() - signalled
        finally:
            trainer.kill()
    assert code == 3, trainer.log()[-3000:]
    print(f"stopped {stopped_in:.1f} s after SIGTERM")
    assert stopped_in < grace, stopped_in
    assert trainer.result()["outcome"] == "preempted"
    assert not (tmp_path / "slow-work" / "model" / "COMPLETE").exists()


def test_checkpoint_uploads_run_while_training_goes_on(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload of step 2 is held until the loop has saved step 4 locally: that only happens if training
    goes on during the upload. Every checkpoint still ends complete at the destination."""
    import time

    from kubetune_trainer import checkpoints as ckpt

    real_upload = ckpt.upload_checkpoint
    overlapped: list[int] = []

    def slow_upload(storage: Storage, local_dir: Path, destination: str, step: int):
        if step == 2:
            later = local_dir.with_name("checkpoint-4")
            deadline = time.monotonic() + 60
            while not (later / "trainer_state.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if later.exists():
                overlapped.append(step)
        return real_upload(storage, local_dir, destination, step)

    monkeypatch.setattr(ckpt, "upload_checkpoint", slow_upload)
    train = slice_jsonl(DATA / "support-instructions.jsonl", tmp_path / "train.jsonl", 40)
    destination = tmp_path / "out"
    cfg = base_config(
        str(tiny_model_dir),
        str(train),
        str(destination),
        training={"maxSteps": 6, "checkpointEverySteps": 2, "evalEverySteps": 100, "checkpointsToKeep": 3},
    )
    result = run_in_process(cfg, tmp_path)
    assert result.code == 0, result.termination
    assert overlapped == [2]
    for step in (2, 4, 6):
        assert (destination / "checkpoints" / f"step-{step}" / "COMPLETE").exists()


def test_a_changed_model_source_downloads_the_new_model(
    tmp_path: Path, tiny_model_dir: Path, s3_moto, s3_bucket_name: str, s3_credentials
) -> None:
    """One work dir, the model source changed between runs (hidden size 64, then 32): the second run downloads
    the new model and trains an adapter shaped for it, not for the cached one (issue 29.5)."""
    from safetensors import safe_open

    from kubetune_cli.tiny import write_tiny_model

    s3_credentials(s3_moto)
    s3_moto.make_bucket(s3_bucket_name)
    narrow = write_tiny_model(tmp_path / "narrow-model", hidden_size=32, intermediate_size=64)
    s3_moto.upload_dir(tiny_model_dir, s3_bucket_name, "models/wide")
    s3_moto.upload_dir(narrow, s3_bucket_name, "models/narrow")
    train = slice_jsonl(DATA / "support-instructions.jsonl", tmp_path / "train.jsonl", 20)

    def run(model: str, destination: str) -> Path:
        cfg = base_config(
            f"s3://{s3_bucket_name}/models/{model}",
            str(train),
            str(tmp_path / destination),
            training={"maxSteps": 1},
            storage={"endpoint": s3_moto.url, "region": s3_moto.region},
        )
        result = run_in_process(cfg, tmp_path)  # the same work dir (run-work) both times
        assert result.code == 0, result.termination
        return tmp_path / destination / "adapter" / "adapter_model.safetensors"

    def input_widths(adapter: Path) -> set[int]:
        with safe_open(str(adapter), "pt") as weights:
            return {weights.get_slice(k).get_shape()[1] for k in weights.keys() if "lora_A" in k and "q_proj" in k}  # noqa: SIM118 (safe_open is no dict)

    assert input_widths(run("wide", "out-wide")) == {64}
    assert input_widths(run("narrow", "out-narrow")) == {32}
    assert json.loads((tmp_path / "run-work" / "model" / "config.json").read_text())["hidden_size"] == 32


def test_the_model_version_follows_the_objects_at_the_prefix(s3_moto, s3_bucket_name: str, s3_credentials) -> None:
    from kubetune_trainer.config import StorageSpec

    s3_credentials(s3_moto)
    s3_moto.make_bucket(s3_bucket_name)
    client = s3_moto.client()
    client.put_object(Bucket=s3_bucket_name, Key="models/a/config.json", Body=b"{}")
    client.put_object(Bucket=s3_bucket_name, Key="models/ab/config.json", Body=b"{}")  # not below models/a/
    storage = Storage(StorageSpec(endpoint=s3_moto.url, region=s3_moto.region))
    first = storage.version(f"s3://{s3_bucket_name}/models/a/")
    assert storage.version(f"s3://{s3_bucket_name}/models/a") == first
    client.put_object(Bucket=s3_bucket_name, Key="models/ab/model.safetensors", Body=b"x")
    assert storage.version(f"s3://{s3_bucket_name}/models/a/") == first
    client.put_object(Bucket=s3_bucket_name, Key="models/a/config.json", Body=b'{"hidden_size": 32}')
    assert storage.version(f"s3://{s3_bucket_name}/models/a/") != first
    assert storage.version("hf://org/model@v2") != storage.version("hf://org/model@v1")


# The outage window at a tenth of its size (18 s for 180 s, outages of 17 s and 20 s for 170 s and 200 s): the
# same backoff (1, 2, 4, 8, then the deadline), the real proxy. KUBETUNE_OUTAGE_SCALE=10 runs the full 170/200 s.
OUTAGE_SCALE = float(os.environ.get("KUBETUNE_OUTAGE_SCALE", "1"))


@pytest.mark.parametrize("outage, survives", [(17.0, True), (20.0, False)], ids=["170s-survives", "200s-fails"])
def test_one_deadline_for_the_whole_upload_from_the_first_failure(
    tmp_path: Path, s3_moto, s3_bucket_name: str, s3_credentials, outage: float, survives: bool
) -> None:
    """A checkpoint of more files than upload threads, its upload cut by an outage just shorter (or longer) than
    the window: it must go through (the last retry is at the deadline, and files still queued share the first
    failure's deadline), or fail with exit 1 leaving the previous checkpoint the newest complete one."""
    import threading
    import time

    from kubetune_trainer import checkpoints as ckpt
    from kubetune_trainer.config import StorageSpec
    from kubetune_trainer.errors import InvalidInput, TrainerFailure
    from kubetune_trainer.storage import DOWNLOAD_THREADS, WRITE_RETRY_SECONDS
    from tests.support.outage import outage_proxy

    window, outage = WRITE_RETRY_SECONDS / 10 * OUTAGE_SCALE, outage * OUTAGE_SCALE
    s3_credentials(s3_moto)
    s3_moto.make_bucket(s3_bucket_name)
    local = tmp_path / "checkpoint"
    for index in range(DOWNLOAD_THREADS * 3):
        (local / f"shard-{index:02d}.bin").parent.mkdir(exist_ok=True)
        (local / f"shard-{index:02d}.bin").write_bytes(bytes([index]) * 2000)
    destination = f"s3://{s3_bucket_name}/run"
    seen: list[str | None] = []
    with outage_proxy(s3_moto.url) as proxy:
        storage = Storage(StorageSpec(endpoint=proxy.url, region=s3_moto.region))
        storage.write_retry_seconds = window
        storage.on_retry = seen.append
        ckpt.upload_checkpoint(storage, local, destination, 5)  # before the outage
        proxy.down = True
        threading.Timer(outage, lambda: setattr(proxy, "down", False)).start()
        started = time.monotonic()
        if survives:
            ckpt.upload_checkpoint(storage, local, destination, 10)
        else:
            with pytest.raises(TrainerFailure) as failure:
                ckpt.upload_checkpoint(storage, local, destination, 10)
            assert not isinstance(failure.value, InvalidInput) and failure.value.exit_code == 1
        took = time.monotonic() - started
    direct = Storage(StorageSpec(endpoint=s3_moto.url, region=s3_moto.region))  # not through the proxy
    if survives:
        assert outage <= took < window + 10, took
        assert ckpt.latest_checkpoint(direct, destination).step == 10
        assert seen[-1] is None
    else:
        assert window - 1 <= took < window + 10, took  # not before the window is spent, not much after
        assert ckpt.latest_checkpoint(direct, destination).step == 5  # resumable from the one before
    retries = [message for message in seen if message]
    assert retries[0].startswith("storage unreachable, retrying for 0 s of ")
    assert f"of {window:.0f}: cannot write s3://" in retries[-1]
