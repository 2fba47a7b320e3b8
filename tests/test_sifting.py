import asyncio

import numpy as np
import pytest

from qkdstack.bits import BitArray
from qkdstack.errors import ChannelError, PeerAbort, ProtocolAbort
from qkdstack.physics.records import AliceRecord, DetectionRecord
from qkdstack.protocol import sifting
from qkdstack.protocol.channel import channel_pair
from qkdstack.transport.varint import encode_increasing


def _records(n=20_000, detect=0.2, seed=3):
    rng = np.random.default_rng(seed)
    alice = AliceRecord(
        n_pulses=n,
        pulse_index=np.arange(n, dtype=np.uint64),
        intensity=rng.choice(3, n, p=[0.7, 0.2, 0.1]).astype(np.uint8),
        basis=(rng.random(n) < 0.2).astype(np.uint8),
        bit=rng.integers(0, 2, n, dtype=np.uint8),
    )
    idx = np.flatnonzero(rng.random(n) < detect).astype(np.uint64)
    bob_basis = (rng.random(idx.size) < 0.2).astype(np.uint8)
    bob_bit = alice.bit[idx].copy()
    flip = rng.random(idx.size) < 0.03
    bob_bit[flip] ^= 1
    mismatch = bob_basis != alice.basis[idx]
    bob_bit[mismatch] = rng.integers(0, 2, int(mismatch.sum()), dtype=np.uint8)
    return alice, DetectionRecord(n, idx, bob_basis, bob_bit)


async def test_sifting_agrees_on_positions_and_classes():
    alice_rec, bob_rec = _records()
    a_chan, b_chan = channel_pair()
    a, b = await asyncio.gather(sifting.alice(a_chan, alice_rec), sifting.bob(b_chan, bob_rec))
    idx = bob_rec.pulse_index
    match = alice_rec.basis[idx] == bob_rec.basis
    z = match & (bob_rec.basis == 0)
    assert a.key_bits.size == b.key_bits.size == int(z.sum())
    assert np.array_equal(a.key_intensity, b.key_intensity)
    assert np.array_equal(a.key_intensity, alice_rec.intensity[idx][z])
    assert np.array_equal(a.test_intensity, b.test_intensity)
    assert 0.01 < np.mean(a.key_bits != b.key_bits) < 0.05
    assert a_chan.stats.disclosed_bits("sifting") == 0
    # compact announcement: well under 8 bytes per detection
    assert b_chan.stats.wire_bytes("sifting") < 4 * len(bob_rec)


async def test_indices_beyond_frame_abort():
    alice_rec, _ = _records(n=1000)
    bad = DetectionRecord(2000, np.array([5, 1500], dtype=np.uint64), np.zeros(2, np.uint8), np.zeros(2, np.uint8))
    a_chan, b_chan = channel_pair(timeout=2)

    async def bob_then_abort_seen():
        with pytest.raises(PeerAbort):
            await sifting.bob(b_chan, bad)

    async def alice_aborts():
        with pytest.raises(ProtocolAbort, match="beyond the end"):
            await sifting.alice(a_chan, alice_rec)
        await a_chan.send_abort("sifting", "bad index", "x")

    await asyncio.gather(alice_aborts(), bob_then_abort_seen())


def _reference_sift(alice_rec, bob_rec):
    """The sifting rule written out with NumPy masks: (key bits, key classes, test bits, test classes) per party."""
    idx = bob_rec.pulse_index
    pos = np.searchsorted(alice_rec.pulse_index, idx)
    a_basis, a_bit, a_cls = alice_rec.basis[pos], alice_rec.bit[pos], alice_rec.intensity[pos]
    match = a_basis == bob_rec.basis
    z, x = match & (a_basis == 0), match & (a_basis == 1)
    return (a_bit[z], a_cls[z], a_bit[x], a_cls[x]), (bob_rec.bit[z], a_cls[z], bob_rec.bit[x], a_cls[x])


async def _sift(alice_rec, bob_rec):
    a_chan, b_chan = channel_pair()
    return await asyncio.gather(sifting.alice(a_chan, alice_rec), sifting.bob(b_chan, bob_rec))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 20_001])
