"""`kubetune plan`: its memory estimate against the peak a real run allocates, its schedule against the loop's,
and the command's output and exit codes.

The peak is measured on the CPU with torch's profiler, which records every tensor allocation and free: the
tensors alive when training starts (parameters and buffers) plus the highest running total of what training
allocates is what `torch.cuda.max_memory_allocated` reports on a GPU. The tiny model here is wider than the
suite's usual one (hidden 128, 3 layers, GQA) so that every term of the estimate is visible.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.trainer.conftest import DATA, LIBRARY_WARNINGS, base_config, slice_jsonl

pytestmark = [pytest.mark.slow, *(pytest.mark.filterwarnings(w) for w in LIBRARY_WARNINGS)]

# The estimate is within this fraction of the measured peak (measured: -6.1% to +4.8% over the tiny model's
# cases below, +1.8% on SmolLM2-135M).
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def plan_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_cli.tiny import write_tiny_model

    return write_tiny_model(
        tmp_path_factory.mktemp("plan-model"),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )


def measured_peak(prepared: Any) -> int:
    """Peak bytes of tensors during `trainer.train()`, as torch allocates them (CPU profiler)."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    # Earlier tests' trainers sit in reference cycles until the collector runs; if it ran during this training,
    # their frees would count against this run's allocations (measured: -14% on the checkpointing case).
    gc.collect()

    model = prepared.trainer.model
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    alive = sum(t.untyped_storage().nbytes() for t in tensors.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        prepared.trainer.train()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return alive + peak


CASES = {
    "qlora-fp32": ({"type": "qlora"}, {"precision": "fp32"}),
    "qlora-bf16-checkpointing": ({"type": "qlora"}, {"precision": "bf16", "gradientCheckpointing": True}),
    "lora-bf16-dropout": ({"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}}, {"precision": "bf16"}),
    "full-fp32": ({"type": "full"}, {"precision": "fp32"}),
}


def estimate_and_measure(model_dir: Path, tmp_path: Path, rows: int, method: dict, training: dict, **dataset: Any):
    """The plan's estimate and the peak a real run of the same config allocates; returns (plan, prepared, peak)."""
    from transformers import AutoConfig

    from kubetune_trainer import plan
    from kubetune_trainer import train as train_mod
    from kubetune_trainer.checkpoints import StopRequest
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.server import Telemetry
    from kubetune_trainer.storage import Storage

    train = slice_jsonl(DATA / "support-instructions.jsonl", tmp_path / "train.jsonl", rows)
    cfg = TrainerConfig.model_validate(
        base_config(
            str(model_dir),
            str(train),
            str(tmp_path / "out"),
            method=method,
            dataset={"maxLength": 256, "evalSplit": 0.1, **dataset},
            training={"maxSteps": None, "epochs": 1.0, "batchSize": 4, "warmupRatio": 0.3, **training},
        )
    )
    ctx = train_mod.Context(
        cfg, tmp_path / "work", Storage(cfg.storage), Telemetry(), StopRequest(), train_mod.Distributed()
    )
    prepared = train_mod.setup(ctx)
    peak = measured_peak(prepared)

    rows_read = train_mod.data_mod.train_eval_rows(ctx.storage, cfg.dataset, cfg.training.seed, ctx.workdir)
    target = plan.Target(cuda=False, memory_bytes=None)
    result = plan.make_plan(cfg, *rows_read, prepared.tokenizer, AutoConfig.from_pretrained(model_dir), target)
    assert result.memory is not None and result.schedule is not None and result.data is not None
    return result, prepared, peak


@pytest.mark.parametrize("case", sorted(CASES))
def test_memory_estimate_and_schedule_match_a_real_run(case: str, tmp_path: Path, plan_model: Path) -> None:
    from kubetune_trainer import train as train_mod

    method, training = CASES[case]
    if method["type"] != "full":
        method.setdefault("lora", {"r": 16, "alpha": 32, "dropout": 0.0})
    result, prepared, peak = estimate_and_measure(plan_model, tmp_path, 24, method, training)
    error = result.memory.peak_bytes / peak - 1
    print(f"{case}: estimate {result.memory.peak_bytes} measured {peak} error {error:+.1%}")
    assert abs(error) <= TOLERANCE, (case, result.memory.parts, peak)

    state = prepared.trainer.state
    assert result.schedule.total_steps == state.max_steps == state.global_step
    assert result.schedule.warmup_steps == prepared.trainer.args.get_warmup_steps(state.max_steps)
    assert result.data.examples == len(prepared.train_data.examples)
    assert result.data.sequences == len(prepared.trainer.train_dataset)
    assert result.data.real_tokens == state.num_input_tokens_seen  # one epoch: every real token once
    trainable, _ = train_mod.model_mod.trainable_parameters(prepared.trainer.model)
    assert result.parameters["trainable"] == trainable


def test_memory_estimate_matches_a_real_run_of_a_pretrained_model(tmp_path: Path, smollm2_dir: Path) -> None:
    """SmolLM2-135M-Instruct with the CRD's method defaults (QLoRA nf4, LoRA r 16 with dropout on every linear
    layer), bf16, rows packed to 1,024 tokens: a real architecture (GQA, a 49k vocabulary, tied embeddings,
    30 layers), where the head and loss are fused (`kubetune_trainer.loss`)."""
    result, _, peak = estimate_and_measure(
        smollm2_dir, tmp_path, 16, {"type": "qlora"}, {"precision": "bf16"}, maxLength=1024
    )
    error = result.memory.peak_bytes / peak - 1
    print(f"smollm2: estimate {result.memory.peak_bytes} measured {peak} error {error:+.1%}")
    assert abs(error) <= TOLERANCE, (result.memory.parts, peak)


def write_job(path: Path, model: Path, train: str, **dataset: Any) -> Path:
    job = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "planned"},
        "spec": {
            "model": {"source": str(model)},
            "dataset": {"train": train, "maxLength": 128, **dataset},
            "training": {"epochs": 2.0, "batchSize": 4, "gradientAccumulationSteps": 2, "checkpointEverySteps": 20},
            "output": {"destination": str(path.parent / "out")},
        },
    }
    path.write_text(yaml.safe_dump(job))
    return path


def plan_command(*args: str) -> tuple[int, str, str]:
    import contextlib

    from kubetune_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    level = logging.getLogger("kubetune_trainer").level
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["plan", *args])
    assert logging.getLogger("kubetune_trainer").level == level  # quietened for the command only
    return code, out.getvalue(), err.getvalue()


