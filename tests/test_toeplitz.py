import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdstack.errors import QKDError
from qkdstack.protocol import toeplitz_clmul
from qkdstack.protocol.toeplitz import ToeplitzPrecisionError, seed_length, toeplitz_hash, toeplitz_hash_naive


def _random_instance(seed: int, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, n, dtype=np.uint8), rng.integers(0, 2, seed_length(n), dtype=np.uint8)


needs_clmul = pytest.mark.skipif(not toeplitz_clmul.AVAILABLE, reason="this CPU has no carry-less multiply")
METHODS = ["fft", pytest.param("clmul", marks=needs_clmul)]


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=150, deadline=None)
@given(st.integers(1, 300), st.data())
def test_each_method_equals_naive_on_small_sizes(method, n, data):
    m = data.draw(st.integers(1, n))
    key, seed = _random_instance(data.draw(st.integers(0, 2**32)), n, m)
    out = toeplitz_hash(key, seed, m, method)
    assert out.dtype == np.uint8 and out.shape == (m,)
    assert np.array_equal(out, toeplitz_hash_naive(key, seed, m))


@needs_clmul
@pytest.mark.parametrize("n,m", [(70_001, 9_000), (70_001, 35_000), (70_001, 61_001), (200_000, 64), (131_072, 65_536)])
def test_methods_agree_on_larger_sizes(n, m):
    key, seed = _random_instance(n + m, n, m)
    assert np.array_equal(toeplitz_hash(key, seed, m, "clmul"), toeplitz_hash(key, seed, m, "fft"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "n,m",
    [(1, 1), (2, 1), (2, 2), (7, 7), (63, 1), (64, 64), (65, 33), (129, 128), (1001, 1), (3001, 2999), (4096, 4096)],
)
def test_edge_sizes(n, m, method):
    key, seed = _random_instance(n * 1000 + m, n, m)
    assert np.array_equal(toeplitz_hash(key, seed, m, method), toeplitz_hash_naive(key, seed, m))


def test_all_ones_worst_case_sums():
    """All-ones inputs give the largest convolution sums (n - m); their parity must come out exactly."""
    for n, m in [(1000, 1), (1000, 500), (4097, 17)]:
        key = np.ones(n, np.uint8)
        seed = np.ones(n - 1, np.uint8)
        for method in ("fft", "clmul") if toeplitz_clmul.AVAILABLE else ("fft",):
            assert np.array_equal(toeplitz_hash(key, seed, m, method), np.full(m, 1 ^ ((n - m) & 1), np.uint8))


def test_matrix_convention():
    """[I | T] with T[i, j] = seed[i - j + n - m - 1]: a unit key vector e_j selects column j."""
    n, m = 5, 3
    seed = np.array([1, 0, 0, 1], dtype=np.uint8)
    for j in range(n):
        key = np.zeros(n, np.uint8)
        key[j] = 1
        identity_column = [int(i == j) for i in range(m)]
        expected = identity_column if j < m else [seed[i - (j - m) + n - m - 1] for i in range(m)]
        assert toeplitz_hash(key, seed, m).tolist() == expected


def test_m_equal_n_is_the_identity():
    key, seed = _random_instance(3, 50, 50)
    assert np.array_equal(toeplitz_hash(key, seed, 50), key)


@pytest.mark.parametrize("n,m", [(6, 1), (6, 3), (7, 4)])
def test_family_is_two_universal_exhaustively(n, m):
    """For every pair of distinct keys, at most a 2^-m fraction of all 2^(n-1) seeds collides them."""
    keys = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.uint8)
    seeds = ((np.arange(2 ** (n - 1))[:, None] >> np.arange(n - 1)) & 1).astype(np.uint8)
    collisions = np.zeros((2**n, 2**n), np.int64)
    for seed in seeds:
        codes = np.array([toeplitz_hash_naive(k, seed, m) for k in keys]) @ (1 << np.arange(m))
        collisions += codes[:, None] == codes[None, :]
    np.fill_diagonal(collisions, 0)
    assert collisions.max() <= len(seeds) // 2**m
    assert collisions.max() > 0  # the count is real: some pairs do collide


def test_large_spot_check_against_direct_parities():
    """A 2*10^5-bit hash: selected output bits recomputed as key bit XOR parity of seed window AND key tail."""
    n, m = 200_003, 100_001
    w = n - m
    key, seed = _random_instance(7, n, m)
    out = toeplitz_hash(key, seed, m)
    rng = np.random.default_rng(8)
    for i in [0, 1, m - 1, *rng.integers(0, m, 60).tolist()]:
        window = seed[i : i + w][::-1]  # row i of T: seed[i - j + w - 1] for j = 0..w-1
        assert out[i] == key[i] ^ (int(np.bitwise_and(window, key[m:]).sum()) & 1)


@pytest.mark.parametrize("n,m,seed_len", [(10, 0, 9), (10, 11, 9), (10, 5, 14), (10, 5, 10), (0, 1, 0)])
def test_bad_sizes_rejected(n, m, seed_len):
    with pytest.raises(ValueError):
        toeplitz_hash(np.zeros(n, np.uint8), np.zeros(seed_len, np.uint8), m)


def test_inexact_fft_result_fails_closed(monkeypatch):
    """If the float result strays 0.3 from an integer, the hash refuses instead of rounding."""
    import scipy.fft

    real_ifft = scipy.fft.ifft

    def drifting_ifft(x, *args, axis=-1, **kwargs):
        out = real_ifft(x, *args, axis=axis, **kwargs)
        return out + 0.3 if axis == 0 else out  # the last inverse step

    monkeypatch.setattr(scipy.fft, "ifft", drifting_ifft)
    key, seed = _random_instance(1, 100, 50)
    with pytest.raises(ToeplitzPrecisionError) as info:
        toeplitz_hash(key, seed, 50, "fft")
    assert isinstance(info.value, QKDError)
