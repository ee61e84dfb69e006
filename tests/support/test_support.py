"""The shared test support works: both S3 servers, the tiny model and tokenizer, the example data."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
from botocore.exceptions import ClientError

from tests.support.s3 import S3Endpoint, seaweedfs_server

if TYPE_CHECKING:
    from tests.support.fixtures import SeaweedfsService

REPO = Path(__file__).resolve().parents[2]


def weed_processes(under: Path) -> list[psutil.Process]:
    """`weed` processes whose data directory is below `under` (other sessions may run their own)."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "weed" and any(str(under) in arg for arg in cmdline):
            found.append(process)
    return found


# --- S3 servers ---------------------------------------------------------------------------------


def test_put_get_list(s3_endpoint: S3Endpoint, s3_bucket_name: str, tmp_path: Path) -> None:
    bucket = s3_endpoint.make_bucket(s3_bucket_name)
    client = s3_endpoint.client()
    client.put_object(Bucket=bucket, Key="a/one.txt", Body=b"one")
    client.put_object(Bucket=bucket, Key="b/two.txt", Body=b"two")
    (tmp_path / "sub").mkdir()
    (tmp_path / "top.bin").write_bytes(b"\x00\x01")
    (tmp_path / "sub" / "inner.json").write_text("{}")

    uploaded = s3_endpoint.upload_dir(tmp_path, bucket, "dir/")

    assert uploaded == ["dir/sub/inner.json", "dir/top.bin"]
    assert s3_endpoint.list_keys(bucket) == ["a/one.txt", "b/two.txt", "dir/sub/inner.json", "dir/top.bin"]
    assert s3_endpoint.list_keys(bucket, "dir/") == uploaded
    assert s3_endpoint.read(bucket, "a/one.txt") == b"one"
    assert s3_endpoint.read(bucket, "dir/top.bin") == b"\x00\x01"


def test_multipart_upload_of_a_large_object(s3_endpoint: S3Endpoint, s3_bucket_name: str) -> None:
    from boto3.s3.transfer import TransferConfig

    bucket = s3_endpoint.make_bucket(s3_bucket_name)
    payload = os.urandom(9 * 1024 * 1024)
    five_mb = 5 * 1024 * 1024
    transfer = TransferConfig(multipart_threshold=five_mb, multipart_chunksize=five_mb)

    s3_endpoint.client().upload_fileobj(io.BytesIO(payload), bucket, "big.bin", Config=transfer)

    head = s3_endpoint.client().head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-2"), "expected a two-part multipart upload"
    assert hashlib.sha256(s3_endpoint.read(bucket, "big.bin")).digest() == hashlib.sha256(payload).digest()


@pytest.mark.parametrize("wrong", [{"aws_secret_access_key": "wrong"}, {"aws_access_key_id": "nobody"}])
def test_seaweedfs_rejects_wrong_credentials(s3_seaweed: S3Endpoint, wrong: dict[str, str]) -> None:
    with pytest.raises(ClientError) as error:
        s3_seaweed.client(**wrong).list_buckets()
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_env_points_a_subprocess_at_the_endpoint(s3_endpoint: S3Endpoint, s3_bucket_name: str) -> None:
    bucket = s3_endpoint.make_bucket(s3_bucket_name)
    s3_endpoint.client().put_object(Bucket=bucket, Key="hello.txt", Body=b"hi")
    # Nothing but the environment tells this client where to go and how to sign.
    script = f"import boto3; print(boto3.client('s3').get_object(Bucket={bucket!r}, Key='hello.txt')['Body'].read())"
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env |= {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull} | s3_endpoint.env()

    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "b'hi'"


def test_a_second_seaweedfs_fails_clearly_while_one_runs(s3_seaweed: S3Endpoint, tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="only one can run at a time"),
        seaweedfs_server(tmp_path, lock_timeout=0),
    ):
        pass


def test_seaweedfs_fixture_leaves_nothing_running(seaweedfs_service: SeaweedfsService, tmp_path: Path) -> None:
    # A whole pytest session of its own uses the fixture; afterwards no `weed` may be left and
    # every fixed port must be free. The session's own server must stop first: one per machine.
    seaweedfs_service.stop()
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            """
            def test_uses_seaweedfs(s3_seaweed, s3_bucket_name):
                s3_seaweed.make_bucket(s3_bucket_name)
                assert s3_seaweed.list_keys(s3_bucket_name) == []
            """
        )
    )
    basetemp = tmp_path / "inner"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.support.fixtures", "-p", "no:cacheprovider"]
    command += ["-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO), f"--basetemp={basetemp}"]
    command += [str(tmp_path / "test_inner.py")]
    env = os.environ | {"PYTHONPATH": str(REPO)}

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert list(basetemp.rglob("seaweedfs.log")), "the inner session did not run SeaweedFS"
    # Ports are not checked here: another session may take them as soon as the lock is free.
    assert weed_processes(under=basetemp) == []


def test_seaweedfs_service_restarts_after_stop(seaweedfs_service: SeaweedfsService, s3_bucket_name: str) -> None:
    seaweedfs_service.stop()
    endpoint = seaweedfs_service.endpoint()
    bucket = endpoint.make_bucket(s3_bucket_name)
    assert bucket in [b["Name"] for b in endpoint.client().list_buckets()["Buckets"]]


# --- Tiny model and tokenizer -------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "How do I reset my password?"},
    {"role": "assistant", "content": "Open the sign-in page and choose Forgot password."},
]


