"""`kubetune plan FILE`: what a FineTuneJob will do, before it takes a GPU.

It reads the job as `kubetune run` does (local paths, file://, s3:// with the standard AWS environment), fetches
the model's config and tokenizer only (never the weights), reads the data through the trainer's own code, and
prints the data, the run's schedule, the memory estimate against a GPU, the local disk and memory a pod needs,
and an ETA range (`kubetune_trainer.plan` computes them). A gate before a run: exit 0 when the run fits, 4 when
it does not fit the GPU's memory, spec.resources.disk or a spec.resources.memory limit; as `kubetune run`, 2 for
input the trainer would reject (with the trainer's messages: data that trains on no token among them) and 1 for
an invalid file or option.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from kubetune_trainer.contract import EXIT_INVALID_INPUT, EXIT_OK

EXIT_INVALID_FILE = 1
EXIT_DOES_NOT_FIT = 4  # not the trainer's 2 or 3: the input is valid, the run as specified would not succeed
# Libraries whose notices say nothing about the plan (bitsandbytes' kernel loader, tokenizer and template
# notices): the plan reads configs and tokenizers and runs no kernel; what the data's problems are, it reports.
QUIET_LOGGERS = ("bitsandbytes", "transformers", "accelerate", "peft", "trl", "datasets", "huggingface_hub")
# What a model directory holds besides weights: the config, the tokenizer, the chat template, code.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")


def fetch_model_files(storage: Any, source: str, target: Path) -> Path:
    """A local directory with the model's config and tokenizer files, without downloading the weights."""
    from kubetune_trainer.storage import join, parse_uri

    loc = parse_uri(source)
    if loc.scheme == "file":
        return Path(loc.path)
    if loc.scheme == "hf":
        from huggingface_hub import snapshot_download

        ignored = [f"*{suffix}" for suffix in WEIGHT_SUFFIXES]
        return Path(snapshot_download(loc.path, revision=loc.revision, local_dir=target, ignore_patterns=ignored))
    prefix = source if source.endswith("/") else source + "/"
    for uri in storage.list(prefix):
        if not uri.endswith(WEIGHT_SUFFIXES) and not uri.endswith("/"):
            relative = uri[len(prefix) :]
            storage.download(join(prefix, relative), (target / relative).parent)
    return target


def gib(value: float) -> str:
    if value >= 1024**3:
        return f"{value / 1024**3:.2f} GiB"
    return f"{value / 1024**2:.1f} MiB"


def render_example(segments: list[dict[str, Any]], color: bool) -> str:
    """The example with its trained tokens marked: green on a terminal, else between [[ and ]]."""
    out = []
    for segment in segments:
        text = segment["text"]
        if segment["trained"]:
            out.append(f"\033[1;32m{text}\033[0m" if color else f"[[{text}]]")
        else:
            out.append(text)
    return "".join(out)


def few_trained(d: Any) -> str:
    from kubetune_trainer.data import FEW_TRAINED_TOKENS

    if not d.few_trained:
        return "0"
    return (
        f"{d.few_trained} examples train fewer than {FEW_TRAINED_TOKENS} tokens: check dataset.fields "
        "and the template (chat: the model's chat template)"
    )


def disk_bytes(job: Any) -> int:
    """spec.resources.disk (or the operator's default) in bytes."""
    from kubetune_operator.builders import disk
    from kubetune_trainer.plan import parse_memory

    return parse_memory(disk(job))


def disk_verdict(plan: Any, disk: int) -> str:
    needed = plan.disk.total_bytes
    if needed <= disk:
        return f"fits in {gib(disk)} with {gib(disk - needed)} to spare"
    return f"does not fit in {gib(disk)}: set spec.resources.disk to at least {-(-needed // 1024**3)}Gi"


