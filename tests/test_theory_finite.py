"""Lim, Curty, Walenta, Xu, Zbinden, PRA 89, 022307 (2014): bounds, secret length, expected rates."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdstack.errors import ConfigError
from qkdstack.physics.params import ChannelParams, DeviceParams, ReceiverParams, SourceParams
from qkdstack.theory.device import expected_sifted_counts
from qkdstack.theory.entropy import binary_entropy
from qkdstack.theory.finite import DecoyCounts, gamma, lim2014_bounds, lim2014_secret_length, tau
from qkdstack.theory.keyrate import (
    expected_key_rate,
    lim2014_expected_counts,
    lim2014_expected_rate,
    max_distance_km,
    optimize_lim2014,
)


def lim_device(length_km: float, afterpulse: float = 0.04, dark: float = 1.2e-6) -> DeviceParams:
    """Lim 2014 Sec. IV: η_Bob = 10 %, p_dc = 6e-7 per detector (Y0 ≈ 2 p_dc), p_ap = 4 %,
    e_mis = 0.5 %, 0.2 dB/km, μ3 = 2e-4; the other protocol parameters are starting values."""
    return DeviceParams(
        source=SourceParams(intensities=(0.5, 0.1, 2e-4), intensity_probs=(0.7, 0.2, 0.1), p_z=0.8),
        channel=ChannelParams(length_km=length_km, attenuation_db_per_km=0.2, misalignment=5e-3),
        receiver=ReceiverParams(p_z=0.8, efficiency=0.1, dark_count=dark, afterpulse=afterpulse),
    )


def _measured_like(length_km: float, block: float) -> DecoyCounts:
    """Expected counts of the Lim 2014 device rounded to integers, as a round would measure them."""
    base = lim_device(length_km)
    device = replace(
        base,
        source=SourceParams(intensities=(0.45, 0.2, 2e-4), intensity_probs=(0.5, 0.3, 0.2), p_z=0.7),
        receiver=replace(base.receiver, p_z=0.7),
    )
    c, _, _ = lim2014_expected_counts(device, block)
    return DecoyCounts(
        c.intensities,
        c.probabilities,
        tuple(round(n) for n in c.key_counts),
        tuple(round(n) for n in c.test_counts),
        tuple(round(n) for n in c.test_errors),
    )


COUNTS = _measured_like(25.0, 1e7)


def test_bounds_match_the_equations_by_hand() -> None:
    """Eqs. (2)–(5) evaluated term by term, independently of the module's helpers."""
    eps = 1e-10
    mu, p = COUNTS.intensities, COUNTS.probabilities
    t0 = sum(pk * math.exp(-m) for m, pk in zip(mu, p, strict=True))
    t1 = sum(pk * math.exp(-m) * m for m, pk in zip(mu, p, strict=True))
    assert tau(mu, p, 0) == pytest.approx(t0) and tau(mu, p, 1) == pytest.approx(t1)
    ln = math.log(21 / eps)

    def pm(ns: tuple[float, ...], total: float, sign: int) -> list[float]:
        d = math.sqrt(total / 2 * ln)
        return [math.exp(m) / pk * (n + sign * d) for n, m, pk in zip(ns, mu, p, strict=True)]

    def s0_s1(ns: tuple[float, ...]) -> tuple[float, float]:
        lo, hi = pm(ns, sum(ns), -1), pm(ns, sum(ns), +1)
        s0 = max(t0 * (mu[1] * lo[2] - mu[2] * hi[1]) / (mu[1] - mu[2]), 0)
        s1 = (
            t1
            * mu[0]
            * (lo[1] - hi[2] - (mu[1] ** 2 - mu[2] ** 2) / mu[0] ** 2 * (hi[0] - s0 / t0))
            / (mu[0] * (mu[1] - mu[2]) - mu[1] ** 2 + mu[2] ** 2)
        )
        return s0, s1

    s0k, s1k = s0_s1(COUNTS.key_counts)
    _, s1t = s0_s1(COUNTS.test_counts)
    m_hi, m_lo = (
        pm(COUNTS.test_errors, sum(COUNTS.test_errors), +1),
        pm(COUNTS.test_errors, sum(COUNTS.test_errors), -1),
    )
    v = t1 * (m_hi[1] - m_lo[2]) / (mu[1] - mu[2])
    b = v / s1t
    g = math.sqrt(
        (s1t + s1k)
        * (1 - b)
        * b
        / (s1t * s1k * math.log(2))
        * math.log2((s1t + s1k) / (s1t * s1k * (1 - b) * b) * 21**2 / eps**2)
    )
    bounds = lim2014_bounds(COUNTS, eps)
    assert bounds.s_key_0 == pytest.approx(s0k)
    assert bounds.s_key_1 == pytest.approx(s1k)
    assert bounds.s_test_1 == pytest.approx(s1t)
    assert bounds.v_test_1 == pytest.approx(v)
    assert bounds.gamma == pytest.approx(g)
    assert bounds.phase_error == pytest.approx(b + g)
    res = lim2014_secret_length(COUNTS, leakage_bits=50_000, eps_sec=eps, eps_cor=1e-15)
    expect = s0k + s1k - s1k * binary_entropy(b + g) - 50_000 - 6 * math.log2(21 / eps) - math.log2(2 / 1e-15)
    assert res.length == math.floor(expect) and res.length > 0
    assert res.reason is None
    json.dumps(res.to_dict(), allow_nan=False)


