"""Typed loading of configuration sections with one-sentence errors that name the field.

A section is a frozen dataclass whose fields carry their type and default; unknown keys,
missing required keys and values of the wrong type raise
:class:`~qkdstack.errors.ConfigError` saying ``[section] field`` and what was expected.
Extra checks (ranges, choices) go in the dataclass's ``__post_init__``, which raises
``ConfigError`` through :func:`field_error`.

Types are strict where a conversion could hide a mistake: an ``int`` field takes only a TOML
integer (``150_000_000``; the float ``1.5e8`` is refused even though its value is integral), a
``bool`` field only ``true``/``false``. A ``float`` field takes an integer too (``25`` km is 25.0 km).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from qkdstack.errors import ConfigError

S = TypeVar("S")

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


def field_error(section: str, name: str, problem: str) -> ConfigError:
    """The error for one field: ``[section] name problem``."""
    return ConfigError(f"[{section}] {name} {problem}")


def _coerce(section: str, name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(section, name, value, options[0])
    if origin is list or origin is tuple:
        if not isinstance(value, list | tuple):
            raise field_error(section, name, f"must be a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        items = [_coerce(section, name, v, item_type) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise field_error(section, name, f"must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        # A count is never read from a float, not even an integral one: `1.5e8` in place of `100_000_000`
        # is a typo that silently changes the frame size, and TOML has exact integers with `_` separators.
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e18:
            raise field_error(section, name, f"must be a TOML integer such as {int(value):_}, not the float {value!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise field_error(section, name, f"must be an integer, got {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise field_error(section, name, f"must be {_TYPE_WORDS[annotation]}, got {value!r}")
        return value
    return value


def load_section(cls: type[S], section: str, data: Any) -> S:
    """Build dataclass ``cls`` from the mapping ``data`` of config section ``section``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"[{section}] must be a table of settings")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"[{section}] has unknown field {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(section, name, data[name], hints[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise field_error(section, name, "is required")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("[") else f"[{section}] {msg}") from None


def toml_value(value: object) -> str:
    """A TOML value for what configurations and topologies hold: strings, booleans, numbers and lists of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)
