"""One validation path for command-line flags and configuration fields (docs/cli.md, "Bad input").

A flag that sets what a configuration field holds is checked by the code that checks the field: the
section dataclasses of :mod:`qkdstack.node.config` (``[device] distance_km``, ``[kms] store``,
``[site] name``, ``[protocol] eps_sec`` ...), whose :class:`~qkdstack.errors.ConfigError` names
``[section] field``. :func:`as_flags` rewrites that name into the flag's, so that a user who typed
``--store mysql://x`` reads ``--store must be sqlite:///PATH or postgresql://..., got 'mysql://x'``
and one who wrote ``store = "mysql://x"`` reads ``[kms] store must be ...``: the same sentence.

:func:`field_type` turns such a check into an argparse ``type=``, so the value is refused while the
command line is parsed, before anything is computed or written; argparse then prints one line and
exits 2 (``qkdstack.cli`` makes that line ``qkdstack CMD: error: --flag ...``). Checks that need
more than one flag (a port range that depends on the topology) stay in the command and raise
:class:`ConfigError` naming the flag.

Files and folders a command will write are checked here too (:func:`new_folder`, :func:`make_folder`,
:func:`new_file`, :func:`plot_file`): an unwritable or mistaken place is one sentence naming the flag,
never an ``OSError`` after the work is done.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qkdstack.errors import ConfigError

T = TypeVar("T")

PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp", "gif", "pgf",
                "avif")
"""File name extensions matplotlib's savefig writes (Agg, PDF, SVG, PS, PGF back ends)."""


def as_flags(exc: ConfigError, names: Mapping[str, str]) -> ConfigError:
    """``exc`` with every configuration name in ``names`` (``"[kms] store"``) replaced by its flag (``"--store"``)."""
    message = str(exc)
    for name, flag in names.items():
        message = message.replace(name, flag)
    return ConfigError(message)


def dashed(exc: ConfigError, flags: set[str] | frozenset[str]) -> ConfigError:
    """``exc`` with its leading flag name(s) as flags: ``rekey-seconds must ...`` → ``--rekey-seconds must ...``.

    For checks that name what they check by the flag's name without dashes (apps/tunnel.py,
    apps/keysource.py); ``flags`` are the command's flags without dashes. Other messages are left as they are.
    """
    message = str(exc)
    head = message.split(" ", 1)[0]
    names = head.rstrip(":").split("/")
    if all(n in flags for n in names):
        flagged = "/".join(f"--{n}" for n in names) + (":" if head.endswith(":") else "")
        return ConfigError(flagged + message[len(head):])
    return exc


def field_type(flag: str, parse: Callable[[str], T], check: Callable[[T], Any], names: Mapping[str, str],
               what: str = "a number") -> Callable[[str], T]:
    """An argparse ``type=`` for ``flag``: ``parse`` the text, then ``check`` it with the configuration's code.

    ``parse`` raises ``ValueError`` for text that is not of the type (reported as "--flag must be
    ``what``, got 'x'"); ``check`` raises :class:`ConfigError` naming ``[section] field``, reported with the
    names rewritten by ``names`` (see :func:`as_flags`).
    """
    def convert(text: str) -> T:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        try:
            check(value)
        except ConfigError as exc:
            message = str(as_flags(exc, names))
            raise argparse.ArgumentTypeError(message.removeprefix(flag).lstrip(": ")) from None
        return value

    convert.__name__ = flag.lstrip("-").replace("-", "_")
    return convert


def _number(text: str) -> float:
    """A float that is not NaN (infinity is left to the field's check, which names the field)."""
    value = float(text)
    if math.isnan(value):
        raise ValueError(text)
    return value


