"""The `complexity` command: a thin shell over library functions.

Each concern contributes its subcommands through a module exposing
`register(subparsers)`; the module list below is the whole command surface.
Modules are imported lazily so `complexity --help` stays fast.

Errors: a command that fails prints one line, ``complexity CMD: error: MESSAGE``, and exits 2
for bad input (a file, a flag, a field: the library's errors name it) or 1 for a failure while
running (a full disk, an unexpected error). ``complexity --debug CMD ...`` (or
``COMPLEXITY_DEBUG=1``) shows the traceback instead. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

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
DEBUG_ENV = "COMPLEXITY_DEBUG"
EXIT_INPUT, EXIT_RUNTIME, EXIT_INTERRUPTED = 2, 1, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="complexity",
        description="Build, train, convert, evaluate and serve Complexity language models.",
    )
    parser.add_argument(
        "--debug", action="store_true", help=f"show the full traceback when a command fails (or set {DEBUG_ENV}=1)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _one_line(message: str) -> str:
    """Multi-line messages (e.g. a list of problems) joined into one line."""
    lines = [line.strip().removeprefix("- ") for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    head, rest = lines[0], lines[1:]
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)


def describe_error(err: Exception, command: str) -> tuple[int, str]:
    """(exit code, one-line message) for an exception a command raised."""
    from .data.files import DiskFullError

    debug_hint = f" (run `complexity --debug {command} ...` for the traceback)"
    if isinstance(err, DiskFullError):
        return EXIT_RUNTIME, str(err)
    if isinstance(err, json.JSONDecodeError):  # a library error names its file; this one did not
        return EXIT_INPUT, f"invalid JSON: {err}{debug_hint}"
    if isinstance(err, KeyError):
        return EXIT_INPUT, str(err.args[0]) if err.args else "KeyError"
    if isinstance(err, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        if err.filename is not None and err.strerror and str(err).startswith("["):  # a bare OS error
            return EXIT_INPUT, f"{err.filename}: {err.strerror}"
        return EXIT_INPUT, str(err)
    if isinstance(err, ValueError):  # the library's input errors (files, fields, flags) are ValueErrors
        return EXIT_INPUT, str(err)
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename is not None else ""
        return EXIT_RUNTIME, f"{where}{err.strerror or err}"
    if type(err).__name__ == "SafetensorError":  # raised by the safetensors Rust code
        return EXIT_INPUT, f"unreadable safetensors file: {err}{debug_hint}"
    return EXIT_RUNTIME, f"{type(err).__name__}: {err}{debug_hint}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse hands a command's KEY=VALUE overrides (a nargs="*" positional) only the words before
    # its first option: those written after one (`train --preset tiny training.seq_len=256
    # --max-steps 5 optim.lr=1e-3`) come back unparsed, and are overrides all the same
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(w.startswith("-") for w in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"complexity {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        code, message = describe_error(err, args.command)
        print(f"complexity {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return code
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