def failures(plan: Any, job: Any, disk: int) -> list[str]:
    """Why the run as specified would not succeed, from the plan: nothing means the gate opens."""
    from kubetune_trainer.plan import parse_memory

    reasons = []
    if plan.fit is not None and not plan.fit.fits:
        reasons.append(f"GPU memory: {plan.fit.verdict}")
    if plan.disk is not None and plan.disk.total_bytes > disk:
        reasons.append(f"local disk: {disk_verdict(plan, disk)}")
    memory = job.spec.resources.memory
    if plan.host_memory is not None and memory is not None and plan.host_memory.total_bytes > parse_memory(memory):
        reasons.append(f"pod memory: {host_memory_verdict(plan, job)}")
    return reasons


@contextmanager
def quiet_libraries() -> Iterator[None]:
    import logging

    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=rf"({'|'.join(QUIET_LOGGERS)}|torch)(\.|$)")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def host_memory_verdict(plan: Any, job: Any) -> str:
    """Against spec.resources.memory when set (request and limit: below the need, the kernel kills the
    trainer); else against what the operator requests by default (no limit: a node short of it may evict)."""
    from kubetune_operator.api import DEFAULT_MEMORY_GI_PER_GPU
    from kubetune_trainer.plan import parse_memory

    needed = plan.host_memory.total_bytes
    advice = f"set spec.resources.memory to at least {-(-needed // 1024**3)}Gi"
    resources = job.spec.resources
    if resources.memory is not None:
        limit = parse_memory(resources.memory)
        if needed <= limit:
            return f"fits in {gib(limit)} with {gib(limit - needed)} to spare"
        return f"does not fit in {gib(limit)} (its limit): {advice}"
    requested = DEFAULT_MEMORY_GI_PER_GPU * resources.gpus * 1024**3
    if needed <= requested:
        return f"within the default request ({gib(requested)}, no limit)"
    return f"more than the default request ({gib(requested)}, no limit): {advice}"


def print_table(plan: Any, out: IO[str], color: bool, disk: int, job: Any) -> None:
    from kubetune_trainer.contract import format_seconds
    from kubetune_trainer.plan import as_json

    d, run, memory = plan.data, plan.schedule, plan.memory
    rows: list[tuple[str, str] | str] = []  # a str is a section title

    def section(title: str) -> None:
        rows.append(title)

    def spread(s: Any) -> str:
        return f"min {s.min}  median {s.median:g}  p95 {s.p95:g}  max {s.max}"

    packed = f" (packed rows of <= {d.row_tokens} tokens)" if d.packing else ""
    section("data")
    rows += [
        ("rows", f"{d.train_rows} train, {d.eval_rows} eval"),
        ("rejected", "0"),
        ("examples trained on", f"{d.examples} ({d.dropped} dropped: truncated to no response token)"),
        ("prompt tokens", spread(d.prompt_tokens)),
        ("response tokens", spread(d.response_tokens)),
        ("few trained tokens", few_trained(d)),
        ("truncated at maxLength", f"{d.truncated} examples, {d.lost_response_tokens} response tokens lost"),
        ("sequences per epoch", f"{d.sequences}{packed}, longest {d.longest_sequence}"),
        ("packing efficiency", f"{d.packing_efficiency:.1%} ({d.real_tokens} real / {d.processed_tokens} processed)"),
    ]
    gpus = f"{run.world_size} GPU{'s' if run.world_size > 1 else ''}"
    section("run")
    rows += [
        ("global batch", f"{run.global_batch} {'packed rows' if d.packing else 'sequences'} ({gpus})"),
        ("steps", f"{run.total_steps} ({run.steps_per_epoch} per epoch, {run.epochs:g} epochs)"),
        ("warm-up steps", str(run.warmup_steps)),
        ("evaluations", str(run.evaluations)),
        ("checkpoints", f"{run.checkpoints_written} written, newest {run.checkpoints_kept} kept"),
    ]
    checkpointing = "on" if memory.gradient_checkpointing else "off"
    section(f"memory per GPU ({memory.precision}, gradient checkpointing {checkpointing}, {memory.optimizer})")
    rows.append(("parameters", f"{plan.parameters['total']:,} ({plan.parameters['trainable']:,} trainable)"))
    batch, tokens = memory.batch_shape
    labels = {
        "activations": f"activations ({batch} x {tokens} tokens)",
        "logits": f"logits ({memory.predicted_positions} label positions)",
    }
    for name, value in memory.parts.items():
        rows.append((labels.get(name, name), gib(value)))
    rows.append(("peak allocated", gib(memory.peak_bytes)))
    if plan.fit is not None:
        gpu = plan.target.gpu.name if plan.target.gpu is not None else "GPU"
        rows.append(("with CUDA context", f"{gib(plan.fit.needed_bytes)} of {gib(plan.fit.memory_bytes)} ({gpu})"))
        rows.append(("verdict", plan.fit.verdict))
    if plan.disk is not None:
        section("local disk per pod (spec.resources.disk)")
        rows += [(name, gib(value)) for name, value in plan.disk.parts.items()]
        rows += [("needed", gib(plan.disk.total_bytes)), ("verdict", disk_verdict(plan, disk))]
    if plan.host_memory is not None:
        section("memory per pod (spec.resources.memory)")
        rows += [(name, gib(value)) for name, value in plan.host_memory.parts.items()]
        rows += [("needed", gib(plan.host_memory.total_bytes)), ("verdict", host_memory_verdict(plan, job))]
    if plan.eta is not None:
        e = plan.eta
        section("time")
        rows += [
            ("compute", f"{e.flops_per_token / 1e9:.3g} GFLOP/token x {e.tokens:,} tokens"),
            (
                "ETA",
                f"{format_seconds(e.seconds[0])} to {format_seconds(e.seconds[1])} "
                f"(at {e.utilisation[1]:.0%} to {e.utilisation[0]:.0%} of {e.device})",
            ),
        ]
    width = max(len(row[0]) for row in rows if isinstance(row, tuple))
    for row in rows:
        if isinstance(row, str):
            print(f"\n{row}", file=out)
        else:
            print(f"  {row[0]:<{width}}  {row[1]}", file=out)
    print("\none example (trained tokens " + ("in green" if color else "between [[ ]]") + "):", file=out)
    print(render_example(as_json(d.example), color).rstrip("\n"), file=out)


