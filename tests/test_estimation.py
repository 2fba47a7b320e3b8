"""Parameter estimation: per-intensity error counts and the checks on the peer's messages."""

import asyncio

import numpy as np
import pytest

from qkdstack.bits import BitArray
from qkdstack.errors import ProtocolAbort
from qkdstack.protocol import estimation
from qkdstack.protocol.channel import channel_pair
from qkdstack.protocol.estimation import EstimationPolicy
from qkdstack.protocol.sifting import SiftedKey

POLICY = EstimationPolicy(intensities=(0.5, 0.25, 0.0), intensity_probs=(0.4, 0.4, 0.2), min_key_bits=10)


def _sifted(n_key=400_000, n_test=100_000, qber=0.02, seed=1):
    rng = np.random.default_rng(seed)
    gains = np.array([0.4 * 0.0488, 0.4 * 0.0247, 0.2 * 2e-4])  # p_k * Q_k near 25 km
    cls_p = gains / gains.sum()
    key_cls = rng.choice(3, n_key, p=cls_p).astype(np.uint8)
    test_cls = rng.choice(3, n_test, p=cls_p).astype(np.uint8)
    key, test = rng.integers(0, 2, n_key, dtype=np.uint8), rng.integers(0, 2, n_test, dtype=np.uint8)
    # misalignment errors on signal and decoy pulses, coin flips on vacuum (dark counts)
    flip = rng.random(n_test) < np.where(test_cls < 2, qber, 0.5)
    alice = SiftedKey(key, key_cls, test, test_cls, n_key + n_test)
    bob = SiftedKey(key.copy(), key_cls, test ^ flip.astype(np.uint8), test_cls, n_key + n_test)
    return alice, bob, flip


async def test_error_counts_per_intensity_match_bincount():
    alice, bob, flip = _sifted()
    a_chan, b_chan = channel_pair()
    ea, eb = await asyncio.gather(estimation.alice(a_chan, alice, POLICY), estimation.bob(b_chan, bob, POLICY))
    want_errors = np.bincount(alice.test_intensity[flip], minlength=3)
    assert ea.counts.test_errors == eb.counts.test_errors == tuple(int(e) for e in want_errors)
    assert ea.counts.key_counts == tuple(int(c) for c in np.bincount(alice.key_intensity, minlength=3))
    assert ea.counts.test_counts == tuple(int(c) for c in np.bincount(alice.test_intensity, minlength=3))
    assert ea.qber_test == eb.qber_test == pytest.approx(flip.sum() / flip.size)


@pytest.mark.parametrize("bits", [b"\x00", BitArray.zeros(5), [0, 1]])
async def test_malformed_test_bits_abort(bits):
    alice, _, _ = _sifted(n_key=1000, n_test=100)
    a_chan, b_chan = channel_pair(timeout=2)
    await b_chan.send("estimation.test_bits", bits=bits)
    with pytest.raises(ProtocolAbort, match="test-basis bits"):
        await estimation.alice(a_chan, alice, POLICY)


@pytest.mark.parametrize("errors", ["3", [1, 2], [1, 2, -1], [1.0, 2, 0], [True, 0, 0], None, [0, 0, 10**6]])
async def test_malformed_error_counts_abort(errors):
    _, bob, _ = _sifted(n_key=1000, n_test=100)
    a_chan, b_chan = channel_pair(timeout=2)

    async def lying_alice():
        await a_chan.recv(expect="estimation.test_bits")
        await a_chan.send("estimation.test_errors", errors=errors)

    with pytest.raises(ProtocolAbort, match=r"error counts|more test-basis errors"):
        await asyncio.gather(lying_alice(), estimation.bob(b_chan, bob, POLICY))
