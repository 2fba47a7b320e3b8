"""The ``qkdstack`` command: a thin dispatcher over :mod:`qkdstack.commands`.

Each sub-command lives in its own module under ``qkdstack/commands/`` with a
``register(subparsers)`` function that adds its parser and sets ``func``. Errors derived
from :class:`~qkdstack.errors.QKDError` become one line on stderr and their exit code (2 for a
:class:`~qkdstack.errors.ConfigError`); an :class:`OSError` no check foresaw becomes one line and exit 1.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

from qkdstack import __version__
from qkdstack.errors import QKDError

# Sub-command modules under qkdstack.commands, in the order `--help` lists them.
COMMANDS: list[str] = [
    "simulate",
    "keyrate",
    "distill",
    "init",
    "psk",
    "pki",
    "node",
    "status",
    "tunnel",
    "demo",
    "dashboard",
    "key",
    "warmup",
]


class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and one sentence, as for every other bad input.

    The sentence names the sub-command and the flag; a mistyped flag or command gets the closest
    one suggested (:func:`qkdstack.commands.validate.usage_error`, docs/cli.md).
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        # `--dark-count -1e-6` is a (refused) value, not an unknown flag: argparse's own pattern knows only -1 and -.5
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$", re.I)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        self.seen_args = list(sys.argv[1:] if args is None else args)  # what usage_error looks at
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        from qkdstack.commands.validate import usage_error

        parser, sentence = usage_error(self, message)
        parser.exit(2, f"{parser.prog}: error: {sentence}\n")


def command_summary(name: str) -> str | None:
    """The ``help=`` text of sub-command ``name``, read from its module's source without importing it.

    It is the string literal given as ``help`` to the ``add_parser("NAME", ...)`` call of
    ``qkdstack/commands/NAME.py``; None when the source cannot be read or holds no such literal (the
    caller then imports the module).
    """
    spec = importlib.util.find_spec(f"qkdstack.commands.{name}")
    if spec is None or not spec.origin:
        return None
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_parser"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == name):
            for keyword in node.keywords:
                if keyword.arg == "help" and isinstance(keyword.value, ast.Constant):
                    return keyword.value.value if isinstance(keyword.value.value, str) else None
    return None


def build_parser(only: str | None = None, *, lazy: bool = False) -> argparse.ArgumentParser:
    """The parser with every sub-command, or with ``only`` that one.

    A sub-command module may import heavy libraries (NumPy, Numba, SciPy, FastAPI) at its top;
    registering only the command given keeps ``qkdstack node`` with a bad configuration an answer of
    a second rather than of several. With ``lazy`` (``qkdstack``, ``qkdstack --help``: no command
    given) the other sub-commands are listed by name and :func:`command_summary` only, without
    importing their modules (0.1 s instead of 1.5 s).
    """
    parser = _Parser(prog="qkdstack", description="Quantum key distribution stack.")
    parser.add_argument("--version", action="version", version=f"qkdstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        if only is not None and name != only:
            continue
        summary = command_summary(name) if lazy and only is None else None
        if summary is not None:
            sub.add_parser(name, help=summary)
        else:
            importlib.import_module(f"qkdstack.commands.{name}").register(sub)
    return parser


def _prog(parser: argparse.ArgumentParser) -> str:
    """``qkdstack CMD`` (``qkdstack key export`` for a nested action): who speaks in an error line."""
    from qkdstack.commands.validate import leaf_parser

    return leaf_parser(parser).prog


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in COMMANDS else None, lazy=True)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except QKDError as exc:
        print(f"{_prog(parser)}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file or socket the command needed failed in a way no check foresaw: still one line
        print(f"{_prog(parser)}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
