"""Parameters of a decoy-state BB84 device, as a user of a real system would set them.

Validation happens at construction: a bad value raises :class:`~qkdstack.errors.ConfigError`
with one sentence naming the field. Intensities are mean photon numbers per pulse,
losses are in dB, lengths in km, probabilities in [0, 1], times in seconds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from qkdstack.errors import ConfigError

Z = 0
"""Key basis (rectilinear)."""
X = 1
"""Test basis (diagonal)."""


def _check_probability(name: str, value: float, *, open_low: bool = False, open_high: bool = False) -> None:
    if not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        lo = "(0" if open_low else "[0"
        hi = "1)" if open_high else "1]"
        raise ConfigError(f"{name} must lie in {lo}, {hi}, got {value}")


def _check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, int | float) or math.isnan(value) or value < 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number ≥ 0, got {value!r}")


@dataclass(frozen=True)
class SourceParams:
    """Alice's phase-randomised weak coherent source.

    ``intensities`` are μ1 > μ2 > … ≥ 0 (signal first, then decoys; 2 or 3 of them),
    chosen per pulse with ``intensity_probs``. The basis is Z with probability ``p_z``
    (efficient BB84; 0.5 is the symmetric protocol).
    """

    rep_rate_hz: float = 1e9
    # Defaults near the Lim et al. (2014) finite-key optimum for blocks of ~10^5–10^6 key bits at
    # 25–50 km (`qkdstack keyrate --block-size 1e6 --optimize` gives μ ≈ (0.52, 0.26, 0),
    # p ≈ (0.27, 0.51, 0.22), p_Z ≈ 0.81): enough decoy and test-basis events for tight bounds.
    intensities: tuple[float, ...] = (0.5, 0.25, 0.0)
    intensity_probs: tuple[float, ...] = (0.4, 0.4, 0.2)
    p_z: float = 0.8

    def __post_init__(self) -> None:
        object.__setattr__(self, "intensities", tuple(float(m) for m in self.intensities))
        object.__setattr__(self, "intensity_probs", tuple(float(p) for p in self.intensity_probs))
        if not (self.rep_rate_hz > 0 and math.isfinite(self.rep_rate_hz)):
            raise ConfigError(f"rep_rate_hz must be a positive number of pulses per second, got {self.rep_rate_hz}")
        mus, probs = self.intensities, self.intensity_probs
        if not 1 <= len(mus) <= 3:
            raise ConfigError(f"intensities must list 1 to 3 values (signal, then decoys), got {len(mus)}")
        if len(probs) != len(mus):
            raise ConfigError(
                f"intensity_probs must give one probability per intensity ({len(mus)}), got {len(probs)}"
            )
        for i, mu in enumerate(mus):
            _check_nonneg(f"intensities[{i}]", mu)
        if any(a <= b for a, b in itertools.pairwise(mus)):
            raise ConfigError(f"intensities must be strictly decreasing (signal > decoy > vacuum), got {mus}")
        if mus[0] <= 0:
            raise ConfigError("intensities[0] (the signal) must be > 0")
        for i, p in enumerate(probs):
            _check_probability(f"intensity_probs[{i}]", p, open_low=True)
        if abs(sum(probs) - 1) > 1e-9:
            raise ConfigError(f"intensity_probs must sum to 1, got {sum(probs):.6g}")
        _check_probability("p_z (Alice's key-basis probability)", self.p_z, open_low=True, open_high=True)

    @property
    def n_intensities(self) -> int:
        return len(self.intensities)


@dataclass(frozen=True)
class ChannelParams:
    """The fibre: length, attenuation, extra loss, and the misalignment it causes."""

    length_km: float = 25.0
    attenuation_db_per_km: float = 0.2
    extra_loss_db: float = 0.0
    misalignment: float = 0.01

    def __post_init__(self) -> None:
        _check_nonneg("length_km (fibre length)", self.length_km)
        _check_nonneg("attenuation_db_per_km", self.attenuation_db_per_km)
        _check_nonneg("extra_loss_db", self.extra_loss_db)
        _check_probability("misalignment (e_mis)", self.misalignment)
        if self.misalignment > 0.5:
            raise ConfigError(f"misalignment (e_mis) must be ≤ 0.5, got {self.misalignment}")

    @property
    def loss_db(self) -> float:
        return self.length_km * self.attenuation_db_per_km + self.extra_loss_db

    @property
    def transmittance(self) -> float:
        """η_ch = 10^(−loss/10)."""
        return 10 ** (-self.loss_db / 10)


@dataclass(frozen=True)
class ReceiverParams:
    """Bob's passive or active basis choice and his threshold detectors.

    ``efficiency`` is η_Bob: receiver transmittance times detector efficiency.
    ``dark_count`` is the background yield Y0: the probability that Bob's detection
    system (two detectors) clicks on an empty pulse; each detector's dark-count
    probability per gate is p_dc = 1 − sqrt(1 − Y0). ``afterpulse`` is the probability
    that a click causes a spurious click in a later gate; ``dead_time_s`` blinds a
    detector after it clicks.
    """

    p_z: float = 0.8
    efficiency: float = 0.1
    dark_count: float = 1e-6
    afterpulse: float = 0.0
    dead_time_s: float = 0.0

    def __post_init__(self) -> None:
        _check_probability("receiver p_z (Bob's key-basis probability)", self.p_z, open_low=True, open_high=True)
        _check_probability("efficiency (η_Bob)", self.efficiency, open_low=True)
        _check_probability("dark_count (Y0)", self.dark_count, open_high=True)
        _check_probability("afterpulse", self.afterpulse, open_high=True)
        _check_nonneg("dead_time_s", self.dead_time_s)

    @property
    def dark_count_per_detector(self) -> float:
        """p_dc of each of the two detectors such that 1 − (1 − p_dc)² = Y0."""
        return 1 - math.sqrt(1 - self.dark_count)


@dataclass(frozen=True)
class DeviceParams:
    """A whole link: source, fibre and receiver."""

    source: SourceParams = field(default_factory=SourceParams)
    channel: ChannelParams = field(default_factory=ChannelParams)
    receiver: ReceiverParams = field(default_factory=ReceiverParams)

    @property
    def eta_sys(self) -> float:
        """Overall transmittance η = η_ch · η_Bob."""
        return self.channel.transmittance * self.receiver.efficiency
