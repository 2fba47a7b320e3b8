import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdstack.bits import BitArray, parity


@given(st.lists(st.integers(0, 1), max_size=300))
def test_roundtrip_popcount_parity(bits):
    arr = np.array(bits, dtype=np.uint8)
    ba = BitArray.from_bits(arr)
    assert len(ba) == len(bits)
    assert np.array_equal(ba.to_bits(), arr)
    assert ba.popcount() == sum(bits)
    assert ba.parity() == parity(arr) == sum(bits) % 2


def test_padding_is_cleared_and_xor():
    ba = BitArray(np.array([0xFF], dtype=np.uint8), 3)
    assert ba.popcount() == 3
    other = BitArray.from_bits([1, 0, 1])
    assert (ba ^ other).to_bits().tolist() == [0, 1, 0]
    with pytest.raises(ValueError):
        ba ^ BitArray.zeros(4)


def test_repr_hides_bits():
    ba = BitArray.from_bytes(b"\xde\xad\xbe\xef")
    assert "de" not in repr(ba).lower() and "32 bits" in repr(ba)


def test_wrong_buffer_size_rejected():
    with pytest.raises(ValueError):
        BitArray(np.zeros(2, dtype=np.uint8), 20)


def test_bit_arrays_never_alias_a_writable_caller_buffer():
    buf = np.array([0b10100000], dtype=np.uint8)
    ba = BitArray(buf, 3)
    buf[0] = 0
    assert ba.to_bits().tolist() == [1, 0, 1]
    for made in (ba, BitArray.from_bits(np.array([1, 0, 1])), ba ^ ba, BitArray.zeros(9)):
        with pytest.raises(ValueError):
            made.packed[0] = 1  # frozen storage


def test_adopt_freezes_without_copying_and_clears_padding():
    buf = np.array([0xFF, 0xFF], dtype=np.uint8)
    ba = BitArray.adopt(buf, 16)
    assert ba.packed is buf and not buf.flags.writeable
    assert BitArray.adopt(np.array([0xFF], dtype=np.uint8), 3).popcount() == 3
    with pytest.raises(TypeError):
        BitArray.adopt(np.zeros(2, dtype=np.int16), 8)


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int64, np.float64])
def test_from_bits_accepts_bool_and_integer_arrays(dtype):
    bits = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1], dtype=dtype)
    assert BitArray.from_bits(bits).to_bits().tolist() == [1, 0, 0, 1, 1, 0, 1, 0, 1]
    assert BitArray.from_bits(bits).to_bytes() == b"\x9a\x80"
