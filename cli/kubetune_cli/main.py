"""The `kubetune` command line. Each subcommand imports what it needs when it runs, so `kubetune validate`
stays fast and works without the operator or trainer extras installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

EXIT_OK = 0
EXIT_INVALID = 1


def cmd_validate(args: argparse.Namespace) -> int:
    from kubetune_cli.manifests import check_files

    failed = 0
    for checked in check_files(args.files):
        if checked.skipped:
            print(f"{checked.document.where}: skipped: {checked.skipped}")
        elif checked.problems:
            failed += 1
            for problem in checked.problems:
                print(problem, file=sys.stderr)
        elif checked.job is not None:
            print(f"{checked.document.where}: FineTuneJob {checked.job.metadata.name}: OK")
        elif checked.sweep is not None:
            print(f"{checked.document.where}: FineTuneSweep {checked.sweep.metadata.name}: OK")
    return EXIT_INVALID if failed else EXIT_OK


def cmd_crd(args: argparse.Namespace) -> int:
    from kubetune_operator.crd import render_crd_yaml
    from kubetune_operator.reference import render_reference

    text = render_reference() if args.reference else render_crd_yaml(args.kind)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from kubetune_cli.local import run_file

    return run_file(args.file, args.workdir, max_steps=args.max_steps, s3_endpoint=args.s3_endpoint)


def cmd_sweep(args: argparse.Namespace) -> int:
    from kubetune_cli.sweep import run_sweep

    return run_sweep(args.file, args.workdir, max_steps=args.max_steps, s3_endpoint=args.s3_endpoint)


def cmd_plan(args: argparse.Namespace) -> int:
    from kubetune_cli.plan import run_plan

    return run_plan(
        args.file, gpu=args.gpu, gpu_memory=args.gpu_memory, output=args.output, s3_endpoint=args.s3_endpoint
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from kubetune_cli.demo import run_demo

    return run_demo(args.workdir, model=args.model, max_steps=args.max_steps)


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from kubetune_cli.manifests import load_finetunejob
    from kubetune_operator.api import SpecError
    from kubetune_operator.builders import build_nodes_service, build_trainer_configmap, build_trainer_job
    from kubetune_operator.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
        job = load_finetunejob(args.file)
        if args.image:
            settings = replace(settings, trainer_image=args.image)
        if job.metadata.namespace is None:
            job = job.model_copy(update={"metadata": job.metadata.model_copy(update={"namespace": args.namespace})})
        service = build_nodes_service(job, settings)  # multi-node runs only
        objects = [
            build_trainer_configmap(job, settings),
            *([service] if service else []),
            build_trainer_job(job, settings),
        ]
    except SpecError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID
    except (SettingsError, ValueError) as error:
        print(f"{args.file}: {error}", file=sys.stderr)
        return EXIT_INVALID

    class BlockDumper(yaml.SafeDumper):
        """Multi-line strings (config.json) as readable `|` blocks."""

    def represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)

    BlockDumper.add_representer(str, represent_str)
    sys.stdout.write(yaml.dump_all(objects, Dumper=BlockDumper, sort_keys=False, explicit_start=True))
    return EXIT_OK


def cmd_operator(args: argparse.Namespace) -> int:
    import logging

    from kubetune_operator.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"kubetune operator: {error}", file=sys.stderr)
        return EXIT_INVALID
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import kopf

    import kubetune_operator.main  # noqa: F401  (registers the handlers)

    clusterwide = args.all_namespaces or not settings.namespaces
    kopf.run(
        standalone=True,
        clusterwide=clusterwide,
        namespaces=() if clusterwide else settings.namespaces,
        liveness_endpoint=f"http://{settings.listen_address}:{settings.health_port}/healthz",
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="Fine-tune LLMs on Kubernetes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate",
        help="check FineTuneJob YAML offline, with the API server's rules",
        description="Validate FineTuneJob YAML files (multi-document files and directories too) with the rules "
        "the API server applies. Prints every problem as FILE:LINE: field.path: message; exits 1 if any.",
    )
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.set_defaults(handler=cmd_validate)

    crd = commands.add_parser("crd", help="print the FineTuneJob (or FineTuneSweep) CustomResourceDefinition")
    crd.add_argument("-o", "--output", help="write to this file instead of standard output")
    crd.add_argument(
        "--kind",
        choices=["FineTuneJob", "FineTuneSweep"],
        default="FineTuneJob",
        help="which CRD (default FineTuneJob)",
    )
    crd.add_argument(
        "--reference", action="store_true", help="the field reference in Markdown (docs/reference.md) instead"
    )
    crd.set_defaults(handler=cmd_crd)

    run = commands.add_parser(
        "run",
        help="run a FineTuneJob on this machine (CPU or local GPU), as a cluster would",
        description="Validate a FineTuneJob exactly as the API server would, then run the real trainer here "
        "with the spec's model, data and output (local paths, file://, s3:// with the standard AWS environment). "
        "Ctrl-C saves a checkpoint and stops; the same command again resumes. Exits with the trainer's code: "
        "0 done, 2 invalid input, 3 stopped after a checkpoint; 1 for an invalid file.",
    )
    run.add_argument("file", type=Path, metavar="FILE")
    run.add_argument("--workdir", type=Path, help="config, logs and scratch space (default .kubetune/NAME)")
    run.add_argument("--max-steps", type=int, help="override training: stop after N optimizer steps")
    run.add_argument("--s3-endpoint", help="override spec.storage.endpoint, e.g. http://127.0.0.1:9000")
    run.set_defaults(handler=cmd_run)

    sweep = commands.add_parser(
        "sweep",
        help="run a FineTuneSweep on this machine: its trials one after another, pruned as the operator prunes",
        description="Validate a FineTuneSweep as the API server would, then run its trials here one after another, "
        "each as `kubetune run` runs a FineTuneJob, with the operator's search (the same Optuna sampler, seed and "
        "pruner): a trial the pruner stops is stopped cleanly (it checkpoints). Prints a row per trial as it "
        "finishes, then the best. Exits 0 with a best trial, 1 for an invalid file or when no trial succeeded.",
    )
    sweep.add_argument("file", type=Path, metavar="FILE")
    sweep.add_argument("--workdir", type=Path, help="each trial's config, logs and scratch (default .kubetune/NAME)")
    sweep.add_argument("--max-steps", type=int, help="override training: stop each trial after N optimizer steps")
    sweep.add_argument("--s3-endpoint", help="override spec.storage.endpoint, e.g. http://127.0.0.1:9000")
    sweep.set_defaults(handler=cmd_sweep)

    plan = commands.add_parser(
        "plan",
        help="what a FineTuneJob will do: data, steps, GPU memory, ETA (no weights loaded)",
        description="Read a FineTuneJob's data through the trainer's own code and its model's config and tokenizer "
        "(never the weights), and report the data (rows, rejections, token counts, truncation, packing, one "
        "example with its label mask), the run (steps, warm-up, checkpoints), an estimate of peak GPU memory per "
        "GPU and of the local disk and memory a pod needs, each with a verdict, and an ETA range. A gate before a "
        "run: exits 0 when it fits, 4 when it does not fit the GPU, spec.resources.disk or a spec.resources.memory "
        "limit, 2 with the trainer's messages on "
        "input it would reject (data that trains on no token among them), 1 for an invalid file.",
    )
    plan.add_argument("file", type=Path, metavar="FILE")
    plan.add_argument(
        "--gpu",
        help="GPU as people name it, e.g. L4, A100, a100-80gb, H100, T4 (memory, peak FLOPs, bf16 or fp16 only); "
        "a model sold in several sizes is planned on the smallest",
    )
    plan.add_argument("--gpu-memory", help="GPU memory, e.g. 24Gi (overrides --gpu's; no ETA without --gpu)")
    plan.add_argument("-o", "--output", choices=["table", "json"], default="table", help="table (default) or json")
    plan.add_argument("--s3-endpoint", help="override spec.storage.endpoint, e.g. http://127.0.0.1:9000")
    plan.set_defaults(handler=cmd_plan)

    demo = commands.add_parser(
        "demo",
        help="fine-tune a real pretrained model with QLoRA from S3 to S3, all on this machine",
        description="Start an S3 server on loopback and run a real QLoRA FineTuneJob that fine-tunes "
        "SmolLM2-135M-Instruct on the support dataset shipped with kubetune, then show held-out questions answered "
        "before and after. No cluster, GPU, network or credentials needed.",
    )
    demo.add_argument("--workdir", type=Path, default=Path("kubetune-demo"), help="where it all goes")
    demo.add_argument(
        "--model",
        choices=["smollm2", "tiny"],
        default="smollm2",
        help="smollm2 (default): the real SmolLM2-135M-Instruct; tiny: a tiny random Llama, for a run in seconds",
    )
    demo.add_argument("--max-steps", type=int, help="training steps (default 24 for smollm2, 200 for tiny)")
    demo.set_defaults(handler=cmd_demo)

    render = commands.add_parser(
        "render",
        help="print the ConfigMap and Job the operator would create for a FineTuneJob",
        description="Render the objects the operator creates for a FineTuneJob file, as multi-document YAML "
        "(like `helm template`). Invalid files are reported as in `kubetune validate`, with exit code 1.",
    )
    render.add_argument("file", type=Path, metavar="FILE")
    render.add_argument("--image", help="trainer image (default: $KUBETUNE_TRAINER_IMAGE or the built-in one)")
    render.add_argument("-n", "--namespace", default="default", help="namespace when the file names none")
    render.set_defaults(handler=cmd_render)

    operator = commands.add_parser(
        "operator",
        help="run the operator (watches FineTuneJobs)",
        description="Run the kubetune operator in this process. Configured by KUBETUNE_* environment variables "
        "(KUBETUNE_NAMESPACES: comma-separated namespaces to watch; empty: all).",
    )
    operator.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace, whatever KUBETUNE_NAMESPACES says"
    )
    operator.set_defaults(handler=cmd_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
