"""What a user judges a fine-tuning tool by, on a real pretrained model: `kubetune demo` fine-tunes
SmolLM2-135M-Instruct (QLoRA, 4-bit NF4, on the CPU) on the shipped support dataset, and the fine-tuned model
must be measurably better at the task than the base model on questions it never trained on.

- The held-out eval loss (support-eval.jsonl, never trained on) falls by at least MIN_EVAL_GAIN.
- DPO (examples/data/preferences.jsonl as conversations): the held-out pairs' reward accuracy is well above
  chance (MIN_REWARD_ACCURACY).
- The held-out answers contain the product facts of the reference answers (menu paths, region names, error
  meanings: the words of the reference answer that the question does not give away) more often than the base
  model's answers to the same questions: more questions won than lost, and more on average.
  Greedy answers of a 135M model after 24 steps vary from run to run (the same seed gave different wordings on
  the same machine), so the check takes QUESTIONS questions, not the demo's three.

Time: the demo's 24 steps and 4 DPO steps, a few minutes on two quiet CPU cores.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from kubetune_cli.demo import DEMO_DATA, answers_table, held_out_questions, run_demo
from kubetune_trainer.contract import EXIT_OK
from tests.trainer.conftest import LIBRARY_WARNINGS

# A real model's run is longer than one unit of the suite's default timeout allows on a loaded machine
# (measured: the demo 4-5 min quiet, 10+ min with four other test runs on the same two cores).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    *(pytest.mark.filterwarnings(w) for w in LIBRARY_WARNINGS),
]

MIN_EVAL_GAIN = 0.25  # relative: measured 0.40 (4.16 -> 2.48) with the demo's settings
# The share of the reference facts recalled, mean over QUESTIONS, in three runs: 0.040 -> 0.118, 0.095 and 0.070
# (questions won/lost 4/0, 4/1, 3/1). The gain varies that much, so the check is that the fine-tuned answers
# recall more, not by how much: the eval loss is the quantitative check.
QUESTIONS = 6
MIN_REWARD_ACCURACY = 0.8  # DPO, held-out pairs: measured 1.0 after 4 steps (margin 0.17) and 8 (0.50)
ROOT = Path(__file__).resolve().parents[2]


def words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z][A-Za-z0-9-]{3,}", text)}


def fact_recall(question: str, reference: str, answer: str) -> float:
    """The share of the reference answer's facts (its words of 4+ letters that the question lacks) the answer has."""
    facts = words(reference) - words(question)
    return len(facts & words(answer)) / len(facts) if facts else 0.0


def test_the_demo_makes_smollm2_better_at_held_out_support_questions(tmp_path: Path, smollm2_dir: Path) -> None:
    out = io.StringIO()
    assert run_demo(tmp_path / "demo", model="smollm2", questions=QUESTIONS, out=out) == EXIT_OK, out.getvalue()
    artifacts = tmp_path / "demo" / "artifacts"
    metrics = json.loads((artifacts / "metrics.json").read_text())
    base, tuned = metrics["base_eval_loss"], metrics["eval_loss"]
    assert (base - tuned) / base >= MIN_EVAL_GAIN, (base, tuned)

    references = {
        row["prompt"]: row["response"]
        for row in map(json.loads, (DEMO_DATA / "support-eval.jsonl").read_text().splitlines())
    }
    samples = [json.loads(line) for line in (artifacts / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == held_out_questions(QUESTIONS)
    before = [fact_recall(s["prompt"], references[s["prompt"]], s["base_completion"]) for s in samples]
    after = [fact_recall(s["prompt"], references[s["prompt"]], s["completion"]) for s in samples]
    print(answers_table(samples), "fact recall before", before, "after", after)
    won = sum(a > b for a, b in zip(after, before, strict=True))
    lost = sum(a < b for a, b in zip(after, before, strict=True))
    assert won > lost, (before, after)
    assert sum(after) > sum(before), (before, after)

    # What the user reads: both losses, and every question with the two answers side by side.
    text = out.getvalue()
    assert f"eval loss on held-out questions: {base:.3f} (base model) -> {tuned:.3f} (fine-tuned)" in text
    for sample in samples:
        assert f"Q: {sample['prompt']}" in text
    assert (artifacts / "loss.svg").read_text().startswith("<svg")


def test_dpo_on_smollm2_prefers_the_helpful_answers_it_never_saw(tmp_path: Path, smollm2_dir: Path) -> None:
    """examples/data/preferences.jsonl (helpful vs curt support answers), as conversations through SmolLM2's chat
    template: after a short QLoRA DPO run, the held-out pairs' chosen answers out-reward the rejected ones."""
    from tests.trainer.conftest import base_config, run_in_process

    rows = [json.loads(line) for line in (ROOT / "examples" / "data" / "preferences.jsonl").read_text().splitlines()]
    chats = [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
        }
        for row in rows
    ]
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(c) + "\n" for c in chats[:30]))
    held_out.write_text("".join(json.dumps(c) + "\n" for c in chats[30:]))
    cfg = base_config(
        str(smollm2_dir),
        str(train),
        str(tmp_path / "out"),
        dataset={"format": "preference", "eval": str(held_out), "maxLength": 256},
        objective={"type": "dpo"},
        training={"maxSteps": 4, "batchSize": 4, "learningRate": 5e-5, "evalEverySteps": 2, "logEverySteps": 2},
    )
    result = run_in_process(cfg, tmp_path)
    assert result.code == 0, result.termination
    evals = json.loads((tmp_path / "out" / "metrics.json").read_text())["eval_reward_history"]
    print(
        "held-out reward accuracy / margin by step:",
        [(e["step"], e["reward_accuracy"], e["reward_margin"]) for e in evals],
    )
    assert evals[-1]["reward_accuracy"] >= MIN_REWARD_ACCURACY  # chance is 0.5
    assert evals[-1]["reward_margin"] > 0