def test_asymptotic_bounds_are_valid_and_tight_for_the_model() -> None:
    """Without fluctuations, Eqs. (2)–(4) bound the model's true vacuum/single-photon counts (tight as μ3 → 0)."""
    p = DeviceParams(
        source=SourceParams(intensities=(0.5, 0.05, 0.0), intensity_probs=(0.6, 0.2, 0.2), p_z=0.7),
        channel=ChannelParams(length_km=50, attenuation_db_per_km=0.2, misalignment=0.01),
        receiver=ReceiverParams(p_z=0.7, efficiency=0.1, dark_count=1e-6),
    )
    counts, _, _ = lim2014_expected_counts(p, None)  # per pulse
    b = lim2014_bounds(counts, 1e-10, finite=False)
    eta, y0 = p.eta_sys, 1e-6
    # The model is Y_n = 1 − (1 − Y0)(1 − η)^n, single-photon error yield Y0/2 + e_mis η.
    t0, t1 = tau(counts.intensities, counts.probabilities, 0), tau(counts.intensities, counts.probabilities, 1)
    true_s0 = 0.49 * t0 * y0
    true_s1 = 0.49 * t1 * (1 - (1 - y0) * (1 - eta))
    true_v1 = 0.09 * t1 * (y0 / 2 + 0.01 * eta)
    assert b.s_key_0 <= true_s0 * (1 + 1e-9)
    assert b.s_key_0 == pytest.approx(true_s0, rel=1e-6)
    assert 0.95 * true_s1 <= b.s_key_1 <= true_s1
    assert b.v_test_1 >= true_v1 * (1 - 1e-9)
    assert b.gamma == 0 and b.delta_key == 0


def test_degenerate_counts_give_zero_never_nan() -> None:
    zero = DecoyCounts((0.5, 0.1, 0.0), (0.7, 0.2, 0.1), (0, 0, 0), (0, 0, 0), (0, 0, 0))
    res = lim2014_secret_length(zero, 0, 1e-10, 1e-15)
    assert res.length == 0 and res.reason == "no key-basis detections"
    assert not any(isinstance(v, float) and math.isnan(v) for v in res.bounds.to_dict().values())
    # No test-basis data at all: nothing certifies the phase error.
    no_test = DecoyCounts((0.5, 0.1, 0.0), (0.7, 0.2, 0.1), (6e5, 4e4, 40), (0, 0, 0), (0, 0, 0))
    res = lim2014_secret_length(no_test, 0, 1e-10, 1e-15)
    assert res.length == 0 and res.phase_error == 0.5
    # Half the test bits wrong: phase error ≥ 1/2, no key.
    noisy = DecoyCounts((0.5, 0.1, 0.0), (0.7, 0.2, 0.1), (6e5, 4e4, 40), (6e4, 4e3, 4), (3e4, 2e3, 2))
    res = lim2014_secret_length(noisy, 0, 1e-10, 1e-15)
    assert res.length == 0 and res.phase_error == 0.5
    # No test errors at all: b = 0, γ = 0 (the formula's limit), finite result.
    clean = DecoyCounts((0.5, 0.1, 0.0), (0.7, 0.2, 0.1), (6e5, 4e4, 40), (6e4, 4e3, 4), (0, 0, 0))
    res = lim2014_secret_length(clean, 0, 1e-10, 1e-15)
    assert res.length > 0 and res.phase_error == 0
    assert gamma(1e-10, 0.1, 0, 100) == math.inf


