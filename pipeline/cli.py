"""`mimicshield` command line: one sub-command per module in pipeline/commands/."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# each module defines `add_parser(subparsers)` (which sets `func`) for one sub-command
COMMANDS = ["protect", "demo", "evaluate", "report", "train_fastprotect", "study"]


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mimicshield")
    except metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimicshield",
        description="Protect images against diffusion-model mimicry, from one folder to a whole S3 archive.",
    )
    parser.add_argument("--version", action="version", version=f"mimicshield {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"pipeline.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"pipeline.commands.{name}":
                continue  # not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv[1:]  # the sub-command's own arguments (commands tell given options from defaults)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