def test_tiny_model_loads_from_its_directory_and_generates(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)

    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer) == 1000
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, name) == getattr(model.generation_config, name) == getattr(tokenizer, name)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 8
    assert [p.name for p in tiny_model_dir.glob("*.safetensors")] == ["model.safetensors"]
    assert sum(p.stat().st_size for p in tiny_model_dir.iterdir()) < 2_000_000


def test_tokenizer_round_trips_and_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from kubetune_cli.tiny import build_tokenizer

    built = build_tokenizer()
    loaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Quillstack error QS-409 on macOS — café, naïve, 日本語, emoji 🙂, tabs\tand  spaces."

    assert built.backend_tokenizer.to_str() == build_tokenizer().backend_tokenizer.to_str()
    assert built.get_vocab() == loaded.get_vocab() == reloaded.get_vocab()
    for tokenizer in (built, loaded, reloaded):
        ids = tokenizer(text)["input_ids"]
        assert ids == built(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
            "<pad>",
            "<s>",
            "</s>",
            "<unk>",
        )
        assert tokenizer.chat_template == built.chat_template


def test_extra_texts_change_the_tokenizer() -> None:
    from kubetune_cli.tiny import build_tokenizer

    word = "zyxwvutsrqp"
    with_extra = build_tokenizer([f"{word} {word}."] * 50)
    assert len(with_extra(word)["input_ids"]) < len(build_tokenizer()(word)["input_ids"])


def test_chat_template_renders_roles_and_marks_assistant_tokens(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    encoded = tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )

    assert rendered == (
        "<s><|system|>\nAnswer briefly.\n<|user|>\nHow do I reset my password?\n"
        "<|assistant|>\nOpen the sign-in page and choose Forgot password.</s>\n"
    )
    assert prompt.endswith("<|user|>\nHow do I reset my password?\n<|assistant|>\n")
    assert encoded["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assistant_ids = [i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(assistant_ids) == "Open the sign-in page and choose Forgot password.</s>"


def test_chat_template_rejects_unknown_roles(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(Exception, match="Unknown role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "{}"}], tokenize=False)


def test_build_model_is_seeded_and_leaves_the_global_rng_alone() -> None:
    import torch

    from kubetune_cli.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    first, again, other = build_model(tokenizer), build_model(tokenizer), build_model(tokenizer, seed=1)

    assert torch.rand(1) == expected_next
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)
    assert first.num_parameters() == 210_240


def test_write_tiny_model_names_unknown_arguments(tmp_path: Path) -> None:
    from kubetune_cli.tiny import write_tiny_model

    with pytest.raises(TypeError, match=r"unknown arguments \['hidden'\]"):
        write_tiny_model(tmp_path, hidden=32)


def test_tiny_model_s3_holds_a_loadable_model(tiny_model_s3: str, s3_moto: S3Endpoint, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    bucket, prefix = tiny_model_s3.removeprefix("s3://").split("/", 1)
    keys = s3_moto.list_keys(bucket, prefix + "/")
    for key in keys:
        (tmp_path / key.removeprefix(prefix + "/")).write_bytes(s3_moto.read(bucket, key))

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {Path(key).name for key in keys}
    assert AutoTokenizer.from_pretrained(tmp_path).decode([]) == ""


# --- Example data -------------------------------------------------------------------------------

DATA = REPO / "cli" / "kubetune_cli" / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_example_data_is_what_its_generator_writes(tmp_path: Path) -> None:
    from tests.support import make_support_dataset

    assert make_support_dataset.DATA == DATA
    make_support_dataset.main(tmp_path)

    for name in ("support-instructions.jsonl", "support-eval.jsonl", "support-chat.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"regenerate {name}"


def test_example_data_shapes() -> None:
    train = read_jsonl(DATA / "support-instructions.jsonl")
    held_out = read_jsonl(DATA / "support-eval.jsonl")
    chats = read_jsonl(DATA / "support-chat.jsonl")

    assert (len(train), len(held_out), len(chats)) == (300, 30, 100)
    for row in train + held_out:
        assert set(row) == {"prompt", "response"}
        assert 5 <= len(row["prompt"].split()) <= 60
        assert 10 <= len(row["response"].split()) <= 120
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in held_out}
    for chat in chats:
        roles = [message["role"] for message in chat["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2) and body
    assert any(chat["messages"][0]["role"] == "system" for chat in chats)
    assert any(len(chat["messages"]) >= 4 for chat in chats)
