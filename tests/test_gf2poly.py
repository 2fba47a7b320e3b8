"""Carry-less polynomial multiplication against Python-integer shift-and-XOR."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdstack.protocol import gf2poly

pytestmark = pytest.mark.skipif(not gf2poly.AVAILABLE, reason="this CPU has no carry-less multiply")


def _int(words: np.ndarray) -> int:
    return int.from_bytes(words.astype("<u8").tobytes(), "little")


def _reference(a: np.ndarray, b: np.ndarray) -> int:
    x, y, out = _int(a), _int(b), 0
    while y:
        low = y & -y
        out ^= x * low  # x times a power of two: a shift, no carries between terms
        y ^= low
    return out


def _words(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**64, n, dtype=np.uint64)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3 * gf2poly.LEAF_WORDS + 5), st.integers(1, 200), st.integers(0, 2**32))
def test_product_equals_shift_and_xor(na, nb, seed):
    rng = np.random.default_rng(seed)
    a, b = _words(rng, na), _words(rng, nb)
    out = gf2poly.multiply(a, b)
    assert out.size == na + nb and _int(out) == _reference(a, b)


LEAF = gf2poly.LEAF_WORDS


@pytest.mark.parametrize("n", [LEAF, LEAF + 1, 2 * LEAF + 1, 4 * LEAF + 3])
def test_karatsuba_sizes_and_all_ones(n):
    rng = np.random.default_rng(n)
    a, b = _words(rng, n), _words(rng, n)
    assert _int(gf2poly.multiply(a, b)) == _reference(a, b)
    ones = np.full(n, 2**64 - 1, np.uint64)
    assert _int(gf2poly.multiply(ones, ones)) == _reference(ones, ones)


def test_multiply_into_accumulates_and_truncates():
    rng = np.random.default_rng(1)
    a, b = _words(rng, 40), _words(rng, 90)
    start = _words(rng, 100)
    out = start.copy()
    gf2poly.multiply_into(a, b, out)  # 130 product words, only 100 kept
    mask = (1 << (64 * 100)) - 1
    assert _int(out) == (_int(start) ^ _reference(a, b)) & mask
