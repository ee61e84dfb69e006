"""The benchmark's workload: one model, one tokenizer, one dataset, shared by every contender.

Everything here is deterministic and built locally (no hub): a byte-level BPE tokenizer trained on
the generated data (`kubetune_cli.tiny.build_tokenizer`), a Llama-architecture model with
seeded random weights, and instruction rows whose prompt/response lengths follow a stated
log-normal distribution. `prepare()` writes them once under the work directory and reuses them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "bench" / ".work"
# The seed guide's step 3 template (and kubetune's default).
TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n{response}"
MAX_LENGTH = 512  # the seed guide's max_length; every contender truncates there


@dataclass(frozen=True)
class ModelSize:
    """A Llama config. The bench default is ~8.8M parameters: big enough that matmuls dominate a
    CPU step, small enough that the seed recipe's 512-padded batches finish in about a minute."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    vocab_size: int = 8000
    max_position_embeddings: int = 1024


@dataclass(frozen=True)
class DataSpec:
    """Instruction rows shaped like Alpaca, the dataset the seed guide's template comes from.

    Alpaca's 52k rows hold ~350 characters of instruction + input + output on average (its dataset
    card: 47.8 MB over four string columns, one of them the formatted text), ~90 tokens; most answers
    are a sentence or a short paragraph, a long tail are essays. So: lengths drawn in words from
    log-normals and clipped, prompt median 24 words (sigma 0.6, 6-200), response median 64 (sigma 0.9,
    2-400); with this tokenizer a word is ~1.2 tokens, so a formatted example is ~100 tokens at the
    median and a few exceed the seed's 512. The measured token distribution is written to the results.
    """

    train_rows: int = 512
    eval_rows: int = 24
    prompt_median: float = 24.0
    prompt_sigma: float = 0.6
    prompt_range: tuple[int, int] = (6, 200)
    response_median: float = 64.0
    response_sigma: float = 0.9
    response_range: tuple[int, int] = (2, 400)
    lexicon: int = 3000
    seed: int = 1234


# Long answers (the second data set, so the levers are not tuned to short rows): responses of a few
# paragraphs, like long-form chat or report-writing data - formatted examples of ~400-900 tokens, median
# >= 400 (measured and written to the results). Capped at 680 words so no example outgrows the model's 1024
# positions.
LONG_DATA = DataSpec(
    prompt_median=30.0,
    response_median=330.0,
    response_sigma=0.35,
    response_range=(120, 680),
    seed=4321,
)
DATA_SETS = {"alpaca": DataSpec(), "long": LONG_DATA}

SMOKE_MODEL = ModelSize(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=1000,
    max_position_embeddings=1024,
)
SMOKE_DATA = DataSpec(train_rows=32, eval_rows=4, prompt_median=20, response_median=30, lexicon=300)

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def _lexicon(rng: random.Random, size: int) -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def tokenizer_words(model_dir: Path, size: int) -> list[str]:
    """The `size` commonest whole words of a real model's byte-level BPE vocabulary (merge order is frequency
    order), each one token after a space. Made-up words cost a real tokenizer ~2.6 tokens each, so rows
    built from them are twice Alpaca's length in tokens; built from these, a word is ~1.1 tokens as in
    English text, and the rows keep Alpaca's shape."""
    from transformers import AutoTokenizer

    vocabulary = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    words = []
    for token, _ in sorted(vocabulary.items(), key=lambda item: item[1]):
        word = token[1:]
        if token.startswith("\u0120") and word.isalpha() and word.islower() and len(word) >= 3:
            words.append(word)
    return words[:size]


class _Language:
    """A Zipfian bigram language over a lexicon (made-up words unless given): learnable structure, so eval
    loss can fall."""

    def __init__(self, rng: random.Random, size: int, words: list[str] | None = None):
        self.words = words[:size] if words else _lexicon(rng, size)
        size = len(self.words)
        self.cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(size)))  # Zipf
        self.successors = [rng.sample(range(size), 6) for _ in range(size)]
        self.rng = rng

    def text(self, n_words: int, start: int | None = None) -> str:
        rng = self.rng
        current = start if start is not None else rng.choices(range(len(self.words)), cum_weights=self.cum_weights)[0]
        out = []
        for i in range(n_words):
            out.append(self.words[current])
            if i % 12 == 11:
                out[-1] += "."
            if rng.random() < 0.8:
                current = rng.choice(self.successors[current])
            else:
                current = rng.choices(range(len(self.words)), cum_weights=self.cum_weights)[0]
        return " ".join(out)


def _length(rng: random.Random, median: float, sigma: float, bounds: tuple[int, int]) -> int:
    return max(bounds[0], min(bounds[1], round(math.exp(rng.gauss(math.log(median), sigma)))))


