"""Toeplitz products with carry-less multiplication against the dense GF(2) matrix product."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdstack.protocol import toeplitz_clmul

pytestmark = pytest.mark.skipif(not toeplitz_clmul.AVAILABLE, reason="this CPU has no carry-less multiply")
LEAF = toeplitz_clmul.LEAF_WORDS


def _dense(t_words: np.ndarray, v_words: np.ndarray) -> np.ndarray:
    """T @ v over GF(2) by the definition T[i, j] = t[i - j + n - 1], as packed words."""
    t = np.unpackbits(t_words.view(np.uint8), bitorder="little")
    v = np.unpackbits(v_words.view(np.uint8), bitorder="little")
    n = v.size
    matrix = t[np.arange(n)[:, None] - np.arange(n)[None, :] + n - 1]
    bits = (matrix.astype(np.int64) @ v.astype(np.int64)) & 1
    return np.packbits(bits.astype(np.uint8), bitorder="little").view(np.uint64)


def _instance(seed: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**64, 2 * k, dtype=np.uint64), rng.integers(0, 2**64, k, dtype=np.uint64)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2 * LEAF + 3), st.integers(0, 2**32))
def test_column_method_equals_dense_product(k, seed):
    t, v = _instance(seed, k)
    assert np.array_equal(toeplitz_clmul.toeplitz_times(t, v, depth=0), _dense(t, v))


@pytest.mark.parametrize("k,depth", [(2 * LEAF, 0), (4 * LEAF, 0), (4 * LEAF, 1), (8 * LEAF, 2), (6 * LEAF, 3)])
def test_three_products_split_equals_dense_product(k, depth):
    t, v = _instance(k + depth, k)
    assert np.array_equal(toeplitz_clmul.toeplitz_times(t, v, depth=depth), _dense(t, v))


def test_all_ones_and_unit_vectors():
    k = 4 * LEAF
    ones = np.full(2 * k, 2**64 - 1, np.uint64)
    v = np.zeros(k, np.uint64)
    v[k - 1] = np.uint64(1) << np.uint64(63)  # the last column of T
    assert np.array_equal(toeplitz_clmul.toeplitz_times(ones, v), _dense(ones, v))
    v = np.full(k, 2**64 - 1, np.uint64)  # every row sums 64k ones: even
    assert not toeplitz_clmul.toeplitz_times(ones, v).any()


def test_wrong_diagonal_length_is_refused():
    with pytest.raises(ValueError, match="diagonal words"):
        toeplitz_clmul.toeplitz_times(np.zeros(5, np.uint64), np.zeros(3, np.uint64))


def test_products_work_in_a_forked_child():
    """A child forked after the worker threads started gets its own pool (no hang on submit)."""
    import multiprocessing

    t, v = _instance(3, 8 * LEAF)
    expected = toeplitz_clmul.toeplitz_times(t, v)  # the parent's pool threads are running now
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        result = pool.apply_async(toeplitz_clmul.toeplitz_times, (t, v)).get(timeout=60)
    assert np.array_equal(result, expected)
