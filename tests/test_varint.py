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


def test_boundary_values_and_mixed_lengths_roundtrip():
    # 1- to 10-byte varints, around every 7-bit boundary, with the buffer's last bytes on the slow path
    values = [0, 1, 2**64 - 1]
    for j in range(1, 10):
        values += [2 ** (7 * j) - 1, 2 ** (7 * j)]
    arr = np.array(values, dtype=np.uint64)
    for shuffled in (arr, arr[::-1].copy(), np.random.default_rng(5).permutation(arr)):
        assert np.array_equal(decode_uvarints(encode_uvarints(shuffled), shuffled.size), shuffled)


def test_encoding_is_canonical_leb128():
    assert encode_uvarints(np.array([0, 127, 128, 300], dtype=np.uint64)) == b"\x00\x7f\x80\x01\xac\x02"
    assert encode_increasing(np.array([5, 133], dtype=np.uint64)) == b"\x05\x80\x01"


@pytest.mark.parametrize(
    ("data", "count", "match"),
    [
        (b"\xff" * 10 + b"\x01", 1, "longer than 64 bits"),  # 11 bytes
        (b"\x80" * 9 + b"\x02", 1, "longer than 64 bits"),  # 10th byte beyond bit 63
        (b"\x80\x80\x80\x80\x80", 1, "exactly 1"),  # truncated, on the four-byte fast path
        (b"\x80", 1, "exactly 1"),  # truncated at the end of the buffer
        (b"\x01\x01", 1, "exactly 1"),  # trailing bytes
        (b"\x01", 2, "exactly 2"),  # too few values
        (b"", 1, "exactly 1"),
        (b"\x00", 0, "exactly 0"),
    ],
)
def test_malformed_varints_rejected(data, count, match):
    with pytest.raises(ChannelError, match=match):
        decode_uvarints(data, count)


def test_increasing_rejects_overflow_and_negative_count():
    top = encode_uvarints(np.array([2**64 - 1, 1], dtype=np.uint64))
    with pytest.raises(ChannelError, match="past 2"):
        decode_increasing(top, 2)
    with pytest.raises(ChannelError):
        decode_increasing(b"", -1)
    # a zero first index is fine, a zero later gap is a repeat
    assert decode_increasing(b"\x00\x01", 2).tolist() == [0, 1]
    with pytest.raises(ChannelError, match="strictly increasing"):
        decode_increasing(b"\x01\x00", 2)


def test_encode_rejects_decreasing_anywhere():
    idx = np.arange(1000, dtype=np.uint64)
    idx[700] = idx[699]
    with pytest.raises(ValueError):
        encode_increasing(idx)
    assert encode_increasing(np.zeros(0, dtype=np.uint64)) == b""
