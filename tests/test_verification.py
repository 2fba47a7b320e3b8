import asyncio

import numpy as np
import pytest

from qkdstack.errors import ConfigError, ProtocolAbort
from qkdstack.protocol import public_random, verification
from qkdstack.protocol.channel import channel_pair
from qkdstack.protocol.verification import TAG_BITS, collision_bound, tags_needed


async def _run(key_a: np.ndarray, key_b: np.ndarray, eps_cor: float = 1e-15):
    a, b = channel_pair(timeout=10)
    results = await asyncio.gather(
        verification.alice(a, key_a, eps_cor), verification.bob(b, key_b, eps_cor), return_exceptions=True
    )
    return results, a, b


def _key(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n, dtype=np.uint8)


async def test_equal_keys_accepted_and_tag_bits_counted():
    key = _key(10_000)
    (ra, rb), a, b = await _run(key, key.copy())
    assert ra.ok and rb.ok
    assert ra.tag_bits == rb.tag_bits == TAG_BITS
    assert a.stats.disclosed_bits("verification") == TAG_BITS == b.stats.disclosed_bits("verification")
    assert ra.epsilon == rb.epsilon <= 1e-15


@pytest.mark.parametrize("n", [1, 7, 8, 129, 5000])
async def test_one_bit_difference_rejected_at_any_position(n):
    key = _key(n, n)
    for pos in sorted({0, n // 3, n // 2, n - 1}):
        other = key.copy()
        other[pos] ^= 1
        (ra, rb), _, _ = await _run(key, other)
        assert isinstance(ra, ProtocolAbort) and ra.stage == "verification"
        assert isinstance(rb, ProtocolAbort) and rb.stage == "verification"


@pytest.mark.parametrize("n_a,n_b", [(100, 101), (8, 9), (16, 15), (1000, 0)])
async def test_length_difference_rejected(n_a, n_b):
    key = _key(max(n_a, n_b))
    # same leading bits, padded bytes coincide when the extra bit is zero
    key[min(n_a, n_b) :] = 0
    (ra, rb), _, _ = await _run(key[:n_a], key[:n_b])
    assert isinstance(ra, ProtocolAbort) and isinstance(rb, ProtocolAbort)


async def test_stricter_eps_cor_uses_several_independent_tags():
    key = _key(2000)
    eps = 1e-40
    t = tags_needed(key.size, eps)
    assert t >= 2 and collision_bound(key.size) ** t <= eps < collision_bound(key.size) ** (t - 1)
    (ra, rb), a, _ = await _run(key, key, eps)
    assert ra.tag_bits == rb.tag_bits == t * TAG_BITS == a.stats.disclosed_bits("verification")
    assert ra.epsilon <= eps


async def test_hash_key_is_fresh_each_call():
    """Two verifications of the same key send different hash keys and different tags."""
    key = _key(512)
    seen = set()
    for _ in range(3):
        a, b = channel_pair(timeout=10)
        frames: list[bytes] = []
        a.add_observer(lambda d, f, frames=frames: frames.append(f))
        await asyncio.gather(verification.alice(a, key, 1e-12), verification.bob(b, key, 1e-12))
        seen.add(frames[0])
    assert len(seen) == 3


def test_collision_bound_matches_bernstein():
    # 10^7 bits: 8-byte prefix + 1_250_000 bytes -> ceil(1_250_008 / 16) = 78_126 blocks
    assert collision_bound(10**7) == 8 * 78_126 / 2**106


@pytest.mark.parametrize("eps", [0.0, 1.0, -1e-9, 2.0])
async def test_bad_eps_cor_rejected(eps):
    a, _ = channel_pair(timeout=1)
    with pytest.raises(ConfigError, match="eps_cor"):
        await verification.alice(a, _key(10), eps)


async def test_hash_keys_are_drawn_from_secrets(monkeypatch):
    import secrets

    drawn: list[bytes] = []
    real = secrets.token_bytes

    def recording(nbytes):
        drawn.append(real(nbytes))
        return drawn[-1]

    monkeypatch.setattr(public_random.secrets, "token_bytes", recording)  # the OS CSPRNG by default
    a, b = channel_pair(timeout=10)
    key = _key(300)
    _, msg = await asyncio.gather(verification.alice(a, key, 1e-12), _bob_peek(b, key))
    assert drawn == [msg["hash_keys"]] and len(drawn[0]) == 32


async def _bob_peek(channel, key):
    msg = await channel.recv(expect="verification.tag")
    await channel.send("verification.result", ok=True)
    return msg