def generate_rows(spec: DataSpec, words: list[str] | None = None) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval) rows of {prompt, response}; eval rows are held out (never trained on)."""
    rng = random.Random(spec.seed)
    language = _Language(rng, spec.lexicon, words)
    rows = []
    for _ in range(spec.train_rows + spec.eval_rows):
        n_prompt = _length(rng, spec.prompt_median, spec.prompt_sigma, spec.prompt_range)
        n_response = _length(rng, spec.response_median, spec.response_sigma, spec.response_range)
        prompt = "Continue the notes: " + language.text(n_prompt - 3)
        # The response continues the prompt's chain, so it depends on the prompt.
        last = language.words.index(prompt.rsplit(" ", 1)[-1].rstrip("."))
        response = language.text(n_response, start=rng.choice(language.successors[last]))
        rows.append({"prompt": prompt, "response": response})
    return rows[: spec.train_rows], rows[spec.train_rows :]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Workload:
    root: Path
    model_dir: Path
    train_file: Path
    eval_file: Path

    def train_subset(self, examples: int) -> Path:
        """The first `examples` training rows, in their own file (every contender reads this one)."""
        path = self.root / f"train-{examples}.jsonl"
        if not path.exists():
            write_jsonl(path, read_jsonl(self.train_file)[:examples])
        return path


def prepare(root: Path = WORK, size: ModelSize = ModelSize(), data: DataSpec = DataSpec()) -> Workload:
    """Build (once) the tokenizer, the model with seeded random weights, and the data under `root`."""
    key = hashlib.sha256(json.dumps([asdict(size), asdict(data)]).encode()).hexdigest()[:12]
    root = root / f"workload-{key}"
    workload = Workload(root, root / "model", root / "train.jsonl", root / "eval.jsonl")
    if (root / "READY").exists():
        return workload
    from kubetune_cli.tiny import build_model, build_tokenizer

    train, held_out = generate_rows(data)
    write_jsonl(workload.train_file, train)
    write_jsonl(workload.eval_file, held_out)
    texts = [TEMPLATE.format(**row) for row in train]
    tokenizer = build_tokenizer(texts, vocab_size=size.vocab_size, model_max_length=MAX_LENGTH)
    model = build_model(
        tokenizer,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        max_position_embeddings=size.max_position_embeddings,
        seed=0,
    )
    model.save_pretrained(workload.model_dir)
    tokenizer.save_pretrained(workload.model_dir)
    (root / "READY").write_text(key)
    return workload


def prepare_pretrained(model_dir: Path, root: Path = WORK, data: DataSpec = DataSpec()) -> Workload:
    """A real pretrained model (SmolLM2-135M-Instruct, from `kubetune_cli.pretrained`) with the same generated
    rows, over the commonest words of its own vocabulary (`tokenizer_words`): the model is used as it is, so
    only the data is written under `root`."""
    key = hashlib.sha256(json.dumps(["pretrained", "tokenizer-words", asdict(data)]).encode()).hexdigest()[:12]
    root = root / f"workload-{key}"
    workload = Workload(root, model_dir, root / "train.jsonl", root / "eval.jsonl")
    if not (root / "READY").exists():
        train, held_out = generate_rows(data, tokenizer_words(model_dir, data.lexicon))
        write_jsonl(workload.train_file, train)
        write_jsonl(workload.eval_file, held_out)
        (root / "READY").write_text(key)
    return workload


def parameter_counts(model_dir: Path) -> dict[str, int]:
    """Total parameters, and those that do matmuls per token (all but the input embedding lookup)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, n, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = h // c.num_attention_heads * c.num_key_value_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h  # q,o + k,v + gate/up/down + 2 norms
    matmul = n * per_layer + h + v * h  # + final norm + lm_head
    return {"total": matmul + v * h, "matmul": matmul, "embedding": v * h}


def _quantile(ordered: list[int], q: float) -> int:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def token_lengths(workload: Workload, examples: int) -> dict[str, Any]:
    """The measured token distribution (prompt, response, formatted example) of the rows trained on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workload.model_dir)
    rows = read_jsonl(workload.train_subset(examples))

    def stats(values: list[int]) -> dict[str, float]:
        values = sorted(values)
        return {
            "min": values[0],
            "p10": _quantile(values, 0.1),
            "p50": _quantile(values, 0.5),
            "p90": _quantile(values, 0.9),
            "max": values[-1],
            "mean": round(sum(values) / len(values), 1),
        }

    lengths = [len(tokenizer(TEMPLATE.format(**r))["input_ids"]) for r in rows]
    return {
        "prompt": stats([len(tokenizer(r["prompt"])["input_ids"]) for r in rows]),
        "response": stats([len(tokenizer(r["response"])["input_ids"]) for r in rows]),
        "example": stats(lengths),
        "examples_over_max_length": sum(n > MAX_LENGTH for n in lengths),
        "real_tokens_after_truncation": sum(min(n, MAX_LENGTH) for n in lengths),
    }


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write_result(path: str | None, result: dict[str, Any]) -> None:
    """A contender's last act: its numbers as JSON (to `path`, or stdout)."""
    result = {**result, "peak_rss_bytes": peak_rss_bytes()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    text = json.dumps(result, indent=2)
    if path:
        Path(path).write_text(text)
    else:
        sys.stdout.write(text + "\n")
