"""The repeaterless bound on the secret-key capacity of a lossy channel.

Pirandola, Laurenza, Ottaviani, Banchi, "Fundamental limits of repeaterless quantum
communications", Nat. Commun. 8, 15043 (2017), Eq. (1)/(19): a pure-loss bosonic channel of
transmissivity η has secret-key capacity K(η) = −log2(1 − η) bits per channel use. No
point-to-point QKD protocol, whatever its source or detectors, can beat it; it is the
reference line on a key-rate-versus-distance plot.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from qkdstack.errors import ConfigError


def plob_bound(eta: ArrayLike) -> float | NDArray[np.float64]:
    """PLOB bound −log2(1 − η) in bits per channel use (Pirandola et al. 2017, Eq. (1)).

    ``eta`` is the channel transmissivity in [0, 1] (a scalar or an array); η = 1 gives
    +inf (a lossless channel has unbounded capacity). Values outside [0, 1] raise
    :class:`ConfigError`. For small η the bound is ≈ 1.44 η.
    """
    arr = np.asarray(eta, dtype=np.float64)
    if np.any(np.isnan(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ConfigError(f"eta (channel transmissivity) must lie in [0, 1], got {eta!r}")
    with np.errstate(divide="ignore"):
        out = -np.log1p(-arr) / math.log(2)
    if out.ndim == 0:
        return float(out)
    return out


def fibre_transmittance(length_km: float, attenuation_db_per_km: float, extra_loss_db: float = 0.0) -> float:
    """η_ch = 10^(−(α L + extra)/10): transmittance of a fibre of ``length_km`` km."""
    return 10 ** (-(attenuation_db_per_km * length_km + extra_loss_db) / 10)
