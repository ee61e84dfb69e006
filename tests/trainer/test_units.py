"""The pieces a run is made of, checked on their own: masking, packing, checkpoints, metrics, messages."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from kubetune_trainer.config import DatasetSpec
from kubetune_trainer.contract import TerminationMessage, TrainerError
from kubetune_trainer.data import IGNORE_INDEX, Example, Row, encode_row, pack
from kubetune_trainer.storage import Storage


@pytest.fixture(scope="module")
def tokenizer():
    from kubetune_cli.tiny import build_tokenizer

    return build_tokenizer()


def test_instruction_labels_only_the_response_and_eos(tokenizer) -> None:
    spec = DatasetSpec(train="/d.jsonl")
    example = encode_row(Row({"prompt": "Hi there", "response": "Hello"}, "f", 1), spec, tokenizer)
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained[:-1]) == "Hello"
    assert trained[-1] == tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.decode(example.input_ids).startswith("### Instruction:\nHi there\n\n### Response:\n")


def test_chat_labels_only_assistant_turns(tokenizer) -> None:
    spec = DatasetSpec(train="/d.jsonl", format="chat")
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four"},
    ]
    example = encode_row(Row({"messages": messages}, "f", 1), spec, tokenizer)
    trained = [t if label != IGNORE_INDEX else None for t, label in zip(example.input_ids, example.labels, strict=True)]
    spans, current = [], []
    for token in trained:
        if token is None:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(token)
    spans.append(current)
    texts = [tokenizer.decode(span) for span in spans if span]
    assert texts == ["two</s>", "four</s>"]


def test_packing_keeps_examples_apart(tokenizer) -> None:
    """Packed with per-example position_ids and no attention mask, each example's logits are exactly what
    it gets alone: no attention across examples."""
    import torch

    from kubetune_cli.tiny import build_model

    model = build_model(tokenizer)
    a = Example([5, 6, 7, 8, 9], [5, 6, 7, 8, 9])
    b = Example([10, 11, 12], [10, 11, 12])
    (packed,) = pack([a, b], 16)
    assert packed["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]
    with torch.no_grad():
        together = model(
            input_ids=torch.tensor([packed["input_ids"]]),
            position_ids=torch.tensor([packed["position_ids"]]),
            use_cache=False,  # as in training: packing is read from position_ids only when there is no cache
        ).logits
        alone = model(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits
    torch.testing.assert_close(together[0, 5:], alone[0], rtol=1e-4, atol=1e-4)


def test_pack_fills_bins_first_fit_decreasing() -> None:
    examples = [Example([1] * n, [1] * n) for n in (6, 5, 4, 3, 2)]
    bins = pack(examples, 10)
    assert sorted(len(b["input_ids"]) for b in bins) == [10, 10]


def test_gradient_checkpointing_follows_the_device_unless_set() -> None:
    import torch

    from kubetune_trainer.config import TrainingSpec
    from kubetune_trainer.model import gradient_checkpointing

    assert gradient_checkpointing(TrainingSpec()) is torch.cuda.is_available()
    assert gradient_checkpointing(TrainingSpec(gradientCheckpointing=True)) is True  # never overridden
    assert gradient_checkpointing(TrainingSpec(gradientCheckpointing=False)) is False


def test_precision_auto_picks_bf16_only_on_cpus_that_multiply_it_natively() -> None:
    from kubetune_trainer.model import cpu_has_native_bf16

    assert cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 fma\n")
    assert cpu_has_native_bf16("flags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags\t\t: fpu avx2 avx512f avx512bw fma\n")  # emulated: fp32 is as fast
    assert not cpu_has_native_bf16("")


def test_checkpoints_keep_the_newest_complete(tmp_path: Path) -> None:
    from kubetune_trainer import checkpoints as ckpt

    storage = Storage()
    destination = str(tmp_path / "dest")
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "adapter_model.safetensors").write_bytes(b"x" * 10)
    for step in (5, 10, 15):
        ckpt.upload_checkpoint(storage, local, destination, step)
    # An upload cut short: files without the marker, newer than every complete one.
    storage.write_bytes(ckpt.checkpoint_uri(destination, 20) + "adapter_model.safetensors", b"partial")
    assert ckpt.latest_checkpoint(storage, destination).step == 15
    assert ckpt.prune_checkpoints(storage, destination, keep=2) == [5]
    complete, incomplete = ckpt.list_checkpoints(storage, destination)
    assert [c.step for c in complete] == [10, 15] and [c.step for c in incomplete] == [20]


def test_termination_message_stays_under_4_kib() -> None:
    message = TerminationMessage(
        outcome="invalid", exit_code=2, error=TrainerError(reason="InvalidDataset", message="x" * 10000)
    )
    encoded = message.encode()
    assert len(encoded.encode()) <= 4096
    assert json.loads(encoded)["error"]["reason"] == "InvalidDataset"


def test_metrics_and_progress_endpoints() -> None:
    from kubetune_trainer.server import Telemetry, serve

    telemetry = Telemetry(namespace="team", name="support-bot")
    telemetry.update(step=5, total_steps=20, train_loss=1.5, learning_rate=1e-4, tokens_per_second=900.0)
    telemetry.child(telemetry.tokens).inc(1234)
    telemetry.set_stage("train")
    server = serve(telemetry, port=0, host="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        progress = json.loads(urllib.request.urlopen(base + "/progress", timeout=5).read())
        text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert progress["stage"] == "train" and progress["step"] == 5 and progress["totalSteps"] == 20
    assert progress["percent"] == 25.0 and progress["trainLoss"] == 1.5
    assert 'kubetune_trainer_step{finetunejob="support-bot",namespace="team"} 5.0' in text
    assert 'kubetune_trainer_tokens_total{finetunejob="support-bot",namespace="team"} 1234.0' in text
    assert 'kubetune_trainer_stage{finetunejob="support-bot",namespace="team",stage="train"} 1.0' in text
    assert 'stage="setup"} 0.0' in text
    assert "kubetune_trainer_checkpoint_upload_seconds_bucket" in text


def test_progress_moves_while_a_slow_step_runs() -> None:
    """A laptop or a busy node may take minutes a step: the ETA counts the step in progress, on /progress and
    in the eta_seconds gauge, and grows once the step runs longer than the mean; `updatedAt` is the read time."""
    from kubetune_trainer.server import Telemetry

    now = [1000.0]
    telemetry = Telemetry(namespace="team", name="slow", clock=lambda: now[0])
    telemetry.update(step=0, total_steps=10)
    telemetry.set_stage("train")
    telemetry.step_done(0, 10, start=True)
    assert telemetry.progress().eta_seconds is None  # no step done yet: no pace to go by
    now[0] += 100.0
    telemetry.step_done(1, 10)  # 100 s a step so far, 9 to go
    etas = []
    for elapsed in (0.0, 30.0, 60.0, 100.0, 150.0, 250.0):
        now[0] = 1100.0 + elapsed
        etas.append(telemetry.progress().eta_seconds)
    assert etas == [900.0, 870.0, 840.0, 800.0, 8 * 150.0, 8 * 250.0]
    assert b'kubetune_trainer_eta_seconds{finetunejob="slow",namespace="team"} 2000.0' in telemetry.exposition()
    telemetry.set_stage("evaluating")  # no training pace while evaluating: the last ETA stands
    assert telemetry.progress().eta_seconds is None


def test_sigterm_before_training_stops_at_once_and_after_waits_for_the_step() -> None:
    import os
    import signal
    import time

    from kubetune_trainer.checkpoints import Preempted, StopRequest

    stop = later = StopRequest(grace=30)
    previous = stop.install()
    try:
        with pytest.raises(Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, in the main thread
        later = StopRequest(grace=30)
        later.install()
        later.interruptible = False  # training: only a flag for the loop to see
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert later.requested
    finally:
        stop.finish()
        later.finish()
        signal.signal(signal.SIGTERM, previous)


def test_objective_for_picks_sft_or_dpo_and_says_what_differs() -> None:
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.objectives import Dpo, Sft, objective_for

    base = {"model": {"source": "/m"}, "dataset": {"train": "/d.jsonl"}, "output": {"destination": "/o"}}
    sft = objective_for(TrainerConfig.model_validate(base))
    assert isinstance(sft, Sft) and sft.adapter_in_model and sft.language_model_loss and sft.unit == "examples"
    assert sft.layout() == f" (packed, <= {sft.cfg.packed_row_tokens()} tokens each)"
    assert sft.arguments()[0].__name__ == "TrainingArguments" and sft.metrics([{"loss": 1.0, "step": 1}]) == {}

    preference = {**base, "dataset": {"train": "/d.jsonl", "format": "preference"}, "objective": {"type": "dpo"}}
    for method, adapter_in_model in (("qlora", False), ("lora", False), ("full", True)):
        dpo = objective_for(TrainerConfig.model_validate({**preference, "method": {"type": method}}))
        # With adapters TRL adds them itself, so that its reference pass is the base with the adapter disabled.
        assert isinstance(dpo, Dpo) and dpo.adapter_in_model is adapter_in_model, method
        assert not dpo.language_model_loss and dpo.unit == "pairs" and dpo.layout() == ""
        args_class, settings = dpo.arguments()
        assert args_class.__name__ == "DPOConfig" and settings["beta"] == 0.1
