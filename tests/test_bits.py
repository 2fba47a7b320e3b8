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
