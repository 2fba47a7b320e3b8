"""The ``qkdstack`` command: a thin dispatcher over :mod:`qkdstack.commands`.

Each sub-command lives in its own module under ``qkdstack/commands/`` with a
``register(subparsers)`` function that adds its parser and sets ``func``. Errors derived
from :class:`~qkdstack.errors.QKDError` become one line on stderr and their exit code (2 for a
:class:`~qkdstack.errors.ConfigError`); an :class:`OSError` no check foresaw becomes one line and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qkdstack import __version__
from qkdstack.errors import QKDError

# Sub-command modules under qkdstack.commands, in the order `--help` lists them.
COMMANDS: list[str] = [
    "simulate",
    "keyrate",
    "distill",
    "init",
    "psk",
    "node",
    "tunnel",
    "demo",
    "dashboard",
    "key",
]


class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and one sentence, as for every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every sub-command, or with ``only`` that one.

    A sub-command module may import heavy libraries (NumPy, Numba, FastAPI) at its top; registering
    only the command given keeps ``qkdstack node`` with a bad configuration an answer of a second
    rather than of several.
    """
    parser = _Parser(prog="qkdstack", description="Quantum key distribution stack.")
    parser.add_argument("--version", action="version", version=f"qkdstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        if only is None or name == only:
            importlib.import_module(f"qkdstack.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except QKDError as exc:
        print(f"qkdstack {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file or socket the command needed failed in a way no check foresaw: still one line
        print(f"qkdstack {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