@settings(max_examples=80, deadline=None)
@given(
    key=st.tuples(*(st.floats(0, 1e9) for _ in range(3))),
    test=st.tuples(*(st.floats(0, 1e8) for _ in range(3))),
    err_frac=st.tuples(*(st.floats(0, 1) for _ in range(3))),
    leak=st.floats(0, 1e9),
    eps=st.floats(1e-300, 0.5),
)
def test_secret_length_never_nan_never_raises(key, test, err_frac, leak, eps) -> None:
    counts = DecoyCounts(
        (0.6, 0.2, 0.01), (0.5, 0.3, 0.2), key, test, tuple(t * f for t, f in zip(test, err_frac, strict=True))
    )
    res = lim2014_secret_length(counts, leak, eps, 1e-15)
    assert isinstance(res.length, int) and res.length >= 0
    assert not math.isnan(res.raw_length) and 0 <= res.phase_error <= 0.5
    json.dumps(res.to_dict(), allow_nan=False)


def test_leakage_is_subtracted_bit_for_bit() -> None:
    a = lim2014_secret_length(COUNTS, 10_000, 1e-10, 1e-15)
    b = lim2014_secret_length(COUNTS, 20_000, 1e-10, 1e-15)
    assert a.raw_length - b.raw_length == pytest.approx(10_000)
    tighter = lim2014_secret_length(COUNTS, 10_000, 1e-14, 1e-15)
    assert tighter.length < a.length


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("intensities", (0.1, 0.5, 0.0)),  # not descending
        ("intensities", (0.5, 0.3, 0.25)),  # μ1 ≤ μ2 + μ3
        ("intensities", (0.5, 0.1)),  # two intensities
        ("probabilities", (0.5, 0.3, 0.3)),  # sum ≠ 1
        ("probabilities", (0.9, 0.1, 0.0)),  # zero probability
        ("key_counts", (-1, 0, 0)),
        ("test_counts", (float("nan"), 0, 0)),
        ("test_errors", (70_000, 0, 0)),  # more errors than counts
    ],
)
def test_invalid_counts_rejected(field: str, value: tuple) -> None:
    kwargs = {
        "intensities": (0.5, 0.1, 0.0),
        "probabilities": (0.7, 0.2, 0.1),
        "key_counts": (1, 1, 1),  # valid but tiny
        "test_counts": (60_000, 1, 1),
        "test_errors": (0, 0, 0),
    }
    kwargs[field] = value
    with pytest.raises(ConfigError):
        DecoyCounts(**kwargs)


@pytest.mark.parametrize(
    ("leak", "eps_sec", "eps_cor"),
    [(-1, 1e-10, 1e-15), (0, 0, 1e-15), (0, 1e-10, 1.0), (float("inf"), 1e-10, 1e-15), (0, float("nan"), 1e-15)],
)
def test_invalid_parameters_rejected(leak: float, eps_sec: float, eps_cor: float) -> None:
    with pytest.raises(ConfigError):
        lim2014_secret_length(COUNTS, leak, eps_sec, eps_cor)


