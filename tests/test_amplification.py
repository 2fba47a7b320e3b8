import asyncio

import numpy as np
import pytest

from qkdstack.bits import BitArray
from qkdstack.errors import ProtocolAbort
from qkdstack.protocol import amplification, public_random
from qkdstack.protocol.channel import channel_pair
from qkdstack.protocol.toeplitz import toeplitz_hash_naive


def _key(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n, dtype=np.uint8)


async def _run(key_a, key_b, m_a, m_b=None):
    a, b = channel_pair(timeout=10)
    seeds: list[bytes] = []
    a.add_observer(lambda d, f: seeds.append(f))
    res = await asyncio.gather(
        amplification.alice(a, key_a, m_a),
        amplification.bob(b, key_b, m_a if m_b is None else m_b),
        return_exceptions=True,
    )
    return res, seeds


@pytest.mark.parametrize("n,m", [(1, 1), (100, 1), (100, 100), (1000, 333), (100_001, 50_000)])
async def test_both_ends_get_the_same_key(n, m):
    key = _key(n, n)
    (ra, rb), _ = await _run(key, key.copy(), m)
    assert isinstance(ra.key, BitArray) and len(ra.key) == m
    assert ra.key == rb.key
    assert ra.seed_bits == rb.seed_bits == n - 1


async def test_output_is_the_toeplitz_hash_of_the_sent_seed():
    key = _key(300, 3)
    a, b = channel_pair(timeout=10)
    ra = await amplification.alice(a, key, 120)
    msg = await b.recv(expect="amplification.seed")
    assert np.array_equal(ra.key.to_bits(), toeplitz_hash_naive(key, msg["seed"].to_bits(), 120))


async def test_seed_is_fresh_each_call_and_not_reproducible_from_numpy_seeding():
    key = _key(4096, 4)
    keys = set()
    for _ in range(4):
        np.random.seed(0)  # a seeded global RNG must not make the seed repeat
        (ra, _), frames = await _run(key, key, 2048)
        keys.add(frames[0])
        keys.add(ra.key.to_bytes())
    assert len(keys) == 8


@pytest.mark.parametrize("m", [0, -5, 101])
async def test_bad_output_length_rejected(m):
    a, _ = channel_pair(timeout=1)
    with pytest.raises(ProtocolAbort, match="output length") as info:
        await amplification.alice(a, _key(100), m)
    assert info.value.stage == "amplification"


async def test_length_disagreement_aborts_bob():
    (_, rb), _ = await _run(_key(100), _key(100), 50, 49)
    assert isinstance(rb, ProtocolAbort) and rb.stage == "amplification"


def test_repr_hides_key_bits():
    key = BitArray.from_bits([1, 0, 1, 1, 0, 0, 1, 0, 1])
    text = repr(amplification.AmplificationResult(key, 17))
    assert "9 bits" in text and "seed_bits=17" in text and "\\x" not in text and "b'" not in text


async def test_seed_is_drawn_from_secrets(monkeypatch):
    """The seed Alice sends is exactly what the OS CSPRNG (secrets.token_bytes) returned."""
    import secrets

    drawn: list[bytes] = []
    real = secrets.token_bytes

    def recording(nbytes):
        drawn.append(real(nbytes))
        return drawn[-1]

    monkeypatch.setattr(public_random.secrets, "token_bytes", recording)  # the OS CSPRNG by default
    a, b = channel_pair(timeout=10)
    await amplification.alice(a, _key(1000), 500)
    msg = await b.recv(expect="amplification.seed")
    assert len(drawn) == 1 and len(msg["seed"]) == 999
    assert msg["seed"] == BitArray.from_bytes(drawn[0], 999)


async def test_inexact_fft_aborts_the_stage(monkeypatch):
    import scipy.fft

    from qkdstack.protocol import toeplitz

    monkeypatch.setattr(toeplitz, "DEFAULT_METHOD", "fft")
    real_ifft = scipy.fft.ifft
    monkeypatch.setattr(
        scipy.fft, "ifft", lambda x, *a, axis=-1, **k: real_ifft(x, *a, axis=axis, **k) + 0.3 * (axis == 0)
    )
    a, _ = channel_pair(timeout=1)
    with pytest.raises(ProtocolAbort, match="rounding error") as info:
        await amplification.alice(a, _key(200), 100)
    assert info.value.stage == "amplification"