def test_plan_prints_the_data_the_run_and_the_fit(tmp_path: Path, plan_model: Path) -> None:
    job = write_job(tmp_path / "job.yaml", plan_model, f"{DATA}/support-instructions.jsonl")
    code, out, err = plan_command(str(job), "--gpu", "L4-24GB")
    assert code == 0, err
    for line in ("rows", "prompt tokens", "truncated at maxLength", "packing efficiency", "warm-up steps", "verdict"):
        assert f"  {line}" in out, out
    assert "fits with" in out and "GiB to spare" in out
    assert "[[" in out  # the example's trained tokens are marked

    code, out, err = plan_command(str(job), "--gpu", "L4-24GB", "-o", "json")
    assert code == 0, err
    document = json.loads(out)
    data, run = document["data"], document["schedule"]
    assert data["train_rows"] + data["eval_rows"] == 300 and document["rejected_count"] == 0
    assert data["truncated"] > 0 and data["lost_response_tokens"] > 0
    assert data["response_tokens"]["max"] > 128 - data["prompt_tokens"]["min"]  # before truncation
    assert 0 < data["packing_efficiency"] <= 1
    # Packed (the default): one row of at most batchTokens (unset: maxLength) tokens a micro-batch, so an
    # optimizer step is gradientAccumulationSteps rows, whatever batchSize says.
    assert data["micro_batch_size"] == 1 and data["row_tokens"] == 128 and data["longest_sequence"] <= 128
    assert run["total_steps"] == 2 * run["steps_per_epoch"] and run["global_batch"] == 2
    assert 0 < data["predicted_tokens"] < data["processed_tokens"]  # logits at label positions only
    assert run["checkpoints_written"] == run["total_steps"] // 20
    assert any(s["trained"] for s in data["example"]) and any(not s["trained"] for s in data["example"])
    assert document["fit"]["fits"] is True and document["eta"]["seconds"][0] < document["eta"]["seconds"][1]
    # The trainer's defaults on a GPU: bf16, gradient checkpointing, paged 8-bit AdamW for QLoRA.
    assert document["memory"]["precision"] == "bf16" and document["memory"]["gradient_checkpointing"] is True
    assert document["memory"]["optimizer"] == "paged_adamw_8bit"


