"""The simulated device against the Lim et al. 2014 model of qkdstack.theory.device, and its attacks.

Counts are compared with 5-sigma binomial bounds: a sound simulator fails one of these
checks with probability ~1e-6 each.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkdstack.errors import ConfigError
from qkdstack.physics.device import QKDDevice, SimulatedDevice
from qkdstack.physics.eve import BeamSplitting, InterceptResend, NoEve, PhotonNumberSplitting, parse_eve
from qkdstack.physics.optics import exact_class_statistics, pns_forwarding
from qkdstack.physics.params import ChannelParams, DeviceParams, ReceiverParams, SourceParams, X, Z
from qkdstack.theory.device import expected_detection_prob, expected_qber

SIGMAS = 5.0


def make_params(
    length_km: float = 25.0, *, dark: float = 1e-4, afterpulse: float = 0.0, dead_s: float = 0.0, p_z: float = 0.5
) -> DeviceParams:
    return DeviceParams(
        source=SourceParams(rep_rate_hz=1e9, intensities=(0.6, 0.2, 0.0), intensity_probs=(0.6, 0.2, 0.2), p_z=p_z),
        channel=ChannelParams(length_km=length_km, misalignment=0.02),
        receiver=ReceiverParams(p_z=p_z, efficiency=0.2, dark_count=dark, afterpulse=afterpulse, dead_time_s=dead_s),
    )


def sifted_stats(frame, params: DeviceParams, k: int, basis: int) -> tuple[int, int, float]:
    """(detections, errors, expected pulses) of class k sifted in ``basis``."""
    intensity, a_basis, a_bit = frame.alice.lookup(frame.bob.pulse_index)
    sel = (intensity == k) & (a_basis == basis) & (frame.bob.basis == basis)
    errors = int(np.count_nonzero(a_bit[sel] != frame.bob.bit[sel]))
    pa = params.source.p_z if basis == Z else 1 - params.source.p_z
    pb = params.receiver.p_z if basis == Z else 1 - params.receiver.p_z
    pulses = frame.alice.n_pulses * params.source.intensity_probs[k] * pa * pb
    return int(sel.sum()), errors, pulses


def assert_binomial(observed: int, trials: float, p: float, what: str) -> None:
    mean = trials * p
    sigma = math.sqrt(max(trials * p * (1 - p), 1.0))
    assert abs(observed - mean) <= SIGMAS * sigma, f"{what}: observed {observed}, expected {mean:.1f} ± {sigma:.1f}"


@pytest.mark.parametrize("length_km", [0.0, 25.0, 100.0])
def test_gains_and_qber_match_theory(length_km: float) -> None:
    params = make_params(length_km)
    n = 40_000_000
    frame = SimulatedDevice(params, seed=11).run_frame(n)
    for k in range(3):
        for basis in (Z, X):
            det, err, pulses = sifted_stats(frame, params, k, basis)
            assert_binomial(det, pulses, expected_detection_prob(params, k), f"gain k={k} basis={basis}")
            assert_binomial(err, det, expected_qber(params, k), f"QBER k={k} basis={basis}")


def test_exact_table_agrees_with_first_order_model() -> None:
    """The simulator's exact statistics differ from Lim 2014's model only at third order."""
    for length_km in (0.0, 50.0, 150.0):
        params = make_params(length_km)
        st = exact_class_statistics(params, NoEve())
        for k in range(3):
            r = expected_detection_prob(params, k)
            assert st["detect"][k, Z] == pytest.approx(r, rel=1e-9)
            assert st["error"][k, Z] / st["detect"][k, Z] == pytest.approx(expected_qber(params, k), rel=5e-3)


def test_afterpulses_same_class_match_theory() -> None:
    params = make_params(25.0, afterpulse=0.08)
    frame = SimulatedDevice(params, seed=5).run_frame(30_000_000)
    for k in range(3):
        det, err, pulses = sifted_stats(frame, params, k, Z)
        assert_binomial(det, pulses, expected_detection_prob(params, k), f"gain with after-pulses k={k}")
        if k < 2:
            assert_binomial(err, det, expected_qber(params, k), f"QBER with after-pulses k={k}")


def test_afterpulses_next_gate_keep_total_rate() -> None:
    """Physical placement spreads after-pulses over all classes; the class-averaged rate is unchanged."""
    params = make_params(25.0, afterpulse=0.08)
    n = 20_000_000
    frame = SimulatedDevice(params, seed=6, afterpulse_mode="next-gate").run_frame(n)
    mean_r = sum(p * expected_detection_prob(params, k) for k, p in enumerate(params.source.intensity_probs))
    assert_binomial(len(frame.bob), n, mean_r, "total detections")
    # The vacuum class now sees the after-pulses of the others: far above Y0 (1 + p_ap).
    det, _, pulses = sifted_stats(frame, params, 2, Z)
    assert det > 3 * pulses * expected_detection_prob(params, 2)


def test_dead_time_lowers_rate_as_non_paralysable_detectors() -> None:
    params = make_params(0.0, dark=0.0, dead_s=50e-9)  # 50 blind gates at 1 GHz
    n = 5_000_000
    frame = SimulatedDevice(params, seed=3).run_frame(n)
    free = SimulatedDevice(make_params(0.0, dark=0.0), seed=3).run_frame(n)
    assert len(frame.bob) < 0.9 * len(free.bob)
    # Two detectors with click rate r/2 each: registered rate ≈ r / (1 + r τ / 2) (Ma et al. style).
    r = len(free.bob) / n
    predicted = r / (1 + r * 50 / 2)
    assert len(frame.bob) / n == pytest.approx(predicted, rel=0.05)
    gaps = np.diff(frame.bob.pulse_index.astype(np.int64))
    same = frame.bob.bit[1:] == frame.bob.bit[:-1]
    # A detector that clicked is blind for 50 gates: equal-bit clicks closer than that come only from
    # double clicks (random bit), which are rare here.
    assert np.count_nonzero(same & (gaps <= 50)) < 0.01 * len(frame.bob)


def test_reproducible_with_seed() -> None:
    params = make_params(50.0, afterpulse=0.02, dead_s=10e-9)
    f1 = SimulatedDevice(params, seed=42).run_frame(3_000_000)
    f2 = SimulatedDevice(params, seed=42).run_frame(3_000_000)
    f3 = SimulatedDevice(params, seed=43).run_frame(3_000_000)
    for a, b in ((f1.bob.pulse_index, f2.bob.pulse_index), (f1.bob.bit, f2.bob.bit), (f1.alice.bit, f2.alice.bit)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(f1.ground_truth.photon_number, f2.ground_truth.photon_number)
    assert not np.array_equal(f1.bob.pulse_index, f3.bob.pulse_index)


def test_records_are_consistent() -> None:
    params = make_params(10.0, afterpulse=0.05, dead_s=20e-9)
    device = SimulatedDevice(params, seed=8)
    assert isinstance(device, QKDDevice)
    frame = device.run_frame(2_000_000)
    assert frame.bob.pulse_index.dtype == np.uint64
    np.testing.assert_array_equal(frame.alice.pulse_index, frame.bob.pulse_index)
    assert frame.ground_truth is not None and frame.ground_truth.eve_knows.size == len(frame.bob)
    assert not frame.ground_truth.eve_knows.any()
    assert int(frame.bob.pulse_index.max()) < 2_000_000
    for arr in (frame.alice.basis, frame.alice.bit, frame.bob.basis, frame.bob.bit):
        assert set(np.unique(arr)) <= {0, 1}


def test_intercept_resend_raises_qber_by_quarter_fraction() -> None:
    params = make_params(25.0, dark=1e-6)
    n = 20_000_000
    base = SimulatedDevice(params, seed=1).run_frame(n)
    for fraction in (0.2, 1.0):
        frame = SimulatedDevice(params, InterceptResend(fraction), seed=2).run_frame(n)
        d0, e0, _ = sifted_stats(base, params, 0, Z)
        d1, e1, _ = sifted_stats(frame, params, 0, Z)
        rise = e1 / d1 - e0 / d0
        # F/4 (1 − 2 e_mis) on the intercepted share (a few % fewer clicks on intercepted pulses)
        assert rise == pytest.approx(fraction / 4 * (1 - 2 * 0.02), abs=0.01)
        st = exact_class_statistics(params, InterceptResend(fraction))
        assert_binomial(e1, d1, st["error"][0, Z] / st["detect"][0, Z], "IR QBER vs exact table")
        # Eve knows the bit for the intercepted pulses where her basis matched: about F/2 of detections.
        knows = frame.ground_truth.eve_knows.mean()
        assert knows == pytest.approx(fraction / 2, abs=0.03)


def test_pns_keeps_signal_rate_and_learns_multiphoton_bits() -> None:
    params = make_params(50.0, dark=1e-6)
    eve = PhotonNumberSplitting()
    n = 30_000_000
    frame = SimulatedDevice(params, eve, seed=4).run_frame(n)
    det, err, pulses = sifted_stats(frame, params, 0, Z)
    assert_binomial(det, pulses, expected_detection_prob(params, 0), "PNS signal gain")
    assert_binomial(err, det, expected_qber(params, 0), "PNS signal QBER")  # no error increase
    intensity, _, _ = frame.alice.lookup(frame.bob.pulse_index)
    gt = frame.ground_truth
    np.testing.assert_array_equal(gt.eve_knows, gt.photon_number >= 2)
    assert gt.eve_knows[intensity == 0].mean() > 0.9  # single photons are (nearly all) blocked at 50 km
    # The decoy reveals her: its gain falls well below the model's.
    d1, _, p1 = sifted_stats(frame, params, 1, Z)
    assert d1 < 0.6 * p1 * expected_detection_prob(params, 1)
    s, t = pns_forwarding(params)
    assert s == 0.0 and 0 < t < 1


def test_beamsplit_keeps_rate_and_learns_tapped_bits() -> None:
    params = make_params(50.0, dark=1e-6)
    fraction = 0.9
    frame = SimulatedDevice(params, BeamSplitting(fraction), seed=9).run_frame(20_000_000)
    for k in range(2):
        det, err, pulses = sifted_stats(frame, params, k, Z)
        assert_binomial(det, pulses, expected_detection_prob(params, k), f"beamsplit gain k={k}")
        assert_binomial(err, det, expected_qber(params, k), f"beamsplit QBER k={k}")
    intensity, _, _ = frame.alice.lookup(frame.bob.pulse_index)
    knows = frame.ground_truth.eve_knows[intensity == 0].mean()
    # Bob's and Eve's parts of a coherent state are independent: P(Eve ≥ 1 photon) = 1 − exp(−F μ).
    assert knows == pytest.approx(1 - math.exp(-fraction * 0.6), abs=0.02)


def test_eve_parsing_and_validation() -> None:
    assert parse_eve("none") == NoEve()
    assert parse_eve("intercept-resend:0.25") == InterceptResend(0.25)
    assert parse_eve("PNS") == PhotonNumberSplitting()
    assert parse_eve("beamsplit:0.5") == BeamSplitting(0.5)
    for bad in ("intercept-resend", "intercept-resend:x", "intercept-resend:1.5", "beamsplit:1", "pns:3", "evil"):
        with pytest.raises(ConfigError, match="--eve"):
            parse_eve(bad)


def test_device_validation() -> None:
    device = SimulatedDevice(make_params(), seed=1)
    for bad in (0, -5, 1.5, True, 2**63):
        with pytest.raises(ConfigError, match="pulses"):
            device.run_frame(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="afterpulse_mode"):
        SimulatedDevice(make_params(), afterpulse_mode="sometimes")  # type: ignore[arg-type]


def test_huge_sparse_frame() -> None:
    """10^10 pulses at 100 km: only the detections are materialised."""
    params = DeviceParams(channel=ChannelParams(length_km=100.0))
    frame = SimulatedDevice(params, seed=1).run_frame(10**10)
    mean_r = sum(p * expected_detection_prob(params, k) for k, p in enumerate(params.source.intensity_probs))
    assert_binomial(len(frame.bob), 10**10, mean_r, "detections in 1e10 pulses")
    assert frame.alice.pulse_index.size == len(frame.bob)
