"""qkdstack: a quantum key distribution stack.

Layers (see docs/architecture.md): ``physics`` (simulated decoy-state BB84 device),
``theory`` (key-rate formulas and finite-key bounds), ``protocol`` (post-processing
stages over a :class:`~qkdstack.transport.channel.Channel`), ``auth`` (Wegman–Carter
authentication and bootstrap), ``transport`` (codec and TCP link), ``kms`` (key store
and delivery), ``node`` (the site service) and ``apps`` (key consumers).

For notebooks and scripts, :func:`simulate`, :func:`distill` and :func:`keyrate` (from
:mod:`qkdstack.api`, docs/api.md) take the command's flags as keyword arguments and return rows for
``pandas.DataFrame``. They are imported on first use, so that ``import qkdstack`` (and
``qkdstack --help``) loads neither NumPy, SciPy nor Numba.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qkdstack.errors import ConfigError, QKDError

if TYPE_CHECKING:
    from qkdstack.api import distill, keyrate, simulate

__version__ = "0.1.0"

_API = ("simulate", "distill", "keyrate")

__all__ = ["ConfigError", "QKDError", "__version__", "distill", "keyrate", "simulate"]


def __getattr__(name: str) -> Any:
    """``qkdstack.simulate`` and its siblings, imported from :mod:`qkdstack.api` on first use (PEP 562)."""
    if name in _API:
        from qkdstack import api

        return getattr(api, name)
    raise AttributeError(f"module 'qkdstack' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
