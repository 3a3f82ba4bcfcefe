"""`moescope` entry point. Subcommands live in moescope.commands.*; this file holds no logic.

Each command module exposes ``register(subparsers)`` which adds its parser and
sets ``func`` to a callable taking the parsed args and returning an exit code.
Heavy imports (torch, transformers) happen inside those callables, so that
``moescope --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from moescope import __version__
from moescope.errors import MoescopeError, first_line, is_out_of_memory
from moescope.runtime import keep_freed_memory


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean an unusable file or directory (permissions, a file where a directory is
    expected, a full disk, bytes that are not UTF-8 / JSON / safetensors / zip), never a moescope bug."""
    import json
    import zipfile

    errors: list[type[BaseException]] = [OSError, UnicodeDecodeError, json.JSONDecodeError, zipfile.BadZipFile]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


_INPUT_ERRORS = _input_errors()

# One line per command module; keep the order of the study.
COMMAND_MODULES: list[str] = [
    "moescope.commands.demo",
    "moescope.commands.data",
    "moescope.commands.train",
    "moescope.commands.sweep",
    "moescope.commands.analyze",
    "moescope.commands.report",
    "moescope.commands.compare",
    "moescope.commands.cluster",
    "moescope.commands.partition",
    "moescope.commands.btx",
    "moescope.commands.embed",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moescope",
        description="Train mixture-of-experts language models and see what their experts learn.",
    )
    parser.add_argument("--version", action="version", version=f"moescope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except MoescopeError as exc:
        print(f"moescope: error: {exc}", file=sys.stderr)
        return 2
    except _INPUT_ERRORS as exc:  # what the file system or a damaged file said, where no check named it first
        logging.getLogger("moescope").debug("details", exc_info=True)
        print(f"moescope: error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a batch, a block count or an expert count too large for this machine or GPU
        if not is_out_of_memory(exc):
            raise
        print(f"moescope: error: out of memory ({first_line(exc) or type(exc).__name__}); use smaller settings",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moescope: interrupted", file=sys.stderr)
        return 130



if __name__ == "__main__":
    sys.exit(main())
