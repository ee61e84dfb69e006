"""objective dpo on the tiny model: it learns a preference rule, its bad rows fail with file:line, it resumes.

The rule: chosen answers are polite ("Gladly: ... thank you."), rejected ones rude ("No. ... go away."), around
the same random words. The eval pairs use words the training pairs never do, so a reward accuracy above chance
on them means the rule was learnt, not the pairs.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.conftest import LIBRARY_WARNINGS, TrainerProcess, base_config, run_in_process

pytestmark = [*(pytest.mark.filterwarnings(w) for w in LIBRARY_WARNINGS)]

TRAIN_WORDS = ["cats", "dogs", "rain", "tea", "maps", "ships", "bread", "music", "snow", "trains", "books", "rivers"]
EVAL_WORDS = ["lamps", "coins", "stars", "hills", "clocks", "roads"]
VERBS = ["likes", "needs", "finds", "keeps", "wants", "sees"]


def preference_rows(words: list[str], n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        subject, verb, thing = rng.choice(words), rng.choice(VERBS), rng.choice(words)
        rows.append(
            {
                "prompt": f"Tell me about {subject}.",
                "chosen": f" Gladly: {subject} {verb} {thing}, thank you.",
                "rejected": f" No. {subject} {verb} {thing}, go away.",
            }
        )
    return rows


def write_rows(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dpo_config(model: Path, train: str, destination: str, **sections: Any) -> dict[str, Any]:
    training = {"maxSteps": 12, "batchSize": 4, "learningRate": 0.005, "evalEverySteps": 4, "logEverySteps": 2}
    return base_config(
        str(model),
        train,
        destination,
        dataset={"format": "preference", **sections.pop("dataset", {})},
        objective={"type": "dpo", **sections.pop("objective", {})},
        training={**training, **sections.pop("training", {})},
        **sections,
    )


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("preference-data")
    return (
        write_rows(folder / "train.jsonl", preference_rows(TRAIN_WORDS, 96, seed=1)),
        write_rows(folder / "eval.jsonl", preference_rows(EVAL_WORDS, 16, seed=2)),
    )


@pytest.mark.slow
def test_qlora_dpo_learns_the_rule_on_held_out_pairs(
    tmp_path: Path, tiny_model_dir: Path, preference_files: tuple[str, str]
) -> None:
    train, held_out = preference_files
    cfg = dpo_config(
        tiny_model_dir,
        train,
        str(tmp_path / "out"),
        dataset={"eval": held_out},
        evaluation={"prompts": ["Tell me about lamps."], "maxNewTokens": 8},
    )
    result = run_in_process(cfg, tmp_path)
    assert result.code == 0, result.termination
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    history = metrics["reward_history"]
    # Step 1: the policy is the reference (the adapter starts at zero), so every reward is 0 and none wins.
    assert history[0]["step"] == 1 and history[0]["reward_accuracy"] == 0.0 and history[0]["reward_margin"] == 0.0
    evals = metrics["eval_reward_history"]
    assert [e["step"] for e in evals] == [4, 8, 12]
    print(
        "held-out reward accuracy / margin by step:",
        [(e["step"], e["reward_accuracy"], e["reward_margin"]) for e in evals],
    )
    assert evals[-1]["reward_accuracy"] >= 0.9  # chance is 0.5
    assert evals[-1]["reward_margin"] > 1.0
    assert evals[-1]["reward_margin"] > evals[0]["reward_margin"] > 0  # the margin grows
    assert evals[-1]["reward_chosen"] > 0 > evals[-1]["reward_rejected"]
    assert metrics["first_train_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: sigmoid DPO loss at margin 0
    assert metrics["train_loss"] < 0.3
    assert metrics["perplexity"] is None  # exp(DPO loss) is no perplexity
    assert metrics["dpo"]["reference_model"] == "base model, adapter disabled"
    # The termination message carries the final held-out numbers.
    assert result.termination["result"]["rewardAccuracy"] == evals[-1]["reward_accuracy"]
    assert result.termination["result"]["rewardMargin"] == pytest.approx(evals[-1]["reward_margin"])
    # Artifacts as for SFT: a single adapter (no reference copy), a model card that says DPO, samples.
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "ref").exists()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "objective: dpo" in card and "loss sigmoid, beta 0.1" in card and "adapter disabled" in card
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == "Tell me about lamps."


GOOD = {"prompt": "Hi?", "chosen": " Hello.", "rejected": " Go."}


@pytest.mark.parametrize(
    ("row", "field", "fragment"),
    [
        ({"prompt": "Hi?", "rejected": " Go."}, "chosen", "missing field 'chosen'"),
        ({"prompt": "Hi?", "chosen": " Hello.", "rejected": "  "}, "rejected", "field 'rejected' is empty"),
        ({"prompt": "Hi?", "chosen": " Same.", "rejected": " Same."}, "rejected", "are identical: no preference"),
        (
            {"prompt": "Hi?", "chosen": 3, "rejected": " Go."},
            "chosen",
            "must be a string or a list of messages, got int",
        ),
        ({"prompt": ["Hi?"], "chosen": " Hello.", "rejected": " Go."}, "prompt", "'prompt' must be a string, got list"),
        (
            {"prompt": "Hi?", "chosen": " Hello.", "rejected": [{"role": "assistant", "content": "Go."}]},
            "rejected",
            "must both be strings or both message lists",
        ),
        (
            {"chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]},
            "prompt",
            "share no first message",
        ),
        (
            {"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "A"}], "rejected": []},
            "rejected",
            "'rejected' is an empty message list",
        ),
    ],
    ids=[
        "missing-chosen",
        "empty-rejected",
        "chosen-equals-rejected",
        "wrong-type",
        "prompt-type",
        "mixed-forms",
        "chat-no-shared-prompt",
        "chat-empty-answer",
    ],
)
def test_bad_preference_row_exits_2_with_file_line_and_field(
    tmp_path: Path, tiny_model_dir: Path, row: dict[str, Any], field: str, fragment: str
) -> None:
    train = write_rows(tmp_path / "train.jsonl", [GOOD, GOOD, row, GOOD])
    result = run_in_process(dpo_config(tiny_model_dir, train, str(tmp_path / "out")), tmp_path)
    assert result.code == 2, result.termination
    error = result.termination["error"]
    assert error["reason"] == "InvalidDataset"
    assert (error["file"], error["line"], error["field"]) == (train, 3, f"dataset.fields.{field}")
    assert f"{train}:3: " in error["message"] and fragment in error["message"], error


def test_preference_forms_and_truncation_are_counted(tiny_model_dir: Path) -> None:
    from kubetune_trainer import preference
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.data import Row
    from kubetune_trainer.model import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir, False)
    cfg = TrainerConfig.model_validate(
        dpo_config(
            tiny_model_dir, "/d.jsonl", "/out", dataset={"maxLength": 32}, objective={"dpo": {"maxPromptLength": 8}}
        )
    )
    user = {"role": "user", "content": "Where are the logs?"}
    chat = Row(
        {
            "chosen": [user, {"role": "assistant", "content": "Under Help."}],
            "rejected": [user, {"role": "assistant", "content": "Nowhere."}],
        },
        "/d.jsonl",
        1,
    )
    data = preference.tokenize([chat], cfg, tokenizer)
    assert data.conversational and data.truncated == 1  # the templated prompt is longer than 8 tokens
    pair = data.examples[0]
    assert len(pair.prompt_ids) == 8
    full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": "Under Help."}], tokenize=False)
    # The prompt keeps its end (the generation prompt), the answer is the assistant turn alone.
    assert full.endswith(tokenizer.decode(pair.prompt_ids + pair.chosen_ids))
    assert "Under Help." in tokenizer.decode(pair.chosen_ids) and "Where" not in tokenizer.decode(pair.chosen_ids)
    text = Row({"prompt": "Short?", "chosen": " yes " * 40, "rejected": " no " * 40}, "/d.jsonl", 2)
    data = preference.tokenize([text], cfg, tokenizer)
    pair = data.examples[0]
    assert not data.conversational and data.truncated == 1
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 32 and pair.chosen_ids[-1] != tokenizer.eos_token_id
    short = preference.tokenize([Row(GOOD, "/d.jsonl", 3)], cfg, tokenizer)
    assert short.truncated == 0 and short.examples[0].chosen_ids[-1] == tokenizer.eos_token_id


@pytest.mark.slow
def test_lora_dpo_with_a_reference_model_and_sft_term(
    tmp_path: Path, tiny_model_dir: Path, preference_files: tuple[str, str]
) -> None:
    train, _ = preference_files
    objective = {"dpo": {"loss": "ipo", "sftWeight": 1.0, "referenceModel": {"source": str(tiny_model_dir)}}}
    cfg = dpo_config(
        tiny_model_dir,
        train,
        str(tmp_path / "out"),
        method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        objective=objective,
        training={"maxSteps": 4, "evalEverySteps": 100},
    )
    result = run_in_process(cfg, tmp_path)
    assert result.code == 0, result.termination
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["dpo"] == {
        "beta": 0.1,
        "loss": "ipo",
        "label_smoothing": 0.0,
        "max_prompt_length": 64,
        "sft_weight": 1.0,
        "reference_model": str(tiny_model_dir),
    }
    history = metrics["reward_history"]
    # The reference is the same weights as the starting policy: rewards start at 0, then move apart.
    assert history[0]["reward_margin"] == 0.0
    assert history[-1]["reward_margin"] > 0
    assert "ipo" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.slow
def test_sigterm_checkpoint_then_resume_keeps_the_reward_trajectory(
    tmp_path: Path, tiny_model_dir: Path, preference_files: tuple[str, str]
) -> None:
    train, held_out = preference_files
    training = {"maxSteps": 10, "checkpointEverySteps": 1000, "evalEverySteps": 1000, "logEverySteps": 1}
    cfg = dpo_config(tiny_model_dir, train, str(tmp_path / "run"), dataset={"eval": held_out}, training=training)
    first = TrainerProcess(cfg, tmp_path, "first", {})
    try:
        progress = first.wait_for_step(4, timeout=180)
        # /progress carries the reward metrics of the last logged step.
        assert progress["rewardAccuracy"] is not None and "rewardMargin" in progress
        first.process.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 3, first.log()[-3000:]
    finally:
        first.kill()
    step = first.result()["checkpoint"]["step"]
    assert step >= 4
    second = TrainerProcess(cfg, tmp_path, "second", {})
    try:
        assert second.wait(timeout=240) == 0, second.log()[-3000:]
    finally:
        second.kill()
    assert f"resuming from step {step}" in second.log()
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == step and resumed["steps"] == 10

    # The same run without a stop: after the checkpoint step the rewards follow the same path.
    whole = run_in_process({**cfg, "output": {"destination": str(tmp_path / "whole")}}, tmp_path, "whole")
    assert whole.code == 0, whole.termination
    uninterrupted = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    after = {e["step"]: e for e in resumed["reward_history"] if e["step"] > step}
    reference = {e["step"]: e for e in uninterrupted["reward_history"] if e["step"] > step}
    assert sorted(after) == sorted(reference) == list(range(step + 1, 11))
    for s in after:
        assert after[s]["reward_margin"] == pytest.approx(reference[s]["reward_margin"], abs=0.02, rel=0.02), s
        assert after[s]["reward_accuracy"] == pytest.approx(reference[s]["reward_accuracy"], abs=0.26), s
    assert resumed["reward_margin"] == pytest.approx(uninterrupted["reward_margin"], abs=0.02, rel=0.02)


def test_dpo_settings_reach_trl(tmp_path: Path, tiny_model_dir: Path) -> None:
    from trl import DPOConfig

    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.train import training_arguments

    objective = {"dpo": {"loss": "robust", "beta": 0.25, "sftWeight": 0.5}}
    cfg = TrainerConfig.model_validate(dpo_config(tiny_model_dir, "/d.jsonl", "/out", objective=objective))
    args = training_arguments(cfg, tmp_path, "fp32", has_eval=False)
    assert isinstance(args, DPOConfig)
    assert (args.beta, args.loss_type, args.loss_weights) == (0.25, ["robust", "sft"], [1.0, 0.5])
    assert args.label_smoothing == 0.1  # robust's default, the Robust DPO paper's
    # The shared settings are the SFT path's, not TRL's defaults.
    assert (args.learning_rate, args.per_device_train_batch_size, args.max_steps) == (0.005, 4, 12)
    assert args.gradient_checkpointing is False and args.bf16 is False


@pytest.mark.slow
def test_full_dpo_trains_against_a_frozen_copy_of_the_base(
    tmp_path: Path, tiny_model_dir: Path, preference_files: tuple[str, str]
) -> None:
    train, _ = preference_files
    cfg = dpo_config(
        tiny_model_dir,
        train,
        str(tmp_path / "out"),
        method={"type": "full"},
        training={"maxSteps": 3, "evalEverySteps": 100, "learningRate": 1e-3},
    )
    result = run_in_process(cfg, tmp_path)
    assert result.code == 0, result.termination
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["dpo"]["reference_model"] == "frozen copy of the base model"
    assert metrics["reward_history"][0]["reward_margin"] == 0.0  # the copy is the policy at step 0
    assert metrics["reward_history"][-1]["reward_margin"] != 0.0
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    assert result.termination["artifacts"]["merged"].endswith("/model/")


def test_preference_rows_from_parquet_chat_and_csv_text(tmp_path: Path, tiny_model_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kubetune_trainer import preference
    from kubetune_trainer.config import StorageSpec, TrainerConfig
    from kubetune_trainer.data import load_rows
    from kubetune_trainer.errors import InvalidInput
    from kubetune_trainer.model import load_tokenizer
    from kubetune_trainer.storage import Storage

    tokenizer = load_tokenizer(tiny_model_dir, False)
    storage = Storage(StorageSpec())
    user = [{"role": "user", "content": "Where are the logs?"}]
    table = pa.Table.from_pylist(
        [
            {
                "question": user,
                "good": [{"role": "assistant", "content": "Under Help."}],
                "bad": [{"role": "assistant", "content": "Nowhere."}],
            }
        ]
        * 3
    )
    pq.write_table(table, tmp_path / "prefs.parquet")
    fields = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    cfg = TrainerConfig.model_validate(
        dpo_config(tiny_model_dir, str(tmp_path / "prefs.parquet"), "/out", dataset={"fields": fields})
    )
    data = preference.tokenize(load_rows(storage, cfg.dataset.train, tmp_path), cfg, tokenizer)
    assert data.conversational and len(data.examples) == 3
    assert "Under Help." in tokenizer.decode(data.examples[0].chosen_ids)

    (tmp_path / "prefs.csv").write_text('prompt,chosen,rejected\nHi?, Hello., Go.\n"Bye?", Bye!,\n')
    cfg = TrainerConfig.model_validate(dpo_config(tiny_model_dir, str(tmp_path / "prefs.csv"), "/out"))
    rows = load_rows(storage, cfg.dataset.train, tmp_path)
    assert not preference.tokenize(rows[:1], cfg, tokenizer).conversational
    with pytest.raises(InvalidInput, match=r"prefs.csv:3: field 'rejected' is empty") as failure:
        preference.tokenize(rows, cfg, tokenizer)
    assert failure.value.error.line == 3