async def test_sifting_matches_reference_superset_and_exact_records(n):
    """Alice's record a superset of Bob's clicks (galloping look-up) or exactly them (read in place)."""
    alice_rec, bob_rec = _records(n=n, detect=0.3, seed=n)
    exact = AliceRecord(
        alice_rec.n_pulses,
        bob_rec.pulse_index,
        *(c[bob_rec.pulse_index] for c in (alice_rec.intensity, alice_rec.basis, alice_rec.bit)),
    )
    want_a, want_b = _reference_sift(alice_rec, bob_rec)
    for record in (alice_rec, exact):
        a, b = await _sift(record, bob_rec)
        for got, want in ((a, want_a), (b, want_b)):
            fields = (got.key_bits, got.key_intensity, got.test_bits, got.test_intensity)
            for f, w in zip(fields, want, strict=True):
                assert f.dtype == np.uint8 and np.array_equal(f, w)
        assert a.detections == b.detections == len(bob_rec)


async def test_unrecorded_index_is_refused():
    alice_rec, _ = _records(n=1000)
    sparse = AliceRecord(
        1000,
        alice_rec.pulse_index[::2].copy(),
        alice_rec.intensity[::2].copy(),
        alice_rec.basis[::2].copy(),
        alice_rec.bit[::2].copy(),
    )
    bob_rec = DetectionRecord(
        1000, np.array([4, 10, 11], dtype=np.uint64), np.zeros(3, np.uint8), np.zeros(3, np.uint8)
    )
    a_chan, b_chan = channel_pair(timeout=2)
    with pytest.raises(ChannelError, match="did not send"):
        await asyncio.gather(sifting.alice(a_chan, sparse), sifting.bob(b_chan, bob_rec))


@pytest.mark.parametrize(
    "fields",
    [
        {"count": 3, "indices": encode_increasing(np.arange(3, dtype=np.uint64)), "bases": b"\x00"},
        {"count": 3, "indices": encode_increasing(np.arange(3, dtype=np.uint64)), "bases": BitArray.zeros(2)},
        {"count": 3, "indices": [0, 1, 2], "bases": BitArray.zeros(3)},
        {"count": -1, "indices": b"", "bases": BitArray.zeros(0)},
        {"count": None, "indices": b"", "bases": BitArray.zeros(0)},
        {"count": 1, "indices": b"\x80", "bases": BitArray.zeros(1)},
    ],
)
async def test_malformed_detection_announcement_aborts(fields):
    alice_rec, _ = _records(n=100)
    a_chan, b_chan = channel_pair(timeout=2)
    await b_chan.send("sifting.detections", **fields)
    with pytest.raises((ProtocolAbort, ChannelError)):  # both end the round with an abort
        await sifting.alice(a_chan, alice_rec)


@pytest.mark.parametrize("shift", [-1, 1])
async def test_wrong_number_of_intensity_classes_aborts(shift):
    alice_rec, bob_rec = _records(n=2000)
    a_chan, b_chan = channel_pair(timeout=2)

    async def lying_alice():
        msg = await a_chan.recv(expect="sifting.detections")
        _, basis, _ = alice_rec.lookup(bob_rec.pulse_index)
        await a_chan.send("sifting.bases", bases=BitArray.from_bits(basis))
        n_match = int(np.count_nonzero(basis == msg["bases"].to_bits()))
        await a_chan.send(
            "sifting.intensities", low=BitArray.zeros(n_match + shift), high=BitArray.zeros(n_match + shift)
        )

    with pytest.raises(ProtocolAbort, match="intensity classes"):
        await asyncio.gather(lying_alice(), sifting.bob(b_chan, bob_rec))


def test_lookup_sparse_superset_unsorted_and_missing():
    rng = np.random.default_rng(9)
    recorded = np.unique(rng.integers(0, 10**9, 50_000)).astype(np.uint64)
    m = recorded.size
    rec = AliceRecord(
        10**9,
        recorded,
        rng.integers(0, 3, m, dtype=np.uint8),
        rng.integers(0, 2, m, dtype=np.uint8),
        rng.integers(0, 2, m, dtype=np.uint8),
    )
    for take in (np.sort(rng.choice(m, 40, replace=False)), np.arange(m), rng.choice(m, 300, replace=False)):
        got = rec.lookup(recorded[take])  # sparse, dense and unsorted (general path) look-ups
        for col, want in zip(got, (rec.intensity, rec.basis, rec.bit), strict=True):
            assert np.array_equal(col, want[take])
    missing = recorded[:3].copy()
    missing[1] = missing[0] + 1 if missing[0] + 1 != recorded[1] else missing[1] - 1
    with pytest.raises(ChannelError):
        rec.lookup(missing)
    with pytest.raises(ChannelError):
        rec.lookup(np.array([recorded[-1] + 1], dtype=np.uint64))
    assert all(c.size == 0 for c in rec.lookup(np.zeros(0, dtype=np.uint64)))