def _whole(text: str) -> int:
    """A whole number, also written as ``4e8``."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not math.isfinite(value) or value != math.floor(value):
            raise ValueError(text) from None
        return int(value)


# --- the configuration's checks, one field at a time --------------------------------------------


def _device(**fields: Any) -> None:
    from qkdstack.node.config import DeviceSection

    DeviceSection(**fields)


def _kms(**fields: Any) -> None:
    from qkdstack.node.config import KmsSection

    KmsSection(**fields)


def _protocol(**fields: Any) -> None:
    from qkdstack.node.config import ProtocolSection

    ProtocolSection(**fields)


distance_km = field_type("--distance-km", _number, lambda v: _device(distance_km=v),
                         {"[device] distance_km": "--distance-km"})
"""``--distance-km`` of init and demo: ``[device] distance_km``'s check."""

pulses_per_frame = field_type("--pulses-per-frame", _whole, lambda v: _device(pulses_per_frame=v),
                              {"[device] pulses_per_frame": "--pulses-per-frame"}, "a whole number of pulses")
"""``--pulses-per-frame`` of init and demo: ``[device] pulses_per_frame``'s check (a whole number ≥ 1000)."""

store_url = field_type("--store", str, lambda v: _kms(store=v), {"[kms] store": "--store"}, "a URL")
"""``--store`` of init: ``[kms] store``'s check."""


def protocol_value(flag: str, name: str) -> Callable[[str], float]:
    """``--eps-sec``, ``--eps-cor``, ``--max-qber``, ``--max-phase-error``: ``[protocol] NAME``'s check."""
    return field_type(flag, _number, lambda v: _protocol(**{name: v}), {f"[protocol] {name}": flag})


def at_least(flag: str, low: int) -> Callable[[str], int]:
    """A whole number ≥ ``low`` (``--rounds``, ``--frames``)."""

    def check(value: int) -> None:
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")

    return field_type(flag, int, check, {}, "a whole number")


def port(text: str) -> int:
    """A TCP port number, 1..65535 (argparse ``type=``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {value}")
    return value


def site_names(text: str) -> list[str]:
    """``--sites A,B``: two different site names, each as ``[site] name`` requires (argparse ``type=``)."""
    from qkdstack.node.config import SiteSection

    sites = [s.strip() for s in text.split(",") if s.strip()]
    if len(sites) != 2 or sites[0] == sites[1]:
        raise argparse.ArgumentTypeError(f"must name exactly two different sites, e.g. A,B, got {text!r}")
    try:
        SiteSection(name=sites[0], role="transmitter", peer=sites[1])
        SiteSection(name=sites[1], role="receiver", peer=sites[0])
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("[site] name ", "").replace("[site] peer ", "")) from None
    return sites


def check_sae_id(flag: str, sae_id: str) -> str:
    """An SAE ID usable as a certificate name and in an ETSI 014 URL path (the topology file's rule)."""
    if not sae_id or not sae_id.isprintable() or sae_id.strip() != sae_id or any(c in sae_id for c in ":/,="):
        raise ConfigError(f"{flag} {sae_id!r} is not a usable SAE ID (printable, no spaces at either end, "
                          "no ':', '/', ',' or '=')")
    return sae_id


# --- files and folders a command writes ------------------------------------------------------------


def _creatable(flag: str, path: Path) -> None:
    """The nearest existing folder above ``path`` can take a new entry."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path} cannot be made: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} cannot be made: {parent} is not writable")


def new_folder(flag: str, path: str | os.PathLike[str]) -> Path:
    """A folder a command fills: new, or existing and empty (checked, not made)."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{flag} {p} is a file, not a folder")
        if any(p.iterdir()):
            raise ConfigError(f"{flag} {p} exists and is not empty; choose a new folder")
        return p
    _creatable(flag, p)
    return p


