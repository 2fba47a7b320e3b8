"""Asymptotic (infinite-key) decoy-state BB84 key rates: GLLP with decoy states.

Ma, Qi, Zhao, Lo, "Practical decoy state for quantum key distribution", PRA 72, 012326
(2005) (arXiv:quant-ph/0503005), referred to as "Ma 2005" below:

* GLLP key rate, Eq. (1): R ≥ q {−Q_μ f(E_μ) H2(E_μ) + Q_1 [1 − H2(e_1)]};
* fibre-channel model, Eqs. (10)–(11): Q_μ = Y0 + 1 − e^(−ημ),
  E_μ Q_μ = e0 Y0 + e_d (1 − e^(−ημ)), e0 = 1/2, η = η_ch η_Bob;
* infinite decoy states (the decoy method's limit, Sec. II): the single-photon yield and
  error are known exactly, Y1 = Y0 + η, e1 = (e0 Y0 + e_d η)/Y1, Q1 = Y1 μ e^(−μ);
* vacuum + weak decoy (Sec. IV.B), Eq. (34):
  Y1 ≥ Y1^L = μ/(μν − ν²) [Q_ν e^ν − Q_μ e^μ ν²/μ² − (μ² − ν²)/μ² Y0],
  Eq. (37): e1 ≤ e1^U = (E_ν Q_ν e^ν − e0 Y0)/(Y1^L ν), Q1^L = Y1^L μ e^(−μ).

After-pulses (not in Ma 2005) are added as in the Lim 2014 simulation model (see
:mod:`qkdstack.theory.device`): every click triggers a further random-bit click with
probability p_ap, so Q → Q (1 + p_ap) and E Q → E Q + p_ap Q/2 (Q without after-pulses);
with p_ap = 0 the formulas are exactly Ma 2005's.

The sifting factor q: Ma 2005 use q = 1/2 for the symmetric BB84 protocol (both bases
chosen with probability 1/2, both used for key; half the detections are sifted away). For
efficient (biased) BB84 as qkdstack runs it, the key comes from the Z basis only and a
detection is kept for key when Alice and Bob both chose Z: q = p_Z^A p_Z^B (= p_Z² with one
common basis probability). :func:`sifting_factor` implements exactly this rule: 1/2 for the
symmetric protocol (p_Z = 1/2 at both ends), p_Z^A p_Z^B otherwise. In the asymptotic limit
the test basis needs a vanishing fraction of the pulses, so biased BB84 approaches q = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from scipy.optimize import minimize_scalar

from qkdstack.errors import ConfigError
from qkdstack.theory.entropy import binary_entropy

E0 = 0.5
"""Error rate of background (dark-count) clicks: a random bit (Ma 2005, after Eq. (3))."""


def _check_unit(name: str, value: float, *, open_low: bool = False, open_high: bool = False) -> None:
    if not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if (value <= 0 if open_low else value < 0) or (value >= 1 if open_high else value > 1):
        raise ConfigError(f"{name} must lie in {'(' if open_low else '['}0, 1{')' if open_high else ']'}, got {value}")


def _check_positive(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def sifting_factor(p_z: float, p_z_bob: float | None = None) -> float:
    """The q of Ma 2005 Eq. (1): fraction of detections that enter the key.

    Symmetric BB84 (p_Z = 1/2 at Alice and Bob, key from both bases): q = 1/2, as in Ma 2005.
    Efficient BB84 (any other p_Z; key from the Z basis only, as qkdstack's protocol does):
    q = p_Z^A p_Z^B.
    """
    p_b = p_z if p_z_bob is None else p_z_bob
    _check_unit("p_z (key-basis probability)", p_z, open_low=True, open_high=True)
    _check_unit("p_z_bob (Bob's key-basis probability)", p_b, open_low=True, open_high=True)
    if p_z == 0.5 and p_b == 0.5:
        return 0.5
    return p_z * p_b


def ma2005_gain(eta: float, mu: float, y0: float, afterpulse: float = 0.0) -> float:
    """Q_μ = Y0 + 1 − e^(−ημ) (Ma 2005, Eq. (10)), times (1 + p_ap) for after-pulses."""
    return (y0 + 1.0 - math.exp(-eta * mu)) * (1.0 + afterpulse)


def ma2005_error_gain(eta: float, mu: float, y0: float, e_d: float, afterpulse: float = 0.0) -> float:
    """E_μ Q_μ = e0 Y0 + e_d (1 − e^(−ημ)) (Ma 2005, Eq. (11)), plus p_ap Q_μ/2 for after-pulses."""
    base = E0 * y0 + e_d * (1.0 - math.exp(-eta * mu))
    return base + afterpulse * (y0 + 1.0 - math.exp(-eta * mu)) / 2


def gllp_rate(q: float, gain: float, qber: float, q1: float, e1: float, f_ec: float) -> float:
    """GLLP/decoy key rate per pulse, Ma 2005 Eq. (1): q {−Q_μ f H2(E_μ) + Q1 [1 − H2(e1)]}.

    Not clipped: a negative value means no key. e1 ≥ 1/2 gives no single-photon key
    (its term is dropped, not rewarded), Q1 ≤ 0 likewise.
    """
    single = q1 * (1.0 - binary_entropy(e1)) if (q1 > 0 and e1 < 0.5) else 0.0
    return q * (-gain * f_ec * binary_entropy(min(max(qber, 0.0), 0.5)) + single)


@dataclass(frozen=True)
class AsymptoticResult:
    """An asymptotic key rate and the quantities it was computed from (per pulse sent)."""

    method: str
    rate_per_pulse: float
    """max(0, R) in bits per pulse, sifting factor q included."""
    raw_rate: float
    """R before clipping at 0."""
    q: float
    mu: float
    nu: float | None
    eta: float
    gain: float
    qber: float
    y1: float
    e1: float
    q1: float

    def to_dict(self) -> dict[str, float | str | None]:
        return asdict(self)


def _check_common(eta: float, mu: float, y0: float, e_d: float, f_ec: float, q: float, afterpulse: float) -> None:
    _check_unit("eta (overall transmittance)", eta)
    _check_positive("mu (signal intensity)", mu)
    _check_unit("y0 (background yield)", y0, open_high=True)
    _check_unit("e_d (misalignment)", e_d)
    if e_d > 0.5:
        raise ConfigError(f"e_d (misalignment) must be ≤ 0.5, got {e_d}")
    _check_positive("f_ec (error-correction efficiency)", f_ec)
    if f_ec < 1:
        raise ConfigError(f"f_ec (error-correction efficiency) must be ≥ 1 (Shannon limit), got {f_ec}")
    _check_unit("q (sifting factor)", q, open_low=True)
    _check_unit("afterpulse", afterpulse, open_high=True)


def infinite_decoy_rate(
    eta: float, mu: float, y0: float, e_d: float, f_ec: float, q: float = 0.5, afterpulse: float = 0.0
) -> AsymptoticResult:
    """Key rate with infinitely many decoys: Y1 = Y0 + η, e1 = (e0 Y0 + e_d η)/Y1 (Ma 2005, Sec. II).

    The upper limit of every decoy method; Q1 = Y1 μ e^(−μ), rate from Eq. (1).
    """
    _check_common(eta, mu, y0, e_d, f_ec, q, afterpulse)
    gain = ma2005_gain(eta, mu, y0, afterpulse)
    qber = ma2005_error_gain(eta, mu, y0, e_d, afterpulse) / gain if gain > 0 else 0.5
    y1_noap = y0 + eta
    y1 = y1_noap * (1.0 + afterpulse)
    e1 = (E0 * y0 + e_d * eta + afterpulse * y1_noap / 2) / y1 if y1 > 0 else 0.5
    q1 = y1 * mu * math.exp(-mu)
    raw = gllp_rate(q, gain, qber, q1, e1, f_ec)
    return AsymptoticResult("infinite", max(raw, 0.0), raw, q, mu, None, eta, gain, qber, y1, e1, q1)


def vacuum_weak_bounds(
    mu: float, nu: float, gain_mu: float, gain_nu: float, qber_nu: float, y0: float
) -> tuple[float, float]:
    """(Y1^L, e1^U) of the vacuum + weak decoy method, Ma 2005 Eqs. (34) and (37).

    Y1^L = μ/(μν − ν²) [Q_ν e^ν − Q_μ e^μ ν²/μ² − (μ² − ν²)/μ² Y0] (clipped at 0),
    e1^U = (E_ν Q_ν e^ν − e0 Y0)/(Y1^L ν) (clipped to [0, 1/2]; 1/2 if Y1^L = 0).
    The gains and QBERs may be measured or expected; Y0 is the vacuum decoy's gain.
    Requires μ > ν > 0 (Ma 2005 also need μe^(−μ) > νe^(−ν), i.e. ν < μ < 1, for the bound
    to be tight, not for it to be valid).
    """
    _check_positive("mu (signal intensity)", mu)
    _check_positive("nu (weak decoy intensity)", nu)
    if not mu > nu:
        raise ConfigError(f"the weak decoy nu must be below the signal mu, got mu={mu}, nu={nu}")
    y1 = (mu / (mu * nu - nu * nu)) * (
        gain_nu * math.exp(nu) - gain_mu * math.exp(mu) * nu * nu / (mu * mu) - (mu * mu - nu * nu) / (mu * mu) * y0
    )
    y1 = max(y1, 0.0)
    if y1 <= 0:
        return 0.0, 0.5
    e1 = (qber_nu * gain_nu * math.exp(nu) - E0 * y0) / (y1 * nu)
    return y1, min(max(e1, 0.0), 0.5)


def vacuum_weak_rate(
    eta: float, mu: float, nu: float, y0: float, e_d: float, f_ec: float, q: float = 0.5, afterpulse: float = 0.0
) -> AsymptoticResult:
    """Key rate of the vacuum + weak decoy protocol (Ma 2005, Sec. IV.B, Eqs. (1), (34), (37)).

    The gains Q_μ, Q_ν and the error E_ν are the model's expected values (Eqs. (10)–(11));
    the vacuum decoy's gain is Y0 (times 1 + p_ap with after-pulses).
    """
    _check_common(eta, mu, y0, e_d, f_ec, q, afterpulse)
    gain_mu = ma2005_gain(eta, mu, y0, afterpulse)
    gain_nu = ma2005_gain(eta, nu, y0, afterpulse)
    qber_mu = ma2005_error_gain(eta, mu, y0, e_d, afterpulse) / gain_mu
    qber_nu = ma2005_error_gain(eta, nu, y0, e_d, afterpulse) / gain_nu
    y0_meas = ma2005_gain(eta, 0.0, y0, afterpulse)
    y1, e1 = vacuum_weak_bounds(mu, nu, gain_mu, gain_nu, qber_nu, y0_meas)
    q1 = y1 * mu * math.exp(-mu)
    raw = gllp_rate(q, gain_mu, qber_mu, q1, e1, f_ec)
    return AsymptoticResult("vacuum-weak", max(raw, 0.0), raw, q, mu, nu, eta, gain_mu, qber_mu, y1, e1, q1)


def optimize_mu(rate: Callable[[float], AsymptoticResult], low: float = 1e-3, high: float = 1.5) -> AsymptoticResult:
    """The result of ``rate(μ)`` at the μ in [low, high] that maximises the (unclipped) rate.

    Bounded Brent search (scipy.optimize.minimize_scalar) on the raw rate; the rate of
    Ma 2005 is unimodal in μ for realistic parameters (Ma 2005, Sec. III).
    """
    res = minimize_scalar(
        lambda m: -rate(float(m)).raw_rate, bounds=(low, high), method="bounded", options={"xatol": 1e-5}
    )
    return rate(float(res.x))
