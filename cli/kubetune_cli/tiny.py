"""Tiny Llama-architecture models and tokenizers built from a config, with no hub access.

`kubetune demo` and the test suite need a real causal LM that trains in milliseconds on a CPU
and never touches the network. This module owns that model: a byte-level BPE tokenizer trained
on a small corpus shipped with the package, and a randomly initialised `LlamaForCausalLM` whose
vocabulary and special-token ids match it. Everything is deterministic, so two builds with the
same arguments produce identical files.

It imports torch and transformers at module level; callers import it lazily.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
# Role markers are single, unsplittable tokens so that a turn boundary is never merged with text.
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS)

# BOS opens the conversation; every assistant turn ends with EOS so that a model trained on it
# learns to stop. `{% generation %}` marks the tokens `return_assistant_tokens_mask=True` reports
# (TRL's `assistant_only_loss`): the assistant's words and its EOS, not the role marker.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] }}"
    "{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def corpus_lines() -> list[str]:
    """The built-in English corpus the tokenizer is trained on, one non-empty line per item."""
    text = resources.files("kubetune_cli").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = 1000,
    *,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in corpus plus `texts`.

    Byte-level means any string encodes (no `<unk>` in practice) and decodes back exactly.
    No special token is added automatically when encoding plain text (as with Qwen2): the chat
    template writes BOS/EOS itself, and prompt/completion collators add EOS where they need it.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    corpus = corpus_lines() + [text for text in (texts or ()) if text]

    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer, length=len(corpus))

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama whose vocabulary and special-token ids match `tokenizer`.

    The weights depend only on the arguments: initialisation runs under a forked RNG seeded
    with `seed`, leaving the caller's global torch RNG untouched.
    """
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        # Larger than Llama's 0.02 gives a random model logits big enough for a LoRA adapter (which
        # cannot touch the head) to move the loss visibly within a dozen steps.
        initializer_range=initializer_range,
        **special_ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**special_ids)
    return model.eval()


_TOKENIZER_ARGS = frozenset(inspect.signature(build_tokenizer).parameters)
_MODEL_ARGS = frozenset(inspect.signature(build_model).parameters) - {"tokenizer"}


def write_tiny_model(directory: Path, **kwargs: object) -> Path:
    """Build a tokenizer and model and save both (safetensors) to `directory`.

    `kwargs` are those of `build_tokenizer` and `build_model`. The directory then loads with
    `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
    """
    unknown = set(kwargs) - _TOKENIZER_ARGS - _MODEL_ARGS
    if unknown:
        valid = ", ".join(sorted(_TOKENIZER_ARGS | _MODEL_ARGS))
        raise TypeError(f"write_tiny_model() got unknown arguments {sorted(unknown)}; valid: {valid}")
    tokenizer = build_tokenizer(**{k: v for k, v in kwargs.items() if k in _TOKENIZER_ARGS})  # type: ignore[arg-type]
    model = build_model(tokenizer, **{k: v for k, v in kwargs.items() if k in _MODEL_ARGS})  # type: ignore[arg-type]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
