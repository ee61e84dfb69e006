"""Training data: load rows (.jsonl/.json/.csv/.parquet, a file or a prefix of them), render them in the
configured format, tokenize with the loss on the response only, truncate, pack, and collate.

Every row remembers its file and line, so a bad row fails the run with a message that points at it.
Packing is padding-free: examples are placed whole into rows of at most `budget` tokens (first-fit
decreasing; the budget is training.batchTokens, by default dataset.maxLength) and concatenated with
position_ids restarting at 0 for each example, one row a micro-batch. The collator adds the examples'
cumulative lengths (`cu_seq_lens_q/k`, `max_length_q/k`, the keywords of transformers' flash-attention
path), and the model attends within each example only (`kubetune_trainer.attention`): an example never
attends to its neighbours in the row, and a row of 20 examples costs what 20 short sequences cost. The
first token of each packed example carries no label, so the loss never asks the end of one example to
predict the start of the next: a packed example's loss is the example's loss alone.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer.config import DatasetSpec
from kubetune_trainer.errors import InvalidInput
from kubetune_trainer.storage import Storage

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips
# An example that trains fewer tokens than this is worth a warning: a one-word answer is rare, a column
# mapping or chat template that leaves only the end-of-turn token trained is the usual cause.
FEW_TRAINED_TOKENS = 4
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    record: dict[str, Any]
    file: str
    line: int  # 1-based: line of a .jsonl/.csv file, item of a .json array, row of a .parquet file


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizedData:
    examples: list[Example]
    truncated: int = 0  # examples cut to maxLength
    dropped: int = 0  # examples with no trainable token left after truncation
    tokens: int = field(default=0)
    lost_response_tokens: int = 0  # trained (labelled) tokens cut off by truncation
    # (untrained, trained) tokens of every row before truncation, in row order: what `kubetune plan` reports
    lengths: list[tuple[int, int]] = field(default_factory=list)

    @property
    def few_trained(self) -> int:
        """Examples whose trained (labelled) tokens, before truncation, are fewer than FEW_TRAINED_TOKENS."""
        return sum(trained < FEW_TRAINED_TOKENS for _, trained in self.lengths)


# -- loading ---------------------------------------------------------------------------------------


def load_rows(storage: Storage, uri: str, workdir: Path) -> list[Row]:
    """Every row of the data at `uri` (an object/file or a prefix/directory of supported files)."""
    # A URI ending in a data suffix is one object; anything else is a prefix (directory) of them.
    listing = uri if uri.endswith(SUFFIXES) or uri.endswith("/") else uri + "/"
    files = [u for u in storage.list(listing) if u.endswith(SUFFIXES)]
    if uri.endswith(SUFFIXES):
        files = [u for u in files if u == uri or u == uri.removeprefix("file://")]
    if not files:
        # `list` of a single object under S3 returns it too; nothing means nothing readable is there.
        if uri.startswith("s3://"):
            raise InvalidInput("ObjectNotFound", f"no {'/'.join(SUFFIXES)} data at {uri}", field="dataset")
        if Path(uri.removeprefix("file://")).exists():
            raise InvalidInput("InvalidDataset", f"{uri} holds no {'/'.join(SUFFIXES)} file", field="dataset")
        raise InvalidInput("ObjectNotFound", f"{uri} does not exist", field="dataset")
    rows: list[Row] = []
    for name in files:
        rows.extend(_parse(name, storage.read_bytes(name)))
    return rows


def _parse(name: str, data: bytes) -> list[Row]:
    try:
        if name.endswith(".jsonl"):
            return _jsonl(name, _text(name, data))
        if name.endswith(".json"):
            text = _text(name, data)
            try:
                doc = json.loads(text)
            except json.JSONDecodeError:
                return _jsonl(name, text)  # JSON Lines saved as .json
            if isinstance(doc, dict):
                doc = [doc]
            if not isinstance(doc, list):
                raise InvalidInput("InvalidDataset", f"{name}: expected a JSON array of objects", file=name)
            return [_object(name, i + 1, item) for i, item in enumerate(doc)]
        if name.endswith(".csv"):
            reader = csv.DictReader(io.StringIO(_text(name, data), newline=""))
            return [Row(dict(rec), name, reader.line_num) for rec in reader]
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        return [Row(rec, name, i + 1) for i, rec in enumerate(table.to_pylist())]
    except InvalidInput:
        raise
    except Exception as exc:  # pyarrow/csv errors: the file itself is unreadable
        raise InvalidInput("InvalidDataset", f"cannot read {name}: {exc}", file=name) from exc


_UTF16_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _text(name: str, data: bytes) -> str:
    """The file as text: UTF-8, with or without a byte order mark (Windows tools write one; pandas and
    datasets read it). Any other encoding is refused with the line where it stops being UTF-8."""
    if data.startswith(_UTF16_BOMS) or (len(data) >= 2 and b"\x00" in data[:2]):
        raise InvalidInput(
            "InvalidDataset",
            f"{name}:1: the file is UTF-16/UTF-32 text; save it as UTF-8",
            file=name,
            line=1,
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidInput(
            "InvalidDataset",
            f"{name}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8",
            file=name,
            line=line,
        ) from exc


def _jsonl(name: str, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(
                "InvalidDataset", f"{name}:{number}: not valid JSON ({exc.msg})", file=name, line=number
            ) from exc
        rows.append(_object(name, number, value))
    return rows


def _object(name: str, number: int, value: Any) -> Row:
    if not isinstance(value, dict):
        raise InvalidInput(
            "InvalidDataset",
            f"{name}:{number}: expected a JSON object, got {type(value).__name__}",
            file=name,
            line=number,
        )
    return Row(value, name, number)


def train_eval_rows(storage: Storage, spec: DatasetSpec, seed: int, workdir: Path) -> tuple[list[Row], list[Row]]:
    """The rows a run trains and evaluates on: dataset.eval, else a seeded evalSplit of dataset.train."""
    train_rows = load_rows(storage, spec.train, workdir)
    if spec.eval:
        return train_rows, load_rows(storage, spec.eval, workdir)
    if not train_rows:
        return train_rows, []
    return split_eval(train_rows, spec.eval_split, seed)


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out a seeded `fraction` of rows (at least one, never all) for evaluation."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# -- formatting and tokenizing ---------------------------------------------------------------------


def bad_row(row: Row, message: str, *, field: str | None = None) -> InvalidInput:
    """The error for an unusable row: InvalidDataset, its message led by `file:line`, the row's file and line."""
    return InvalidInput(
        "InvalidDataset", f"{row.file}:{row.line}: {message}", field=field, file=row.file, line=row.line
    )