def run_plan(
    path: Path,
    *,
    gpu: str | None,
    gpu_memory: str | None,
    output: str,
    s3_endpoint: str | None,
    out: IO[str] | None = None,
) -> int:
    from kubetune_cli.local import local_config
    from kubetune_cli.manifests import check_files, load_finetunejob
    from kubetune_operator.api import SpecError

    out = out or sys.stdout
    sweep = any(checked.sweep is not None for checked in check_files([path]))

    import logging

    if sweep:
        trainer_log = logging.getLogger("kubetune_trainer")
        level = trainer_log.level
        trainer_log.setLevel(logging.ERROR)  # the data's warnings are the template's, for `kubetune plan` on it
        try:
            return run_sweep_plan(path, gpu=gpu, gpu_memory=gpu_memory, output=output, s3_endpoint=s3_endpoint, out=out)
        finally:
            trainer_log.setLevel(level)
    try:
        job = load_finetunejob(path)
        config = local_config(job, s3_endpoint=s3_endpoint)
    except SpecError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID_FILE

    from kubetune_trainer import plan as plan_mod

    trainer_log = logging.getLogger("kubetune_trainer")
    level = trainer_log.level
    trainer_log.setLevel(logging.ERROR)  # the table says what the data's warnings would
    try:
        with quiet_libraries():
            return _plan(path, job, config, plan_mod, gpu=gpu, gpu_memory=gpu_memory, output=output, out=out)
    finally:
        trainer_log.setLevel(level)


