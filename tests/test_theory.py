"""Closed forms and published asymptotic results: entropy, PLOB, device expectations, Ma et al. 2005."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq

from qkdstack.errors import ConfigError
from qkdstack.physics.params import ChannelParams, DeviceParams, ReceiverParams, SourceParams
from qkdstack.theory.asymptotic import (
    gllp_rate,
    infinite_decoy_rate,
    ma2005_error_gain,
    ma2005_gain,
    optimize_mu,
    sifting_factor,
    vacuum_weak_bounds,
    vacuum_weak_rate,
)
from qkdstack.theory.device import (
    expected_detection_prob,
    expected_qber,
    expected_sifted_counts,
    pulses_for_key_block,
)
from qkdstack.theory.entropy import binary_entropy
from qkdstack.theory.keyrate import expected_key_rate, max_distance_km
from qkdstack.theory.plob import plob_bound

# Ma, Qi, Zhao, Lo, PRA 72, 012326 (2005), Table I, GYS (Gobby, Yuan, Shields 2004) parameters.
GYS = {"eta_bob": 0.045, "y0": 1.7e-6, "e_d": 0.033, "alpha": 0.21, "f": 1.22}


def gys_eta(length_km: float) -> float:
    return GYS["eta_bob"] * 10 ** (-GYS["alpha"] * length_km / 10)


# ----------------------------------------------------------------------------------- entropy


def test_binary_entropy_end_points_and_centre() -> None:
    assert binary_entropy(0.0) == 0.0
    assert binary_entropy(1.0) == 0.0
    assert binary_entropy(0.5) == pytest.approx(1.0, abs=1e-15)
    assert binary_entropy(0.11) == pytest.approx(-0.11 * math.log2(0.11) - 0.89 * math.log2(0.89))


def test_binary_entropy_vectorised() -> None:
    p = np.array([[0.0, 0.1], [0.5, 1.0]])
    h = binary_entropy(p)
    assert isinstance(h, np.ndarray) and h.shape == (2, 2)
    assert h[0, 0] == 0 and h[1, 1] == 0 and h[1, 0] == pytest.approx(1.0)
    assert h[0, 1] == pytest.approx(binary_entropy(0.1))


@given(st.floats(0.0, 1.0))
def test_binary_entropy_symmetric_and_bounded(p: float) -> None:
    h = binary_entropy(p)
    assert 0.0 <= h <= 1.0
    assert h == pytest.approx(binary_entropy(1.0 - p), abs=1e-12)


def test_bb84_threshold_one_minus_two_h_near_11_percent() -> None:
    """Shor-Preskill: 1 − 2h(Q) = 0 at Q = 11.0028 %."""
    root = brentq(lambda q: 1 - 2 * binary_entropy(q), 0.05, 0.2, xtol=1e-12)
    assert root == pytest.approx(0.110028, abs=1e-6)


# ----------------------------------------------------------------------------------- PLOB


def test_plob_closed_forms() -> None:
    assert plob_bound(0.5) == pytest.approx(1.0)
    assert plob_bound(0.75) == pytest.approx(2.0)
    assert plob_bound(1 - 2**-10) == pytest.approx(10.0)
    assert plob_bound(0.0) == 0.0
    assert plob_bound(1.0) == math.inf
    # 100 km of 0.2 dB/km fibre: η = 0.01, bound ≈ 1.44 η (Pirandola et al. 2017).
    assert plob_bound(0.01) == pytest.approx(-math.log2(0.99))
    assert plob_bound(1e-6) == pytest.approx(1e-6 / math.log(2), rel=1e-5)
    np.testing.assert_allclose(plob_bound(np.array([0.5, 0.75])), [1.0, 2.0])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_plob_rejects_bad_eta(bad: float) -> None:
    with pytest.raises(ConfigError):
        plob_bound(bad)


# ----------------------------------------------------------------------------------- device model


def _device(length_km: float = 50.0, afterpulse: float = 0.0, p_z: float = 0.9) -> DeviceParams:
    return DeviceParams(
        source=SourceParams(intensities=(0.5, 0.1, 0.0), intensity_probs=(0.8, 0.1, 0.1), p_z=p_z),
        channel=ChannelParams(length_km=length_km, attenuation_db_per_km=0.2, misalignment=0.01),
        receiver=ReceiverParams(p_z=p_z, efficiency=0.1, dark_count=1e-6, afterpulse=afterpulse),
    )


def test_expected_detection_and_qber_follow_lim2014_model() -> None:
    p = _device(afterpulse=0.04)
    eta = 10 ** (-1.0) * 0.1
    for k, mu in enumerate((0.5, 0.1, 0.0)):
        d = 1 - (1 - 1e-6) * math.exp(-eta * mu)
        assert expected_detection_prob(p, k) == pytest.approx(d * 1.04, rel=1e-12)
        e = 0.5e-6 + 0.01 * (1 - math.exp(-eta * mu)) + 0.04 * d / 2
        assert expected_qber(p, k) == pytest.approx(e / (d * 1.04), rel=1e-12)
    # Without after-pulses the vacuum decoy only sees dark counts: QBER 1/2, gain Y0.
    q = _device()
    assert expected_qber(q, 2) == pytest.approx(0.5)
    assert expected_detection_prob(q, 2) == pytest.approx(1e-6)
    # With p_ap = 0 the gain is Ma 2005's Eq. (10) to first order in Y0.
    assert expected_detection_prob(q, 0) == pytest.approx(ma2005_gain(q.eta_sys, 0.5, 1e-6), rel=1e-6)
    with pytest.raises(ConfigError):
        expected_detection_prob(q, 3)


def test_expected_sifted_counts_factorise() -> None:
    p = _device(p_z=0.8)
    c = expected_sifted_counts(p, 1e9)
    for k, pk in enumerate((0.8, 0.1, 0.1)):
        r = expected_detection_prob(p, k)
        assert c.key_counts[k] == pytest.approx(1e9 * pk * 0.64 * r)
        assert c.test_counts[k] == pytest.approx(1e9 * pk * 0.04 * r)
        assert c.test_errors[k] == pytest.approx(c.test_counts[k] * expected_qber(p, k))
    assert pulses_for_key_block(p, c.key_total) == pytest.approx(1e9)
    assert 0 < c.key_qber < 0.5


# ----------------------------------------------------------------------------------- Ma et al. 2005


def test_sifting_factor() -> None:
    assert sifting_factor(0.5) == 0.5  # symmetric BB84, Ma 2005's q
    assert sifting_factor(0.9) == pytest.approx(0.81)  # efficient BB84, key from Z only
    assert sifting_factor(0.9, 0.8) == pytest.approx(0.72)
    with pytest.raises(ConfigError):
        sifting_factor(1.0)


def test_gllp_single_photon_limit() -> None:
    """No dark counts, no misalignment: R = q Q1 − 0 with Q1 = η μ e^−μ."""
    eta, mu = 0.01, 0.5
    r = infinite_decoy_rate(eta, mu, y0=0.0, e_d=0.0, f_ec=1.22, q=0.5)
    assert r.qber == 0 and r.e1 == 0
    assert r.rate_per_pulse == pytest.approx(0.5 * eta * mu * math.exp(-mu))
    assert gllp_rate(0.5, 0.1, 0.5, 0.05, 0.5, 1.0) < 0


def test_ma2005_gys_optimal_mu_and_max_distance() -> None:
    """Ma 2005, GYS parameters: optimal μ ≈ 0.48, infinite-decoy maximal distance ≈ 142 km."""

    def best(length: float):
        return optimize_mu(lambda m: infinite_decoy_rate(gys_eta(length), m, GYS["y0"], GYS["e_d"], GYS["f"], 0.5))

    for length in (0.0, 50.0, 100.0):
        assert best(length).mu == pytest.approx(0.48, abs=0.015)
    d_max = max_distance_km(lambda L: best(L).rate_per_pulse, tolerance_km=0.05)
    assert d_max == pytest.approx(142.0, abs=1.0)


def test_ma2005_vacuum_weak_approaches_infinite_decoys() -> None:
    """Vacuum + weak decoy (ν small) asymptotically approaches the infinite-decoy limit (Ma 2005, Sec. IV.B)."""
    y0, e_d, f = GYS["y0"], GYS["e_d"], GYS["f"]

    def inf_rate(L: float) -> float:
        return optimize_mu(lambda m: infinite_decoy_rate(gys_eta(L), m, y0, e_d, f, 0.5)).rate_per_pulse

    def vw_rate(L: float, nu: float = 0.05) -> float:
        return optimize_mu(lambda m: vacuum_weak_rate(gys_eta(L), m, nu, y0, e_d, f, 0.5), low=0.06).rate_per_pulse

    for L in (20.0, 80.0):
        assert 0.9 * inf_rate(L) <= vw_rate(L) <= inf_rate(L)
    d_inf = max_distance_km(inf_rate, tolerance_km=0.1)
    d_vw = max_distance_km(vw_rate, tolerance_km=0.1)
    assert d_inf - 3.0 < d_vw < d_inf
    # A tiny weak decoy converges further.
    assert vw_rate(100.0, nu=0.005) == pytest.approx(inf_rate(100.0), rel=0.03)


@settings(max_examples=60, deadline=None)
@given(
    eta=st.floats(1e-5, 0.5),
    mu=st.floats(0.2, 0.9),
    nu_frac=st.floats(0.02, 0.6),
    y0=st.floats(0.0, 1e-4),
    e_d=st.floats(0.0, 0.1),
)
def test_vacuum_weak_bounds_are_valid(eta: float, mu: float, nu_frac: float, y0: float, e_d: float) -> None:
    """Eqs. (34)/(37) bound the model's true Y1 = Y0 + η from below and e1 from above."""
    nu = mu * nu_frac
    q_mu, q_nu = ma2005_gain(eta, mu, y0), ma2005_gain(eta, nu, y0)
    e_nu = ma2005_error_gain(eta, nu, y0, e_d) / q_nu
    y1_l, e1_u = vacuum_weak_bounds(mu, nu, q_mu, q_nu, e_nu, y0)
    y1 = y0 + eta
    assert y1_l <= y1 * (1 + 1e-9)
    if y1_l > 0:
        assert e1_u >= min((0.5 * y0 + e_d * eta) / y1, 0.5) - 1e-9


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eta": 1.5, "mu": 0.5, "y0": 1e-6, "e_d": 0.01, "f_ec": 1.2},
        {"eta": 0.1, "mu": -0.5, "y0": 1e-6, "e_d": 0.01, "f_ec": 1.2},
        {"eta": 0.1, "mu": 0.5, "y0": 1e-6, "e_d": 0.7, "f_ec": 1.2},
        {"eta": 0.1, "mu": 0.5, "y0": 1e-6, "e_d": 0.01, "f_ec": 0.9},
    ],
)
def test_asymptotic_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        infinite_decoy_rate(**kwargs)


def test_vacuum_weak_needs_ordered_decoys() -> None:
    with pytest.raises(ConfigError):
        vacuum_weak_bounds(0.1, 0.2, 1e-3, 1e-3, 0.01, 1e-6)
    with pytest.raises(ConfigError, match="vacuum"):
        expected_key_rate(
            DeviceParams(source=SourceParams(intensities=(0.5, 0.1), intensity_probs=(0.9, 0.1))), "vacuum-weak"
        )
    with pytest.raises(ConfigError):
        expected_key_rate(_device(), "nonsense")
