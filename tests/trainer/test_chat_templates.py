"""Chat rows train exactly the assistant turns, on the chat templates real models ship.

Each case renders multi-turn conversations through a real template on SmolLM2-135M-Instruct's tokenizer (its
own template, or another family's with that family's special tokens added) and checks token by token that the
trained tokens are each assistant message followed by the token that ends its turn: no role header, no system
or user text, no newline between turns. Most Hugging Face templates have no `{% generation %}` block but do
mention `add_generation_prompt`, which once sent them down the assistant-mask path and trained on nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.config import DatasetSpec
from kubetune_trainer.data import IGNORE_INDEX, Row, encode_row, tokenize
from kubetune_trainer.errors import InvalidInput

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template, as published.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
    " + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# ChatML with TRL's `{% generation %}` markers around what the assistant says.
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Turns that end in plain text: the trainer adds EOS so that the model learns to stop.
PLAIN = (
    "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

CONVERSATIONS = [
    [
        {"role": "user", "content": "How do I reset my password?"},
        {"role": "assistant", "content": "Open Settings > Security and choose Reset password."},
    ],
    [
        {"role": "system", "content": "You are Acme's support assistant."},
        {"role": "user", "content": "Sync fails with error E1042."},
        {"role": "assistant", "content": "E1042 means the token expired: sign out and back in."},
        {"role": "user", "content": "It still fails."},
        {"role": "assistant", "content": "Then clear the cache under Settings > Storage, and retry."},
    ],
]


def tokenizer_with(smollm2_dir: Path, template: str | None, **special: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special.values())})
        if "bos" in special:
            tokenizer.bos_token = special["bos"]
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def trained_runs(example: Any, tokenizer: Any) -> list[str]:
    """The trained tokens, as the texts of their contiguous runs."""
    runs: list[list[int]] = [[]]
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE_INDEX:
            if runs[-1]:
                runs.append([])
        else:
            assert label == token
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs if run]


def answers(messages: list[dict[str, str]], end: str, strip: bool = False) -> list[str]:
    return [(m["content"].strip() if strip else m["content"]) + end for m in messages if m["role"] == "assistant"]


LLAMA3_TOKENS = {
    "bos": "<|begin_of_text|>",
    "start": "<|start_header_id|>",
    "end": "<|end_header_id|>",
    "eot": "<|eot_id|>",
}


@pytest.mark.parametrize(
    ("template", "special", "end"),
    [
        pytest.param(None, {}, "<|im_end|>", id="smollm2"),
        pytest.param(CHATML, {}, "<|im_end|>", id="chatml"),
        pytest.param(LLAMA3, LLAMA3_TOKENS, "<|eot_id|>", id="llama3"),
        pytest.param(CHATML_GENERATION, {}, "<|im_end|>", id="generation-block"),
        pytest.param(PLAIN, {}, "\n<|im_end|>", id="plain-text-turns"),
    ],
)
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "two-turns-with-system"])
def test_only_assistant_turns_and_their_end_of_turn_are_trained(
    smollm2_dir: Path, template: str | None, special: dict[str, str], end: str, conversation: list[dict[str, str]]
) -> None:
    tokenizer = tokenizer_with(smollm2_dir, template, **special)
    if template is None:  # the model's own template: the one that trained on nothing before
        assert "add_generation_prompt" in tokenizer.chat_template
        assert "{% generation %}" not in tokenizer.chat_template
    spec = DatasetSpec(train="/d.jsonl", format="chat")
    example = encode_row(Row({"messages": conversation}, "chat.jsonl", 3), spec, tokenizer)
    runs = trained_runs(example, tokenizer)
    if template == PLAIN:  # no end-of-turn token: each answer ends with its newline, the last with the trainer's EOS
        runs = [run.removeprefix(" ") for run in runs]  # "Assistant:" + " Open": the space goes with the answer
        assert runs[:-1] == answers(conversation, "\n")[:-1]
        assert runs[-1] == answers(conversation, end)[-1]
        assert example.labels[-1] == example.input_ids[-1] == tokenizer.eos_token_id
    else:
        assert runs == answers(conversation, end, strip=template == LLAMA3)
    # What the trainer feeds the model is the template's own rendering, token for token.
    rendered = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert example.input_ids[: len(rendered)] == list(rendered)


def test_a_template_that_hides_the_answers_fails_the_row_by_file_and_line(smollm2_dir: Path) -> None:
    only_users = (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] + '\\n' }}"
        "{% endif %}{% endfor %}"
    )
    tokenizer = tokenizer_with(smollm2_dir, only_users)
    spec = DatasetSpec(train="/d.jsonl", format="chat")
    with pytest.raises(InvalidInput) as raised:
        encode_row(Row({"messages": CONVERSATIONS[0]}, "chat.jsonl", 7), spec, tokenizer)
    assert raised.value.error.file == "chat.jsonl" and raised.value.error.line == 7
    assert "train on nothing" in str(raised.value)
    assert raised.value.error.field == "dataset.format"


def test_smollm2_chat_rows_train_their_answers_not_one_token(smollm2_dir: Path) -> None:
    """The case the bug report measured: every example trained 1 token (the appended EOS)."""
    tokenizer = tokenizer_with(smollm2_dir, None)
    spec = DatasetSpec(train="/d.jsonl", format="chat")
    rows = [Row({"messages": c}, "chat.jsonl", i + 1) for i, c in enumerate(CONVERSATIONS)]
    data = tokenize(rows, spec, tokenizer)
    expected = [
        len(tokenizer("".join(answers(c, "<|im_end|>")), add_special_tokens=False)["input_ids"]) for c in CONVERSATIONS
    ]
    assert [trained for _, trained in data.lengths] == expected
    assert min(expected) > 10 and data.few_trained == 0