def _plan(
    path: Path,
    job: Any,
    config: Any,
    plan_mod: Any,
    *,
    gpu: str | None,
    gpu_memory: str | None,
    output: str,
    out: IO[str],
) -> int:
    try:
        plan_mod.refuse_unplannable(config)
        target = plan_target(job, config, plan_mod, gpu, gpu_memory)
    except plan_mod.PlanError as error:
        print(f"kubetune plan: {error}", file=sys.stderr)
        return EXIT_INVALID_FILE
    from kubetune_trainer import data as data_mod
    from kubetune_trainer import model as model_mod
    from kubetune_trainer.errors import TrainerFailure
    from kubetune_trainer.storage import Storage

    resources = job.spec.resources
    world = max(resources.gpus, 1) * resources.nodes
    with tempfile.TemporaryDirectory(prefix="kubetune-plan-") as scratch:
        try:
            storage = Storage(config.storage)
            model_dir = fetch_model_files(storage, config.model.source, Path(scratch) / "model")
            model_mod.check_model_dir(model_dir, config.model.source)
            tokenizer = model_mod.load_tokenizer(model_dir, config.model.trust_remote_code)
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=config.model.trust_remote_code)
            rows = data_mod.train_eval_rows(storage, config.dataset, config.training.seed, Path(scratch))
            plan = plan_mod.make_plan(config, *rows, tokenizer, model_config, target, world)
        except TrainerFailure as failure:
            print(f"{failure.error.reason}: {failure.error.message}", file=sys.stderr)
            return failure.exit_code
    if not plan.ok:
        for message in plan.rejected:
            print(f"invalid input: {message}", file=sys.stderr)
        more = plan.rejected_count - len(plan.rejected)
        if more > 0:
            print(f"... and {more} more rejected rows", file=sys.stderr)
        if plan.rejected_count > 1:
            print(f"{plan.rejected_count} rows rejected: the trainer stops at the first (exit 2)", file=sys.stderr)
    disk = disk_bytes(job)
    reasons = failures(plan, job, disk) if plan.ok else []
    if output == "json":
        document = plan_mod.as_json(plan)
        document["file"] = str(path)
        document["name"] = job.metadata.name
        document["disk_available"] = disk
        document["does_not_fit"] = reasons
        print(json.dumps(document, indent=2), file=out)
    elif plan.ok:
        print(f"{path}: FineTuneJob {job.metadata.name}", file=out)
        print_table(plan, out, color=out.isatty(), disk=disk, job=job)
    for reason in reasons:
        print(f"{path}: does not fit: {reason}", file=sys.stderr)
    if not plan.ok:
        return EXIT_INVALID_INPUT
    return EXIT_DOES_NOT_FIT if reasons else EXIT_OK


def plan_target(job: Any, config: Any, plan_mod: Any, gpu: str | None, gpu_memory: str | None) -> Any:
    """The GPU the plan is for: --gpu NAME (memory and peak FLOPs from the table), --gpu-memory SIZE (memory
    only: no ETA), or, without either, a GPU of unknown size; for resources.gpus 0, this machine's CPU, its GEMM
    rate measured (a second) at the run's compute dtype for the ETA."""
    chosen = plan_mod.find_gpu(gpu) if gpu else None
    memory = plan_mod.parse_memory(gpu_memory) if gpu_memory else (chosen.memory_bytes if chosen else None)
    cuda = chosen is not None or memory is not None or job.spec.resources.gpus > 0
    if cuda:
        return plan_mod.Target(cuda=True, memory_bytes=memory, gpu=chosen)
    from kubetune_trainer import model as model_mod

    dtype = model_mod.precision(config.training, cuda=False)
    return plan_mod.Target(cuda=False, memory_bytes=None, cpu=plan_mod.measure_cpu(dtype))


