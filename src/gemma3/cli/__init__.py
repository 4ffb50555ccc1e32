"""`gemma3 <command>`: one table of subcommands, each a thin layer over a plain Python function.

Every command group lives in its own module exposing `register(subparsers)`; this file only builds the
parser from the table and turns user errors into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# module -> the subcommands it registers (listed here so `gemma3 --help` shows the whole surface)
COMMAND_MODULES = {
    "gemma3.cli.generate": ("generate", "chat", "perplexity"),
    "gemma3.cli.weights": ("info", "convert"),
    "gemma3.cli.train": ("train", "merge-lora"),
    "gemma3.cli.serve": ("serve",),
    "gemma3.cli.plot": ("plot",),
    "gemma3.cli.harness": ("lm-eval",),
}


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (what is wrong, and where to read more), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gemma3",
        description="Gemma 3 text models in clean PyTorch: generate, chat, serve, convert, inspect, train, "
        "plot and evaluate.",
        epilog="With no -m/--model, commands use the embedded Gemma 3 270M (a PyPI package, no download). "
        "Run `gemma3 COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a command group whose optional dependency is missing
            if e.name and e.name.startswith("gemma3"):
                raise
            continue
        module.register(sub)
    return parser


def _version() -> str:
    from gemma3 import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from gemma3.errors import Gemma3Error

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Gemma3Error as e:
        print(f"gemma3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gemma3 generate ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:  # the file system said no: permissions, a full disk, a path that is not what it seems
        where = f" ({e.filename})" if e.filename else ""
        print(f"gemma3 {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch reports a failed allocation as a RuntimeError
        text = str(e)
        if not isinstance(e, MemoryError) and "out of memory" not in text and "can't allocate memory" not in text:
            raise
        print(f"gemma3 {args.command}: error: not enough memory ({text.splitlines()[0] if text else 'MemoryError'})",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