def test_length_grows_with_block_size_and_approaches_asymptotic_rate() -> None:
    p = lim_device(50.0)
    rates = [lim2014_expected_rate(p, n, 1.16).rate_per_pulse for n in (1e7, 1e8, 1e9, 1e10, 1e12)]
    lengths = [lim2014_expected_rate(p, n, 1.16).length for n in (1e7, 1e8, 1e9)]
    assert all(a < b for a, b in itertools.pairwise(rates))
    assert all(a < b for a, b in itertools.pairwise(lengths))
    asym = lim2014_expected_rate(p, None, 1.16).rate_per_pulse
    assert rates[-1] <= asym
    assert rates[-1] == pytest.approx(asym, rel=0.01)


def test_expected_counts_scale_to_the_block() -> None:
    p = lim_device(25.0)
    counts, pulses, e_obs = lim2014_expected_counts(p, 1e6)
    assert counts.n_key == pytest.approx(1e6)
    per_pulse = expected_sifted_counts(p, 1.0)
    assert pulses == pytest.approx(1e6 / per_pulse.key_total)
    assert e_obs == pytest.approx(per_pulse.key_qber)
    with pytest.raises(ConfigError):
        lim2014_expected_counts(p, -5)
    two = DeviceParams(source=SourceParams(intensities=(0.5, 0.1), intensity_probs=(0.9, 0.1)))
    with pytest.raises(ConfigError, match="three intensities"):
        expected_key_rate(two, "lim2014", block_size=1e6)


def test_lim2014_published_block_1e4_reaches_about_135_km() -> None:
    """Lim 2014, Sec. IV: "even if we use a block size of 10^4, ... a fiber length of up to 135 km"."""

    def rate(L: float) -> float:
        return optimize_lim2014(lim_device(L), 1e4, 1.16, 1e-10, 1e-15).rate_per_pulse

    d = max_distance_km(rate, tolerance_km=1.0, step_km=70.0)
    assert d is not None and 125.0 <= d <= 145.0


def test_lim2014_published_ratio_1e9_over_1e7_at_100_km() -> None:
    """Lim 2014, Sec. IV: at 100 km the rate with n_X = 10^9 is about 1.75 times that with 10^7."""
    r9 = optimize_lim2014(lim_device(100.0), 1e9, 1.16, 1e-10, 1e-15).rate_per_pulse
    r7 = optimize_lim2014(lim_device(100.0), 1e7, 1.16, 1e-10, 1e-15).rate_per_pulse
    assert 1.6 <= r9 / r7 <= 1.95


def test_optimisation_never_worse_than_given_configuration() -> None:
    p = lim_device(80.0)
    given = lim2014_expected_rate(p, 1e6, 1.16)
    opt = optimize_lim2014(p, 1e6, 1.16)
    assert opt.rate_per_pulse >= given.rate_per_pulse
    assert opt.params.source.intensities[2] == pytest.approx(2e-4)
    mu1, mu2, mu3 = opt.params.source.intensities
    assert mu1 > mu2 + mu3 and mu2 > mu3
    assert opt.to_dict()["secret_bits_per_block"] == opt.length


def test_docs_and_code_agree_that_the_verification_tag_counts_in_lambda() -> None:
    """Issue 10 item 9: the round counts the tag bits in λ *and* Eq. (1) keeps log2(2/ε_cor).

    The code's behaviour is checked in tests/test_leakage.py; here the two places that
    describe it to users must say the same (they used to say the tag must not be counted).
    """
    from pathlib import Path

    from qkdstack.theory import finite

    theory_md = (Path(__file__).resolve().parents[1] / "docs" / "theory.md").read_text()
    for doc in (finite.__doc__, finite.lim2014_secret_length.__doc__, theory_md):
        text = " ".join(doc.split())
        assert "counted twice" in text
        assert "not be counted" not in text and "do not count it twice" not in text
    res = lim2014_secret_length(COUNTS, leakage_bits=50_128, eps_sec=1e-10, eps_cor=1e-15)
    assert res.verification_bits == pytest.approx(math.log2(2 / 1e-15))  # the term is kept