def run_sweep_plan(
    path: Path, *, gpu: str | None, gpu_memory: str | None, output: str, s3_endpoint: str | None, out: IO[str]
) -> int:
    """`kubetune plan` on a FineTuneSweep: how many trials, the worst case of peak GPU memory over the trials at
    the edges of the search space, and GPU-hours at most (every trial as long as the longest of them)."""
    from kubetune_cli.local import local_config
    from kubetune_cli.manifests import load_finetunesweep
    from kubetune_cli.sweep import trial_job
    from kubetune_operator.api import SpecError
    from kubetune_operator.search import edge_combinations, trials_to_run
    from kubetune_trainer import plan as plan_mod
    from kubetune_trainer.contract import format_seconds

    try:
        sweep = load_finetunesweep(path)
        trials = [trial_job(sweep, number, values) for number, values in enumerate(edge_combinations(sweep.spec))]
        configs = [local_config(trial, s3_endpoint=s3_endpoint) for trial in trials]
        for config in configs:
            plan_mod.refuse_unplannable(config)
        target = plan_target(trials[0], configs[0], plan_mod, gpu, gpu_memory)
    except SpecError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID_FILE
    except plan_mod.PlanError as error:
        print(f"kubetune plan: {error}", file=sys.stderr)
        return EXIT_INVALID_FILE
    from kubetune_trainer import data as data_mod
    from kubetune_trainer import model as model_mod
    from kubetune_trainer.errors import TrainerFailure
    from kubetune_trainer.storage import Storage

    resources = sweep.spec.template.spec.resources
    world = max(resources.gpus, 1) * resources.nodes
    first = configs[0]
    with tempfile.TemporaryDirectory(prefix="kubetune-plan-") as scratch, quiet_libraries():
        try:
            storage = Storage(first.storage)
            model_dir = fetch_model_files(storage, first.model.source, Path(scratch) / "model")
            tokenizer = model_mod.load_tokenizer(model_dir, first.model.trust_remote_code)
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=first.model.trust_remote_code)
            rows = data_mod.train_eval_rows(storage, first.dataset, first.training.seed, Path(scratch))
            plans = [plan_mod.make_plan(config, *rows, tokenizer, model_config, target, world) for config in configs]
        except TrainerFailure as failure:
            print(f"{failure.error.reason}: {failure.error.message}", file=sys.stderr)
            return failure.exit_code
    bad = [
        f"invalid input with {trial.metadata.annotations['kubetune.dev/trial-parameters']}: {message}"
        for trial, plan in zip(trials, plans, strict=True)
        for message in plan.rejected[:1]
    ]
    if bad:  # a trial at an edge of the search space would fail: shrink the range
        for line in bad:
            print(line, file=sys.stderr)
        return EXIT_INVALID_INPUT
    count = trials_to_run(sweep.spec)
    worst_memory = max(plans, key=lambda plan: plan.memory.peak_bytes if plan.memory else 0)
    peak = worst_memory.memory.peak_bytes if worst_memory.memory else None
    at = trials[plans.index(worst_memory)].metadata.annotations
    longest = max((plan.eta.seconds[1] for plan in plans if plan.eta), default=None)
    gpus = max(resources.gpus, 1) * resources.nodes  # on a CPU: the nodes (node-hours)
    gpu_hours = count * longest * gpus / 3600 if longest is not None else None
    hours = "node-hours" if target.cpu is not None else "GPU-hours"
    fits = peak is None or target.memory_bytes is None or peak <= target.memory_bytes
    if output == "json":
        document = {"file": str(path), "name": sweep.metadata.name, "trials": count,
                    "parallel_trials": sweep.spec.parallel_trials, "worst_peak_gpu_memory": peak,
                    "worst_case_parameters": json.loads(at["kubetune.dev/trial-parameters"]),
                    "longest_trial_seconds": longest, "gpu_hours_at_most": gpu_hours, "fits": fits}  # fmt: skip
        print(json.dumps(document, indent=2), file=out)
    else:
        print(f"{path}: FineTuneSweep {sweep.metadata.name}", file=out)
        each = f"{gpus} GPU(s) each" if resources.gpus else "on CPU"
        print(f"  trials         {count} ({sweep.spec.parallel_trials} at a time, {each})", file=out)
        where = at["kubetune.dev/trial-parameters"]
        print(f"  peak memory    {gib(peak) if peak is not None else 'unknown'} at worst (with {where})", file=out)
        if longest is not None and gpu_hours is not None:
            print(f"  longest trial  {format_seconds(longest)}", file=out)
            print(f"  {hours:<14} at most {gpu_hours:.2f} (fewer with pruning)", file=out)
        else:
            print(f"  {hours:<14} unknown: name the GPU with --gpu for an ETA", file=out)
    if not fits:
        print(f"{path}: does not fit: the worst-case trial needs {gib(peak or 0)} of GPU memory", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return EXIT_OK