def _field(row: Row, name: str, kind: type, what: str) -> Any:
    if name not in row.record or row.record[name] is None:
        present = ", ".join(sorted(row.record)) or "none"
        raise bad_row(
            row,
            f"missing field {name!r} ({what}; fields present: {present}); set dataset.fields to map your column names",
            field=f"dataset.fields.{what}",
        )
    value = row.record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise bad_row(
            row,
            f"field {name!r} must be a {kind.__name__}, got {type(value).__name__}",
            field=f"dataset.fields.{what}",
        )
    return value


def instruction_prompt(spec: DatasetSpec, prompt: str) -> str:
    """The template up to {response}: what the model sees before it answers (also used for samples)."""
    return spec.template[: spec.template.index("{response}")].replace("{prompt}", prompt)


def encode_row(row: Row, spec: DatasetSpec, tokenizer: Any) -> Example:
    """Tokens and labels of one row: prompt tokens labelled IGNORE_INDEX, response tokens and EOS trained."""
    eos = tokenizer.eos_token_id
    if spec.format == "instruction":
        prompt = _field(row, spec.fields.prompt, str, "prompt")
        response = _field(row, spec.fields.response, str, "response")
        tail = spec.template[spec.template.index("{response}") :].replace("{prompt}", prompt)
        prompt_ids = tokenizer(instruction_prompt(spec, prompt), add_special_tokens=True)["input_ids"]
        if prompt_ids and prompt_ids[-1] == eos:  # tokenizers that append EOS themselves
            prompt_ids = prompt_ids[:-1]
        response_ids = tokenizer(tail.replace("{response}", response), add_special_tokens=False)["input_ids"]
        response_ids = [*response_ids, eos]
        return Example([*prompt_ids, *response_ids], [IGNORE_INDEX] * len(prompt_ids) + response_ids)
    if spec.format == "text":
        text = _field(row, spec.fields.text, str, "text")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != eos:
            ids = [*ids, eos]
        return Example(ids, list(ids))
    return _encode_chat(row, spec, tokenizer)


