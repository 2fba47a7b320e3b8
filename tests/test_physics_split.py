"""The two-process form of the device (transmitter | light | receiver) against the combined fast path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkdstack.errors import ChannelError
from qkdstack.physics.device import QKDDevice, SimulatedDevice
from qkdstack.physics.eve import BeamSplitting, Eavesdropper, InterceptResend, NoEve, PhotonNumberSplitting
from qkdstack.physics.params import ChannelParams, DeviceParams, ReceiverParams, SourceParams, Z
from qkdstack.physics.split import Light, SplitDevice, Transmitter
from qkdstack.theory.device import expected_detection_prob, expected_qber


def params(afterpulse: float = 0.0, dead_s: float = 0.0, length_km: float = 20.0) -> DeviceParams:
    return DeviceParams(
        source=SourceParams(intensities=(0.6, 0.2, 0.0), intensity_probs=(0.6, 0.2, 0.2), p_z=0.7),
        channel=ChannelParams(length_km=length_km, misalignment=0.03),
        receiver=ReceiverParams(p_z=0.6, efficiency=0.2, dark_count=2e-4, afterpulse=afterpulse, dead_time_s=dead_s),
    )


def class_counts(frame, p: DeviceParams) -> tuple[np.ndarray, np.ndarray]:
    """Detections and errors per (class, sifted basis)."""
    k, a, bit = frame.alice.lookup(frame.bob.pulse_index)
    det = np.zeros((p.source.n_intensities, 2))
    err = np.zeros_like(det)
    sift = a == frame.bob.basis
    np.add.at(det, (k[sift], a[sift]), 1)
    np.add.at(err, (k[sift], a[sift]), (bit != frame.bob.bit)[sift])
    return det, err


def two_sample_ok(x1: float, n1: float, x2: float, n2: float, sigmas: float = 5.0) -> bool:
    """Two binomial proportions x/n agree within ``sigmas`` standard errors of their difference."""
    if n1 == 0 or n2 == 0:
        return True
    p = (x1 + x2) / (n1 + n2)
    se = math.sqrt(max(p * (1 - p) * (1 / n1 + 1 / n2), 1e-30))
    return abs(x1 / n1 - x2 / n2) <= sigmas * se + 1e-12


@pytest.mark.parametrize(
    ("eve", "afterpulse", "dead_s"),
    [
        (NoEve(), 0.0, 0.0),
        (NoEve(), 0.06, 30e-9),
        (InterceptResend(0.5), 0.0, 0.0),
        (PhotonNumberSplitting(), 0.0, 0.0),
        (BeamSplitting(0.3), 0.02, 10e-9),
    ],
)
def test_split_matches_combined(eve: Eavesdropper, afterpulse: float, dead_s: float) -> None:
    p = params(afterpulse, dead_s)
    n = 3_000_000
    split = SplitDevice(p, eve, seed=1).run_frame(n)
    combined = SimulatedDevice(p, eve, seed=2, afterpulse_mode="next-gate").run_frame(n)
    assert two_sample_ok(len(split.bob), n, len(combined.bob), n), (len(split.bob), len(combined.bob))
    d1, e1 = class_counts(split, p)
    d2, e2 = class_counts(combined, p)
    for k in range(3):
        for b in (0, 1):
            assert two_sample_ok(d1[k, b], n, d2[k, b], n), (k, b, d1[k, b], d2[k, b])
            if k < 2:
                assert two_sample_ok(e1[k, b], d1[k, b], e2[k, b], d2[k, b]), (k, b, e1[k, b], e2[k, b])
    knows1 = split.ground_truth.eve_knows.mean()
    knows2 = combined.ground_truth.eve_knows.mean()
    assert two_sample_ok(knows1 * len(split.bob), len(split.bob), knows2 * len(combined.bob), len(combined.bob))


def test_split_matches_theory() -> None:
    p = params()
    n = 4_000_000
    frame = SplitDevice(p, seed=7).run_frame(n)
    assert isinstance(SplitDevice(p), QKDDevice)
    det, err = class_counts(frame, p)
    for k in range(3):
        trials = n * p.source.intensity_probs[k] * p.source.p_z * p.receiver.p_z
        r = expected_detection_prob(p, k)
        assert abs(det[k, Z] - trials * r) <= 5 * math.sqrt(trials * r) + 1
        q = expected_qber(p, k)
        assert abs(err[k, Z] - det[k, Z] * q) <= 5 * math.sqrt(det[k, Z] * q * (1 - q)) + 1


def test_light_carries_no_classical_record() -> None:
    tx = Transmitter(params(), seed=3)
    light = tx.emit(1_000_000)
    assert isinstance(light, Light)
    assert set(vars(light)) == {"n_pulses", "pulse_index", "photons", "basis", "bit"}
    assert light.photons.min() >= 1
    # Alice's record is completed on demand for announced indices without light (dark counts).
    dark_only = np.setdiff1d(np.arange(0, 1_000_000, 9973, dtype=np.uint64), light.pulse_index)
    record = tx.alice_record(dark_only)
    k, _, bit = record.lookup(dark_only)
    assert k.size == dark_only.size
    # Asking again returns the same settings (materialised once).
    np.testing.assert_array_equal(tx.alice_record(dark_only).lookup(dark_only)[2], bit)
    with pytest.raises(ChannelError):
        tx.alice_record(np.array([1_000_000], dtype=np.uint64))


def test_light_and_record_cost_scale_with_detections() -> None:
    """The light that crosses holds about one pulse per detection (η_Bob is applied before it crosses)."""
    p = params(length_km=10.0)
    device = SplitDevice(p, seed=11)
    n = 2_000_000
    light = device.transmitter.emit(n)
    bob = device.receiver.detect(light)
    expected = n * p.eta_sys * np.dot(p.source.intensities, p.source.intensity_probs)
    assert len(light) < 1.1 * expected + 100, (len(light), expected)  # not η_Bob⁻¹ = 5 times more
    assert len(light) <= len(bob) + 100


def test_transmitter_record_survives_next_frame_and_any_order() -> None:
    """A record handed to sifting answers for its own frame even after the transmitter emitted the next one."""
    from qkdstack.node.quantum import TransmitterRecord

    p = params()
    tx = Transmitter(p, seed=5)
    light = tx.emit(1_000_000)
    record = TransmitterRecord(tx, 1_000_000)
    wanted = np.union1d(light.pulse_index[::7], np.arange(0, 1_000_000, 9973, dtype=np.uint64))
    first = record.lookup(wanted)
    tx.emit(1_000_000)
    again = record.lookup(wanted)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # Unsorted and repeated indices give the same settings as the sorted look-up.
    perm = np.random.default_rng(0).permutation(np.concatenate([wanted, wanted[:50]]))
    shuffled = record.lookup(perm)
    pos = np.searchsorted(wanted, perm)
    for a, b in zip(first, shuffled, strict=True):
        np.testing.assert_array_equal(a[pos], b)
    with pytest.raises(ChannelError):
        record.lookup(np.array([5, 1_000_000], dtype=np.uint64))
