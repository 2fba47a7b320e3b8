import asyncio

import numpy as np
import pytest

from qkdstack.errors import PeerAbort, ProtocolAbort
from qkdstack.physics.records import AliceRecord, DetectionRecord
from qkdstack.protocol import sifting
from qkdstack.protocol.channel import channel_pair


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
