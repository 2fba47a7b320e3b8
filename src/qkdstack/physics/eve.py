"""Eavesdroppers on the quantum channel: their parameters, validation and the ``--eve`` syntax.

Each attack is described here only by its parameters; what it does to the light is in
:mod:`qkdstack.physics.optics`, which turns the attack into photon-number statistics.

* :class:`NoEve` — the honest fibre.
* :class:`InterceptResend` — on a fraction F of the pulses Eve, at the entrance of Bob's
  receiver, measures the arriving light in a random basis and resends one photon prepared
  in her basis and result. She knows Alice's bit when her basis matched. On sifted bits
  this adds an error rate of about F/4 (Bennett, Brassard, BB84; Gisin et al., RMP 74,
  145 (2002), Sec. VI.A).
* :class:`PhotonNumberSplitting` — at Alice's output Eve measures the photon number,
  blocks single-photon pulses, keeps one photon of every multi-photon pulse and forwards
  the rest over a lossless channel; she blocks as many single photons (and, at long
  distance, multi-photon pulses) as keeps Bob's detection rate for the *signal* intensity
  at its expected value (Brassard, Lütkenhaus, Mor, Sanders, PRL 85, 1330 (2000)).
  After basis announcement she knows the bit of every multi-photon pulse.
* :class:`BeamSplitting` — Eve taps a fraction F of the light at the source and sends the
  rest over a lossless fibre, attenuated so that Bob sees the rate the lossy fibre would
  give (as far as possible); she knows the bit whenever her tap held at least one photon
  (Dušek, Lütkenhaus, Hendrych, Prog. Opt. 49, 381 (2006), Sec. 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qkdstack.errors import ConfigError


@dataclass(frozen=True)
class NoEve:
    """No eavesdropper: the fibre as specified by the channel parameters."""

    def __str__(self) -> str:
        return "none"


@dataclass(frozen=True)
class InterceptResend:
    """Intercept-resend on each pulse independently with probability ``fraction`` (F)."""

    fraction: float

    def __post_init__(self) -> None:
        _check_fraction("intercept-resend fraction", self.fraction, allow_one=True)

    def __str__(self) -> str:
        return f"intercept-resend:{self.fraction:g}"


@dataclass(frozen=True)
class PhotonNumberSplitting:
    """Photon-number splitting tuned to keep Bob's signal-intensity detection rate."""

    def __str__(self) -> str:
        return "pns"


@dataclass(frozen=True)
class BeamSplitting:
    """Beam splitting: Eve taps ``fraction`` (F, 0 < F < 1) of the light at the source."""

    fraction: float

    def __post_init__(self) -> None:
        _check_fraction("beamsplit fraction", self.fraction, allow_one=False)

    def __str__(self) -> str:
        return f"beamsplit:{self.fraction:g}"


Eavesdropper = NoEve | InterceptResend | PhotonNumberSplitting | BeamSplitting
"""Any of the supported attacks."""


def _check_fraction(name: str, value: float, *, allow_one: bool) -> None:
    ok = (
        isinstance(value, int | float)
        and not math.isnan(value)
        and value > 0
        and (value <= 1 if allow_one else value < 1)
    )
    if not ok:
        hi = "1]" if allow_one else "1)"
        raise ConfigError(f"{name} must lie in (0, {hi}, got {value!r}")


def parse_eve(text: str, flag: str = "--eve") -> Eavesdropper:
    """Parse ``none``, ``intercept-resend:FRACTION``, ``pns`` or ``beamsplit:FRACTION``.

    Raises :class:`ConfigError` whose sentence names ``flag`` on anything else.
    """
    raw = text.strip().lower()
    name, sep, arg = raw.partition(":")
    try:
        if name == "none" and not sep:
            return NoEve()
        if name == "pns" and not sep:
            return PhotonNumberSplitting()
        if name in ("intercept-resend", "beamsplit") and sep:
            try:
                fraction = float(arg)
            except ValueError:
                raise ConfigError(f"{arg!r} is not a number") from None
            return InterceptResend(fraction) if name == "intercept-resend" else BeamSplitting(fraction)
    except ConfigError as exc:
        raise ConfigError(f"{flag} {text!r}: {exc}") from None
    raise ConfigError(f"{flag} must be none, intercept-resend:FRACTION, pns or beamsplit:FRACTION, got {text!r}")