def make_folder(flag: str, path: str | os.PathLike[str]) -> Path:
    """:func:`new_folder`, then made: an OS that refuses (``/proc``, a full disk) is one sentence naming ``flag``."""
    p = new_folder(flag, path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {p} cannot be made ({exc.strerror or exc})") from None
    return p


def new_file(flag: str, path: str | os.PathLike[str]) -> Path:
    """A file a command writes and never overwrites: it must not exist, and its folder must."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; name a new file")
    if p.exists() or p.is_symlink():
        raise ConfigError(f"{flag} {p} already exists; remove it first or name a new file (files are never "
                          "overwritten)")
    if not p.parent.is_dir():
        raise ConfigError(f"{flag} {p} cannot be written: the folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {p} cannot be written: the folder {p.parent} is not writable")
    return p


def plot_file(text: str) -> str:
    """``--plot FILE``: a format matplotlib writes, in a folder that exists (argparse ``type=``).

    Checked when the command line is parsed, so a typo costs nothing rather than the whole computation.
    """
    p = Path(text)
    ext = p.suffix.lower().lstrip(".")
    if ext not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(
            f"must end in a picture format ({', '.join('.' + f for f in PLOT_FORMATS[:4])}, ...), got {text!r}")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    parent = p.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot be written: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot be written: the folder {parent} is not writable")
    return text


# --- the command line itself ---------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _chain(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``qkdstack``'s parser, then each sub-command's the arguments went to (``key``, ``key export``)."""
    chain = [parser]
    while (sub := _subparsers(parser)) is not None:
        name = next((t for t in getattr(parser, "seen_args", []) if t in sub.choices), None)
        if name is None:
            break
        parser = sub.choices[name]
        chain.append(parser)
    return chain


def leaf_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sub-command's parser (``qkdstack key export``'s, not ``qkdstack``'s) the arguments went to."""
    return _chain(parser)[-1]


def _own_tokens(parser: argparse.ArgumentParser) -> list[str]:
    """The arguments a parser read itself: those before its sub-command's name (or a mistyped one: the first
    word that is no flag; these parsers take no values), if it has sub-commands."""
    tokens = list(getattr(parser, "seen_args", []))
    if _subparsers(parser) is not None:
        cut = next((i for i, t in enumerate(tokens) if not t.startswith("-")), len(tokens))
        tokens = tokens[:cut]
    return tokens


def _unknown_flag(parser: argparse.ArgumentParser) -> str | None:
    """A sentence for the first ``--flag`` the parser does not know, with the closest one it does."""
    import difflib

    known = sorted(s for s in parser._option_string_actions if s.startswith("--"))
    for token in _own_tokens(parser):
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name in known or (parser.allow_abbrev and sum(k.startswith(name) for k in known) == 1):
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (see {parser.prog} --help)"
        return f"unknown flag {name}{hint}"
    return None


def usage_error(parser: argparse.ArgumentParser, message: str) -> tuple[argparse.ArgumentParser, str]:
    """The parser that should speak and its one sentence, for an error argparse found in the command line.

    * An unknown flag is reported by the sub-command it was given to, with the closest flag it has
      (``qkdstack distill: error: unknown flag --distnce-km; did you mean --distance-km?``), also when
      argparse first noticed something else (a required flag "missing" because its name was mistyped).
    * An unknown sub-command gets the closest one.
    * ``argument --flag: must be ...`` (argparse's wording for a refused ``type=``) becomes
      ``--flag must be ...``, the wording of every other check.
    """
    import difflib
    import re

    chain = _chain(parser)
    leaf = chain[-1]
    for speaker in chain:
        unknown = _unknown_flag(speaker)
        if unknown is not None:
            return speaker, unknown
    if leaf is not parser and message.startswith("unrecognized arguments"):
        return leaf, message
    sub = _subparsers(parser)
    if sub is not None and "invalid choice" in message:
        given = next((t for t in getattr(parser, "seen_args", []) if not t.startswith("-")), "")
        close = difflib.get_close_matches(given, list(sub.choices), n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (one of {', '.join(sub.choices)})"
        what = "command" if parser.prog == "qkdstack" else "action"
        return parser, f"unknown {what} {given!r}{hint}"
    match = re.fullmatch(r"argument ([^:]+): (.*)", message, re.DOTALL)
    if match:
        flag = match.group(1).split("/")[-1]
        rest = match.group(2)
        return parser, f"{flag} {rest}" if rest.startswith("must ") else f"{flag}: {rest}"
    return parser, message
