"""The `kubetune` command line. Each subcommand imports what it needs when it runs, so `kubetune validate`
stays fast and works without the operator or trainer extras installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_OK = 0
EXIT_INVALID = 1


def cmd_validate(args: argparse.Namespace) -> int:
    from kubetune_operator.manifests import check_files

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
    return EXIT_INVALID if failed else EXIT_OK


def cmd_crd(args: argparse.Namespace) -> int:
    from kubetune_operator.crd import render_crd_yaml

    text = render_crd_yaml()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
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

    crd = commands.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition")
    crd.add_argument("-o", "--output", help="write to this file instead of standard output")
    crd.set_defaults(handler=cmd_crd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