def test_a_cpu_run_gets_an_eta_from_this_cpus_measured_gemm_rate(tmp_path: Path, plan_model: Path) -> None:
    job = write_job(tmp_path / "job.yaml", plan_model, f"{DATA}/support-instructions.jsonl")
    spec = yaml.safe_load(job.read_text())
    spec["spec"]["resources"] = {"gpus": 0}
    job.write_text(yaml.safe_dump(spec))
    code, out, err = plan_command(str(job), "-o", "json")
    assert code == 0, err
    eta, run = json.loads(out)["eta"], json.loads(out)["schedule"]
    assert eta["device"].startswith("this CPU's measured") and eta["peak_flops"] > 1e9  # any CPU does a GFLOP/s
    assert eta["tokens"] > 0 and run["total_steps"] > 0
    # the range is the work over the peak at the assumed utilisation, slowest at the lowest
    work = eta["flops_per_token"] * eta["tokens"]
    low, high = eta["utilisation"]
    assert eta["seconds"] == pytest.approx([work / (eta["peak_flops"] * high), work / (eta["peak_flops"] * low)])
    code, out, err = plan_command(str(job))
    assert code == 0, err
    assert "ETA" in out and "of this CPU's measured" in out and "GEMM rate" in out, out


@pytest.mark.parametrize(
    ("dataset", "training", "advised"),
    [
        ({"packing": True}, {"batchTokens": 16384}, "batchTokens"),  # packed rows: the row's token budget
        ({"packing": False}, {"batchSize": 64}, "batchSize"),  # padded sequences: how many a micro-batch
    ],
)
def test_a_gpu_too_small_gets_advice_that_fits(
    tmp_path: Path, plan_model: Path, dataset: dict[str, Any], training: dict[str, Any], advised: str
) -> None:
    job = write_job(tmp_path / "job.yaml", plan_model, f"{DATA}/support-instructions.jsonl", **dataset)
    spec = yaml.safe_load(job.read_text())
    spec["spec"]["training"].update({**training, "gradientCheckpointing": False})
    job.write_text(yaml.safe_dump(spec))
    code, out, _ = plan_command(str(job), "--gpu-memory", "1.15Gi", "-o", "json")
    assert code == 4  # the gate: a run that does not fit
    document = json.loads(out)
    verdict = document["fit"]["verdict"]
    assert document["fit"]["fits"] is False and verdict.startswith("does not fit"), verdict
    assert f"lower {'training.' if advised == 'batchTokens' else ''}{advised} to " in verdict, verdict
    assert "gradientCheckpointing" in verdict
    smaller = int(verdict.split(f"{advised} to ")[1].split()[0])
    spec["spec"]["training"][advised] = smaller
    job.write_text(yaml.safe_dump(spec))
    code, out, _ = plan_command(str(job), "--gpu-memory", "1.15Gi", "-o", "json")
    assert json.loads(out)["fit"]["fits"] is True and code == 0


def test_bad_rows_exit_2_with_the_trainers_messages(tmp_path: Path, plan_model: Path) -> None:
    good = {"prompt": "How do I reset my password?", "response": "Open Settings, then Security."}
    rows = [good, {"question": "no prompt here"}, good, {"prompt": 3, "response": "x"}, good]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    job = write_job(tmp_path / "job.yaml", plan_model, str(train), evalSplit=0.0)
    code, _, err = plan_command(str(job))
    assert code == 2
    assert f"{train}:2: missing field 'prompt' (prompt; fields present: question)" in err
    assert f"{train}:4: field 'prompt' must be a str, got int" in err
    assert "2 rows rejected" in err

    from kubetune_trainer.errors import InvalidInput
    from tests.trainer.conftest import base_config, run_in_process

    trainer = run_in_process(base_config(str(plan_model), str(train), str(tmp_path / "t-out")), tmp_path)
    assert trainer.code == InvalidInput.exit_code
    assert trainer.termination["error"]["message"] in err  # the first rejection, word for word


