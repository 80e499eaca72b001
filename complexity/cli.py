"""The `complexity` command: a thin shell over library functions.

Each concern contributes its subcommands through a module exposing
`register(subparsers)`; the module list below is the whole command surface.
Modules are imported lazily so `complexity --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import register_auto_classes

# Modules that add subcommands, in the order `--help` lists them.
COMMAND_MODULES = [
    "complexity.commands.info",
    "complexity.commands.generate",
    "complexity.commands.serve",
    "complexity.commands.convert",
    "complexity.commands.tokenizer",
    "complexity.commands.data",
    "complexity.commands.routing",
    "complexity.commands.train",
    "complexity.commands.eval",
    "complexity.commands.plot",
    "complexity.commands.ablate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="complexity",
        description="Build, train, convert, evaluate and serve Complexity language models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    register_auto_classes()  # deferred by `import complexity` in this process, so --help needs no torch
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        # Library errors already name the field/file at fault; print them plainly.
        print(f"complexity {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