def _check_messages(row: Row, spec: DatasetSpec) -> list[dict[str, str]]:
    messages = _field(row, spec.fields.messages, list, "messages")
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise bad_row(
                row, f"message {i} must be an object with string role and content", field="dataset.fields.messages"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise bad_row(row, "no assistant message to learn from", field="dataset.fields.messages")
    return messages


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # a `{% generation %}` tag, not `add_generation_prompt`


def _encode_chat(row: Row, spec: DatasetSpec, tokenizer: Any) -> Example:
    """Chat rows through the tokenizer's chat template; only assistant turns carry labels: each assistant
    message's content and the token that ends its turn, never the role header nor the text between turns.

    Templates with `{% generation %}` blocks mark those tokens themselves (`return_assistant_tokens_mask`).
    For the others (most Hugging Face templates) the text each assistant turn adds is found by rendering
    the conversation up to that turn with and without it, and the tokens of the whole rendering that fall
    in that text are trained. Either way a row whose assistant content ends up with no trained token fails
    the run naming its file and line: a template that hides the answers must never train on nothing.
    """
    messages = _check_messages(row, spec)
    try:
        if GENERATION_BLOCK.search(tokenizer.chat_template or ""):
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = list(out["input_ids"])
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"], strict=True)]
        else:
            ids, labels = _label_assistant_spans(messages, tokenizer, row)
    except InvalidInput:
        raise
    except Exception as exc:  # the template raised (unknown role, ...)
        raise bad_row(row, f"chat template failed: {exc}") from exc
    if all(label == IGNORE_INDEX for label in labels) and any(
        m["role"] == "assistant" and m["content"].strip() for m in messages
    ):
        raise bad_row(
            row,
            "the model's chat template marks no token of the assistant messages as the answer, so "
            "this row would train on nothing; use dataset.format instruction with a template, or a tokenizer "
            "whose chat template renders the assistant turns",
            field="dataset.format",
        )
    # A template whose assistant turns end in plain text would never teach the model to stop: add EOS then.
    trained = [label for label in labels if label != IGNORE_INDEX]
    if messages[-1]["role"] == "assistant" and not (trained and _ends_turn(trained[-1], tokenizer)):
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Example(ids, labels)


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    if not messages and not generation_prompt:
        return ""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return str(text)


def _label_assistant_spans(messages: list[dict[str, str]], tokenizer: Any, row: Row) -> tuple[list[int], list[int]]:
    """Tokens of the whole conversation, with labels on the characters each assistant turn adds after its
    role header (`add_generation_prompt`), up to its end-of-turn token where the template writes one."""
    full = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise bad_row(
                row,
                f"the model's chat template renders message {i} differently once later messages "
                "follow, so its answer tokens cannot be told apart; use dataset.format instruction with a template",
                field="dataset.format",
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    offsets = encoded["offset_mapping"]
    for start, end in spans:
        # A token that straddles the header's end (" Paris" after "Assistant:") starts the answer.
        inside = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
        closing = [i for i in inside if _ends_turn(ids[i], tokenizer)]
        if closing:  # the newline a template writes after its end-of-turn token belongs to no answer
            inside = inside[: inside.index(closing[-1]) + 1]
        for i in inside:
            labels[i] = ids[i]
    return ids, labels


def _ends_turn(token: int, tokenizer: Any) -> bool:
    """EOS, or a special token the template closes turns with (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`)."""
    if token == tokenizer.eos_token_id:
        return True
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token)
    return bool(added is not None and added.special)


def tokenize(rows: list[Row], spec: DatasetSpec, tokenizer: Any, *, name: str = "train") -> TokenizedData:
    """Encode every row; cut to maxLength; drop (and count) examples left with nothing to learn."""
    if not rows:
        raise InvalidInput("EmptyDataset", f"the {name} dataset has no rows", field=f"dataset.{name}")
    if spec.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise InvalidInput(
            "InvalidDataset",
            "dataset.format chat needs a tokenizer with a chat template, and this model's has none; "
            "use format instruction or text",
            field="dataset.format",
        )
    out = TokenizedData([])
    for row in rows:
        example = encode_row(row, spec, tokenizer)
        trained = sum(label != IGNORE_INDEX for label in example.labels)
        out.lengths.append((len(example.labels) - trained, trained))
        if len(example.input_ids) > spec.max_length:
            out.truncated += 1
            out.lost_response_tokens += sum(label != IGNORE_INDEX for label in example.labels[spec.max_length :])
            example = Example(example.input_ids[: spec.max_length], example.labels[: spec.max_length])
        if all(label == IGNORE_INDEX for label in example.labels):
            out.dropped += 1
            continue
        out.examples.append(example)
        out.tokens += len(example.input_ids)
    if out.truncated:
        log.warning(
            "%s data: %d of %d examples truncated to maxLength %d (%d left with no response tokens, dropped)",
            name,
            out.truncated,
            len(rows),
            spec.max_length,
            out.dropped,
        )
    if out.few_trained:
        log.warning(
            "%s data: %d of %d examples train fewer than %d tokens each; check dataset.fields and the template",
            name,
            out.few_trained,
            len(rows),
            FEW_TRAINED_TOKENS,
        )
    if not out.examples:
        raise InvalidInput(
            "InvalidDataset",
            f"every {name} example was truncated to nothing: dataset.maxLength {spec.max_length} leaves no "
            "response token after the prompt; raise maxLength or shorten the prompts/template",
            field="dataset.maxLength",
        )
    return out


# -- packing and collation -------------------------------------------------------------------------


def pack(examples: list[Example], budget: int) -> list[dict[str, list[int]]]:
    """First-fit-decreasing rows of whole examples, at most `budget` tokens each, with position_ids
    restarting per example and no label on each example's first token (nothing before it in its example
    predicts it; in the row the previous example's last token would)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        size = len(examples[i].input_ids)
        for b, room in enumerate(free):
            if size <= room:
                bins[b].append(i)
                free[b] -= size
                break
        else:
            bins.append([i])
            free.append(budget - size)
    packed = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            ids += examples[i].input_ids
            labels += [IGNORE_INDEX, *examples[i].labels[1:]]
            positions += list(range(len(examples[i].input_ids)))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


def as_features(examples: list[Example], budget: int, packing: bool) -> list[dict[str, list[int]]]:
    """Packed rows of at most `budget` tokens, or one feature per example (`budget` unused)."""
    if packing:
        return pack(examples, budget)
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


class Collator:
    """A batch as the model takes it.

    Packed features (with position_ids) are concatenated into one row - no padding at all - with the
    examples' cumulative lengths for segment/varlen attention (`cu_seq_lens_q/k`, `max_length_q/k`).
    Unpacked features are padded to the longest, with an attention_mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        out: dict[str, Any]
        if "position_ids" in features[0]:
            ids = [t for f in features for t in f["input_ids"]]
            labels = [t for f in features for t in f["labels"]]
            positions = [p for f in features for p in f["position_ids"]]
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            cu = torch.tensor(starts, dtype=torch.int32)
            longest = int((cu[1:] - cu[:-1]).max())
            out = {
                "input_ids": torch.tensor([ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long),
                "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu,
                "max_length_q": longest,
                "max_length_k": longest,
            }
        else:
            width = max(len(f["input_ids"]) for f in features)
            batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
            for f in features:
                n = width - len(f["input_ids"])
                batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * n)
                batch["labels"].append(f["labels"] + [IGNORE_INDEX] * n)
                batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * n)
            out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        return {**out, **logits_at_labels(out["labels"])}


def logits_at_labels(labels: Any) -> dict[str, Any]:
    """The positions whose next token is a label, for the model to compute logits (and the loss) there only.

    `logits_to_keep` (a boolean [batch, T] mask: transformers' causal LMs apply the LM head to those hidden
    states only) and `shift_labels` (the targets of those positions, in the same order): the loss is the
    model's own cross-entropy over exactly the positions it would count, without a full-vocabulary logits
    tensor for the prompt tokens. The Trainer counts `shift_labels` for its token-weighted normalization."""
    import torch

    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = shifted != IGNORE_INDEX
    if not keep.any():  # a batch with nothing to learn: one ignored position keeps the shapes non-empty
        keep[0, 0] = True
    return {"logits_to_keep": keep, "shift_labels": shifted[keep]}