def test_an_unknown_target_module_is_refused_as_the_trainer_refuses_it(tmp_path: Path, plan_model: Path) -> None:
    job = write_job(tmp_path / "job.yaml", plan_model, f"{DATA}/support-instructions.jsonl")
    spec = yaml.safe_load(job.read_text())
    spec["spec"]["method"] = {"type": "lora", "lora": {"targetModules": ["q_proj", "query_key_value"]}}
    job.write_text(yaml.safe_dump(spec))
    code, _, err = plan_command(str(job))
    assert code == 2
    assert "method.lora.targetModules ['query_key_value'] not in the model" in err and "q_proj" in err


def test_dpo_is_refused_with_what_plan_covers(tmp_path: Path, plan_model: Path) -> None:
    job = write_job(
        tmp_path / "job.yaml", plan_model, str(Path(__file__).parents[2] / "examples/data/preferences.jsonl")
    )
    spec = yaml.safe_load(job.read_text())
    spec["spec"]["objective"] = {"type": "dpo"}
    spec["spec"]["dataset"]["format"] = "preference"
    job.write_text(yaml.safe_dump(spec))
    code, out, err = plan_command(str(job), "--gpu", "L4-24GB")
    assert code == 1 and not out
    assert "objective dpo: kubetune plan estimates supervised fine-tuning (objective sft) only" in err, err


def test_bad_options_name_what_is_valid(tmp_path: Path, plan_model: Path) -> None:
    job = write_job(tmp_path / "job.yaml", plan_model, f"{DATA}/support-instructions.jsonl")
    code, _, err = plan_command(str(job), "--gpu", "A10")
    assert code == 1 and "H100-80GB" in err and "A10G-24GB" in err
    code, _, err = plan_command(str(job), "--gpu-memory", "lots")
    assert code == 1 and "24Gi" in err


@pytest.mark.parametrize(
    ("written", "planned", "precision"),
    [
        ("L4", "L4-24GB", "bf16"),
        ("a100", "A100-40GB", "bf16"),  # sold with 40 and 80 GB: planned on the smaller
        ("A100 80GB", "A100-80GB", "bf16"),
        ("nvidia-h100", "H100-PCIe-80GB", "bf16"),  # SXM and PCIe: planned on the slower
        ("T4", "T4-16GB", "fp16"),  # no bf16 on Turing and Volta: the trainer's auto precision picks fp16
        ("v100", "V100-32GB", "fp16"),
    ],
)
def test_gpus_by_the_names_people_write(
    tmp_path: Path, plan_model: Path, written: str, planned: str, precision: str
) -> None:
    job = write_job(tmp_path / "job.yaml", plan_model, f"{DATA}/support-instructions.jsonl")
    code, out, err = plan_command(str(job), "--gpu", written, "-o", "json")
    assert code == 0, err
    document = json.loads(out)
    assert document["target"]["gpu"]["name"] == planned
    assert document["memory"]["precision"] == precision


def test_a_run_that_outgrows_its_disk_fails_the_gate_with_the_size_to_set(tmp_path: Path, plan_model: Path) -> None:
    job = write_job(tmp_path / "job.yaml", plan_model, f"{DATA}/support-instructions.jsonl")
    spec = yaml.safe_load(job.read_text())
    spec["spec"]["resources"] = {"disk": "1Gi"}  # the tiny model fits, the 2 GiB of headroom does not
    job.write_text(yaml.safe_dump(spec))
    code, out, err = plan_command(str(job), "--gpu", "L4")
    assert code == 4
    assert "local disk per pod" in out and "model download" in out
    assert "does not fit: local disk: does not fit in 1.00 GiB: set spec.resources.disk to at least 3Gi" in err
    spec["spec"]["resources"] = {"disk": "3Gi"}
    job.write_text(yaml.safe_dump(spec))
    code, out, err = plan_command(str(job), "--gpu", "L4", "-o", "json")
    assert code == 0, err
    document = json.loads(out)
    assert document["disk"]["total_bytes"] <= document["disk_available"] == 3 * 1024**3


