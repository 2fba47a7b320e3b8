"""Expected key rates of a device model: asymptotic (Ma 2005) and finite-key (Lim 2014).

This module connects the device model (:mod:`qkdstack.physics.params`, expected statistics
from :mod:`qkdstack.theory.device`) to the security bounds:

* ``infinite`` and ``vacuum-weak``: the asymptotic GLLP rate of Ma, Qi, Zhao, Lo, PRA 72,
  012326 (2005), Eq. (1), with infinite decoys or the vacuum + weak bounds Eqs. (34)/(37)
  (:mod:`qkdstack.theory.asymptotic`); the sifting factor q is 1/2 for symmetric BB84 and
  p_Z^A p_Z^B otherwise (:func:`~qkdstack.theory.asymptotic.sifting_factor`).
* ``lim2014``: Lim, Curty, Walenta, Xu, Zbinden, PRA 89, 022307 (2014), Eqs. (1)–(5)
  (:mod:`qkdstack.theory.finite`), evaluated as in their Sec. IV: the block is fixed by n_key
  (their n_X) key-basis detections; the number of pulses is N = n_key/(p_Z^A p_Z^B Σ_k p_k R_k);
  every other count is its expectation for N pulses; λ_EC = f_EC n_key h(e_obs) with e_obs the
  key-basis QBER; the rate is ℓ/N bits per pulse. Without a block size the same bounds are
  evaluated without finite-size terms (the dashed asymptotic curve of their Fig. 1).

Optional optimisation (scipy.optimize): μ for the asymptotic methods (bounded Brent), and
{μ1, μ2, p_μ1, p_μ2, p_Z} for ``lim2014`` (a fixed-seed Sobol sample, then bounded Nelder–Mead
from the best points, as Lim 2014 optimise {q_x, p_μ1, p_μ2, μ1, μ2}; μ3 stays as given, Lim fix it at
2×10^−4). Detector dead time is not part of these formulas (nor of Lim 2014's model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.stats import qmc

from qkdstack.errors import ConfigError
from qkdstack.physics.params import DeviceParams, SourceParams
from qkdstack.theory.asymptotic import (
    AsymptoticResult,
    infinite_decoy_rate,
    optimize_mu,
    sifting_factor,
    vacuum_weak_rate,
)
from qkdstack.theory.device import expected_sifted_counts
from qkdstack.theory.entropy import binary_entropy
from qkdstack.theory.finite import DecoyCounts, FiniteKeyResult, lim2014_secret_length

METHODS = ("infinite", "vacuum-weak", "lim2014")


@dataclass(frozen=True)
class ExpectedRate:
    """Expected secret-key rate of one device configuration."""

    method: str
    rate_per_pulse: float
    """Secret bits per pulse sent (≥ 0)."""
    rate_bps: float
    """Secret bits per second: rate_per_pulse × repetition rate."""
    qber: float
    """Expected QBER of the signal (asymptotic methods) or of the whole key basis (lim2014)."""
    params: DeviceParams
    """The configuration evaluated (after optimisation, if any)."""
    block_size: float | None = None
    pulses: float | None = None
    """N, pulses per block (lim2014 with a block size)."""
    length: int | None = None
    """ℓ, secret bits per block (lim2014 with a block size)."""
    detail: AsymptoticResult | FiniteKeyResult | None = None

    def to_dict(self) -> dict[str, Any]:
        src = self.params.source
        out: dict[str, Any] = {
            "method": self.method,
            "distance_km": self.params.channel.length_km,
            "rate_per_pulse": self.rate_per_pulse,
            "rate_bps": self.rate_bps,
            "qber": self.qber,
            "eta_sys": self.params.eta_sys,
            "intensities": list(src.intensities),
            "intensity_probs": list(src.intensity_probs),
            "p_z": src.p_z,
            "p_z_bob": self.params.receiver.p_z,
            "block_size": self.block_size,
            "pulses_per_block": self.pulses,
            "secret_bits_per_block": self.length,
        }
        if self.detail is not None:
            out["detail"] = self.detail.to_dict()
        return out


# ---------------------------------------------------------------------------- asymptotic (Ma 2005)


def _ma_args(params: DeviceParams) -> dict[str, float]:
    return {
        "eta": params.eta_sys,
        "y0": params.receiver.dark_count,
        "e_d": params.channel.misalignment,
        "afterpulse": params.receiver.afterpulse,
    }


def _weak_decoy(params: DeviceParams) -> float:
    mus = params.source.intensities
    if len(mus) < 3 or mus[-1] != 0.0 or mus[1] <= 0:
        raise ConfigError(
            f"the vacuum-weak method needs a weak decoy ν > 0 and a vacuum decoy 0 (e.g. --decoys 0.1,0), got {mus}"
        )
    return mus[1]


def ma2005_expected_rate(params: DeviceParams, method: str, f_ec: float, *, optimize: bool = False) -> ExpectedRate:
    """Asymptotic rate of Ma 2005 (``method`` "infinite" or "vacuum-weak") for the device model.

    The signal is μ = intensities[0]; "vacuum-weak" takes ν = intensities[1] and needs a vacuum
    decoy. With ``optimize`` μ is chosen to maximise the rate (ν is kept).
    """
    q = sifting_factor(params.source.p_z, params.receiver.p_z)
    kw = _ma_args(params)
    if method == "infinite":

        def rate(mu: float) -> AsymptoticResult:
            return infinite_decoy_rate(mu=mu, f_ec=f_ec, q=q, **kw)

        low = 1e-3
    elif method == "vacuum-weak":
        nu = _weak_decoy(params)

        def rate(mu: float) -> AsymptoticResult:
            return vacuum_weak_rate(mu=mu, nu=nu, f_ec=f_ec, q=q, **kw)

        low = nu * 1.001 + 1e-6
    else:
        raise ConfigError(f"method must be 'infinite' or 'vacuum-weak' here, got {method!r}")
    res = optimize_mu(rate, low=low, high=max(1.5, low * 2)) if optimize else rate(params.source.intensities[0])
    if optimize and res.mu != params.source.intensities[0]:
        mus = (res.mu, *params.source.intensities[1:])
        try:
            params = replace(params, source=replace(params.source, intensities=mus))
        except ConfigError:
            # The infinite-decoy optimum fell below a listed decoy (which that method ignores).
            params = replace(params, source=replace(params.source, intensities=(res.mu,), intensity_probs=(1.0,)))
    return ExpectedRate(
        method=method,
        rate_per_pulse=res.rate_per_pulse,
        rate_bps=res.rate_per_pulse * params.source.rep_rate_hz,
        qber=res.qber,
        params=params,
        detail=res,
    )


# ---------------------------------------------------------------------------- finite key (Lim 2014)


def lim2014_expected_counts(params: DeviceParams, block_size: float | None) -> tuple[DecoyCounts, float, float]:
    """(expected counts, N, key-basis QBER) for a block of ``block_size`` key-basis detections.

    N = n_key/(p_Z^A p_Z^B Σ_k p_k R_k) (Lim 2014, Sec. IV). ``block_size=None`` gives the counts
    per pulse (N = 1), for the asymptotic evaluation. Needs three intensities.
    """
    src = params.source
    if src.n_intensities != 3:
        raise ConfigError(
            f"the lim2014 method needs three intensities μ1 > μ2 + μ3, μ2 > μ3 ≥ 0 (--mu and two --decoys), "
            f"got {src.intensities}"
        )
    per_pulse = expected_sifted_counts(params, 1.0)
    if block_size is None:
        pulses = 1.0
    else:
        if not (block_size > 0 and math.isfinite(block_size)):
            raise ConfigError(f"block_size (n_X, key-basis detections per block) must be > 0, got {block_size}")
        pulses = block_size / per_pulse.key_total if per_pulse.key_total > 0 else math.inf
    scale = pulses if math.isfinite(pulses) else 0.0
    counts = DecoyCounts(
        intensities=src.intensities,
        probabilities=src.intensity_probs,
        key_counts=tuple(n * scale for n in per_pulse.key_counts),
        test_counts=tuple(n * scale for n in per_pulse.test_counts),
        test_errors=tuple(n * scale for n in per_pulse.test_errors),
    )
    return counts, pulses, per_pulse.key_qber


def _lim2014_eval(
    params: DeviceParams, block_size: float | None, f_ec: float, eps_sec: float, eps_cor: float
) -> tuple[FiniteKeyResult, float, float]:
    counts, pulses, e_obs = lim2014_expected_counts(params, block_size)
    leakage = f_ec * counts.n_key * float(binary_entropy(min(e_obs, 0.5)))
    res = lim2014_secret_length(counts, leakage, eps_sec, eps_cor, finite=block_size is not None)
    return res, pulses, e_obs


def lim2014_expected_rate(
    params: DeviceParams, block_size: float | None, f_ec: float, eps_sec: float = 1e-10, eps_cor: float = 1e-15
) -> ExpectedRate:
    """Expected rate ℓ/N of Lim 2014 for the device model and a block of n_key key-basis detections.

    λ_EC = f_EC n_key h(e_obs) (Lim 2014, Sec. IV). ``block_size=None``: asymptotic limit of the same
    bounds (no finite-size terms), rate = s_0 + s_1(1 − h(φ)) − λ_EC per pulse.
    """
    _check_f_ec(f_ec)
    res, pulses, e_obs = _lim2014_eval(params, block_size, f_ec, eps_sec, eps_cor)
    if block_size is None:
        rate = max(res.raw_length, 0.0)
        length = None
        pulses_out = None
    else:
        rate = res.length / pulses if (math.isfinite(pulses) and pulses > 0) else 0.0
        length = res.length
        pulses_out = pulses if math.isfinite(pulses) else None
    return ExpectedRate(
        method="lim2014",
        rate_per_pulse=rate,
        rate_bps=rate * params.source.rep_rate_hz,
        qber=e_obs,
        params=params,
        block_size=block_size,
        pulses=pulses_out,
        length=length,
        detail=res,
    )


def _check_f_ec(f_ec: float) -> None:
    if not isinstance(f_ec, int | float) or not math.isfinite(f_ec) or f_ec < 1:
        raise ConfigError(f"f_ec (error-correction efficiency) must be a finite number ≥ 1, got {f_ec!r}")


def _with_protocol(params: DeviceParams, x: np.ndarray, mu3: float) -> DeviceParams | None:
    """Device params for x = (μ1, μ2, p1, r, p_Z) with p2 = (1 − p1) r, p3 = (1 − p1)(1 − r); None if infeasible."""
    mu1, mu2, p1, r, pz = (float(v) for v in x)
    if not (mu1 > mu2 + mu3 and mu2 > mu3):
        return None
    p2 = (1 - p1) * r
    p3 = 1 - p1 - p2
    src = params.source
    try:
        new_src = SourceParams(
            rep_rate_hz=src.rep_rate_hz, intensities=(mu1, mu2, mu3), intensity_probs=(p1, p2, p3), p_z=pz
        )
        return replace(params, source=new_src, receiver=replace(params.receiver, p_z=pz))
    except ConfigError:
        return None


def optimize_lim2014(
    params: DeviceParams,
    block_size: float | None,
    f_ec: float,
    eps_sec: float = 1e-10,
    eps_cor: float = 1e-15,
    *,
    optimize_p_z: bool = True,
    max_evals: int = 400,
    n_sample: int = 256,
    n_starts: int = 3,
) -> ExpectedRate:
    """Maximise the Lim 2014 expected rate over μ1, μ2, p_μ1, p_μ2 (and p_Z, same at both ends).

    μ3 stays fixed (Lim 2014 fix μ3 = 2×10^−4). A scrambled Sobol sample of ``n_sample`` points
    (fixed seed: deterministic), then bounded Nelder–Mead (scipy.optimize.minimize) from the given
    configuration and the ``n_starts`` best sample points. The objective
    is the unfloored rate raw ℓ/N where positive and the raw length otherwise, so the search is
    guided towards a key even where the given configuration yields none.
    """
    _check_f_ec(f_ec)
    src = params.source
    if src.n_intensities != 3:
        raise ConfigError(f"the lim2014 method needs three intensities, got {src.intensities}")
    mu3 = src.intensities[2]
    pz0 = src.p_z

    def objective(x: np.ndarray) -> float:
        if not optimize_p_z:
            x = np.append(x, pz0)
        p = _with_protocol(params, x, mu3)
        if p is None:
            return 1e30
        try:
            res, pulses, _ = _lim2014_eval(p, block_size, f_ec, eps_sec, eps_cor)
        except ConfigError:
            return 1e30
        raw = res.raw_length
        if raw > 0 and math.isfinite(pulses) and pulses > 0:
            return -raw / pulses
        return -raw if math.isfinite(raw) else 1e30

    bounds = [(mu3 + 0.02, 1.5), (mu3 + 1e-3, 1.0), (0.02, 0.98), (0.02, 0.98), (0.05, 0.995)]
    if not optimize_p_z:
        bounds = bounds[:4]
    lower = np.array([b[0] for b in bounds])
    upper = np.array([b[1] for b in bounds])
    # Coarse global stage: a scrambled Sobol sample of the box (fixed seed, so deterministic),
    # then Nelder-Mead from the given configuration and the best sample points.
    p1_0 = src.intensity_probs[0]
    x_given = np.array([src.intensities[0], src.intensities[1], p1_0, src.intensity_probs[1] / (1 - p1_0), pz0])
    sample = qmc.scale(qmc.Sobol(d=len(bounds), scramble=True, seed=12345).random(n_sample), lower, upper)
    values = np.array([objective(x) for x in sample])
    order = np.argsort(values)[:n_starts]
    starts = [np.clip(x_given[: len(bounds)], lower, upper), *(sample[i] for i in order)]
    best_x, best_f = None, math.inf
    for x0 in starts:
        res = minimize(
            objective,
            x0,
            method="Nelder-Mead",
            bounds=bounds,
            options={"maxfev": max_evals, "xatol": 1e-4, "fatol": 0.0},
        )
        if res.fun < best_f:
            best_f, best_x = float(res.fun), res.x
    if best_x is None or best_f >= 1e30:
        return lim2014_expected_rate(params, block_size, f_ec, eps_sec, eps_cor)
    x = best_x if optimize_p_z else np.append(best_x, pz0)
    best = _with_protocol(params, x, mu3)
    assert best is not None
    opt = lim2014_expected_rate(best, block_size, f_ec, eps_sec, eps_cor)
    # Never report less than the configuration we started from.
    try:
        given = lim2014_expected_rate(params, block_size, f_ec, eps_sec, eps_cor)
    except ConfigError:
        return opt
    return opt if opt.rate_per_pulse > given.rate_per_pulse else given


def expected_key_rate(
    params: DeviceParams,
    method: str,
    *,
    f_ec: float = 1.16,
    block_size: float | None = None,
    eps_sec: float = 1e-10,
    eps_cor: float = 1e-15,
    optimize: bool = False,
) -> ExpectedRate:
    """Expected key rate of ``params`` by ``method`` (one of :data:`METHODS`); see the module docstring."""
    _check_f_ec(f_ec)
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "lim2014":
        if optimize:
            return optimize_lim2014(params, block_size, f_ec, eps_sec, eps_cor)
        return lim2014_expected_rate(params, block_size, f_ec, eps_sec, eps_cor)
    if block_size is not None:
        raise ConfigError(f"a block size (finite key) needs the lim2014 method, not {method!r}")
    return ma2005_expected_rate(params, method, f_ec, optimize=optimize)


def max_distance_km(
    rate_at: Callable[[float], float],
    *,
    tolerance_km: float = 0.01,
    step_km: float = 50.0,
    limit_km: float = 5000.0,
) -> float | None:
    """Largest fibre length (km) with a positive rate, by bracketing and bisection.

    ``rate_at(L)`` returns the key rate at L km. Steps of ``step_km`` find the first length
    without key, then bisection narrows the boundary to ``tolerance_km`` (the returned length
    has a positive rate). Returns None if there is no key even at 0 km and ``math.inf`` if
    there is still key at ``limit_km`` (e.g. a lossless fibre). Assumes the rate decreases
    with length, as it does for every model here.
    """
    if not rate_at(0.0) > 0:
        return None
    lo, hi = 0.0, step_km
    while rate_at(hi) > 0:
        lo, hi = hi, hi + step_km
        if hi > limit_km:
            return math.inf
    while hi - lo > tolerance_km:
        mid = 0.5 * (lo + hi)
        if rate_at(mid) > 0:
            lo = mid
        else:
            hi = mid
    return lo
