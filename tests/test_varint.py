import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdstack.errors import ChannelError
from qkdstack.transport.varint import decode_increasing, decode_uvarints, encode_increasing, encode_uvarints


@settings(deadline=None)  # the first call compiles the Numba kernels
@given(st.lists(st.integers(0, 2**64 - 1), max_size=200))
def test_uvarint_roundtrip(values):
    arr = np.array(values, dtype=np.uint64)
    assert np.array_equal(decode_uvarints(encode_uvarints(arr), arr.size), arr)


@settings(deadline=None)
@given(st.sets(st.integers(0, 10**12), max_size=200))
def test_increasing_roundtrip(values):
    arr = np.array(sorted(values), dtype=np.uint64)
    assert np.array_equal(decode_increasing(encode_increasing(arr), arr.size), arr)


def test_compact_for_typical_gaps():
    idx = np.cumsum(np.random.default_rng(1).integers(1, 10_000, 100_000)).astype(np.uint64)
    assert len(encode_increasing(idx)) < 2.1 * idx.size


def test_wrong_count_and_repeats_rejected():
    data = encode_uvarints(np.array([1, 2, 3], dtype=np.uint64))
    with pytest.raises(ChannelError):
        decode_uvarints(data, 2)
    with pytest.raises(ChannelError):
        decode_increasing(encode_uvarints(np.array([5, 0], dtype=np.uint64)), 2)
    with pytest.raises(ValueError):
        encode_increasing(np.array([3, 3], dtype=np.uint64))