def test_a_memory_limit_below_what_the_pod_needs_fails_the_gate(tmp_path: Path, plan_model: Path) -> None:
    job = write_job(tmp_path / "job.yaml", plan_model, f"{DATA}/support-instructions.jsonl")
    spec = yaml.safe_load(job.read_text())
    spec["spec"]["resources"] = {"memory": "2Gi"}  # request and limit: the runtime alone takes more
    job.write_text(yaml.safe_dump(spec))
    code, out, err = plan_command(str(job), "--gpu", "L4")
    assert code == 4 and "memory per pod" in out
    assert "does not fit: pod memory: does not fit in 2.00 GiB (its limit): set spec.resources.memory" in err
    spec["spec"]["resources"] = {}  # the default request (16Gi per GPU) and no limit: no gate
    job.write_text(yaml.safe_dump(spec))
    code, out, err = plan_command(str(job), "--gpu", "L4", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["host_memory"]["total_bytes"] < 16 * 1024**3


def test_data_that_trains_on_nothing_fails_the_gate(tmp_path: Path, plan_model: Path) -> None:
    job = write_job(tmp_path / "job.yaml", plan_model, f"{DATA}/support-instructions.jsonl", maxLength=16)
    code, out, err = plan_command(str(job), "--gpu", "L4")
    assert code == 2 and not out  # the trainer's own refusal, before any GPU time
    assert "truncated to nothing" in err


def test_plan_in_a_fresh_process_prints_no_library_notices(tmp_path: Path, plan_model: Path) -> None:
    """bitsandbytes logs a kernel notice when imported on a CPU with AVX512-BF16; a plan runs no kernel."""
    import os
    import subprocess
    import sys

    job = write_job(tmp_path / "job.yaml", plan_model, f"{DATA}/support-instructions.jsonl")
    repo = Path(__file__).resolve().parents[2]
    path = os.pathsep.join(str(repo / folder) for folder in ("operator", "trainer", "cli", "."))
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_cli.main", "plan", str(job), "--gpu", "T4"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=os.environ | {"PYTHONPATH": path},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "fp16" in result.stdout


def test_plan_reads_s3_and_never_downloads_the_weights(
    tmp_path: Path, tiny_model_s3: str, s3_moto: Any, s3_bucket_name: str, s3_credentials: Any, monkeypatch: Any
) -> None:
    from kubetune_trainer.storage import Storage

    s3_credentials(s3_moto)
    client = s3_moto.client()
    client.upload_file(str(DATA / "support-instructions.jsonl"), s3_bucket_name, "data/train.jsonl")
    fetched: list[str] = []
    download = Storage.download
    monkeypatch.setattr(Storage, "download", lambda self, uri, to: fetched.append(uri) or download(self, uri, to))
    job = write_job(tmp_path / "job.yaml", Path("/unused"), f"s3://{s3_bucket_name}/data/train.jsonl")
    spec = yaml.safe_load(job.read_text())
    spec["spec"]["model"]["source"] = tiny_model_s3 + "/"
    job.write_text(yaml.safe_dump(spec))
    code, out, err = plan_command(str(job), "--gpu", "T4-16GB", "--s3-endpoint", s3_moto.url, "-o", "json")
    assert code == 0, err
    document = json.loads(out)
    assert document["data"]["train_rows"] + document["data"]["eval_rows"] == 300
    assert document["memory"]["precision"] == "fp16"  # a T4 has no bf16: the trainer's choice there
    assert any(uri.endswith("config.json") for uri in fetched) and any("tokenizer" in uri for uri in fetched)
    assert not [uri for uri in fetched if uri.endswith(".safetensors")], fetched


def test_plan_counts_trained_tokens_per_example_on_a_real_chat_template(tmp_path: Path, smollm2_dir: Path) -> None:
    """SmolLM2's chat template once left one trained token an example (`response tokens min 1 ... max 1`)."""
    conversations = [
        [
            {"role": "user", "content": f"What does error E10{i} mean?"},
            {"role": "assistant", "content": f"E10{i} means the sync token expired; sign out and back in."},
        ]
        for i in range(12)
    ]
    train = tmp_path / "chat.jsonl"
    train.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    job = write_job(tmp_path / "job.yaml", smollm2_dir, str(train), format="chat", evalSplit=0)
    code, out, err = plan_command(str(job), "-o", "json")
    assert code == 0, err
    data = json.loads(out)["data"]
    assert data["response_tokens"]["min"] >= 15 and data["few_trained"] == 0

    one_word = tmp_path / "short.jsonl"
    one_word.write_text("".join(json.dumps({"prompt": f"Is {i} even?", "response": "No"}) + "\n" for i in range(12)))
    job = write_job(tmp_path / "short.yaml", smollm2_dir, str(one_word), evalSplit=0)
    code, out, err = plan_command(str(job))
    assert code == 0, err
    assert "12 examples train fewer than 4 tokens" in out
