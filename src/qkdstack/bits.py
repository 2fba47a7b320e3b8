"""Packed bit arrays.

Bits travel packed (eight to a byte, most significant bit first, as :func:`numpy.packbits`
lays them out) on every hot path and across every channel. :class:`BitArray` is an
immutable view of such a buffer plus its length in bits; its ``repr`` never shows the
bits themselves, since they are often key material.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["BitArray", "pack", "parity", "popcount", "unpack"]


def pack(bits: np.ndarray) -> np.ndarray:
    """Pack a 0/1 array (any integer or bool dtype) into bytes, MSB first."""
    return np.packbits(np.asarray(bits, dtype=np.uint8))


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """Unpack the first ``n`` bits of ``packed`` into a uint8 0/1 array."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), count=n)


def popcount(packed: np.ndarray) -> int:
    """Hamming weight of a packed buffer (padding bits must be zero)."""
    return int(np.bitwise_count(np.asarray(packed, dtype=np.uint8)).sum())


def parity(bits: np.ndarray) -> int:
    """Parity (XOR of all bits) of an unpacked 0/1 array."""
    return int(np.bitwise_xor.reduce(np.asarray(bits, dtype=np.uint8), initial=0) & 1)


class BitArray:
    """An immutable, packed sequence of ``n`` bits.

    Padding bits in the last byte are always zero, so byte-wise comparison, XOR and
    popcount are exact.
    """

    __slots__ = ("_data", "_n")

    def __init__(self, data: bytes | np.ndarray, n: int) -> None:
        buf = np.frombuffer(bytes(data), dtype=np.uint8) if isinstance(data, bytes | bytearray) else data
        buf = np.asarray(buf, dtype=np.uint8)
        need = (n + 7) // 8
        if n < 0 or buf.size != need:
            raise ValueError(f"BitArray of {n} bits needs {need} bytes, got {buf.size}")
        if n % 8 and buf.size:
            mask = np.uint8((0xFF << (8 - n % 8)) & 0xFF)
            if buf[-1] & ~mask:
                buf = buf.copy()  # our own copy now: no second one below
                buf[-1] &= mask
            elif buf.flags.writeable:
                buf = buf.copy()
        elif buf.flags.writeable:
            buf = buf.copy()  # the caller could still write through its reference
        buf.flags.writeable = False
        self._data = buf
        self._n = int(n)

    @classmethod
    def adopt(cls, buf: np.ndarray, n: int) -> BitArray:
        """Take ownership of a freshly made uint8 buffer without copying it.

        The caller must hold no other reference through which it could still write: the
        buffer is frozen (made read-only) and becomes the BitArray's storage. Used where a
        packed buffer was just produced (``np.packbits``, a decoded frame), where the
        defensive copy of :meth:`__init__` would only copy it a second time.
        """
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
            raise TypeError("BitArray.adopt takes a one-dimensional uint8 array")
        buf.flags.writeable = False
        return cls(buf, n)

    @classmethod
    def from_bits(cls, bits: np.ndarray | Iterable[int]) -> BitArray:
        """Build from an unpacked 0/1 array (bool or uint8 arrays are packed as they are)."""
        if isinstance(bits, np.ndarray) and bits.dtype in (np.bool_, np.uint8):
            arr = bits  # np.packbits reads bool and uint8 directly: no 0/1 conversion pass
        else:
            arr = np.asarray(bits if isinstance(bits, np.ndarray) else list(bits), dtype=np.uint8)
        return cls.adopt(np.packbits(arr), arr.size)

    @classmethod
    def from_bytes(cls, data: bytes, n: int | None = None) -> BitArray:
        """Build from raw bytes; ``n`` defaults to ``8 * len(data)``."""
        return cls(np.frombuffer(data, dtype=np.uint8), 8 * len(data) if n is None else n)

    @classmethod
    def zeros(cls, n: int) -> BitArray:
        return cls.adopt(np.zeros((n + 7) // 8, dtype=np.uint8), n)

    @property
    def packed(self) -> np.ndarray:
        """The read-only packed buffer (MSB first, zero padding)."""
        return self._data

    def to_bits(self) -> np.ndarray:
        """Unpacked uint8 0/1 array (a fresh, writable copy)."""
        return np.unpackbits(self._data, count=self._n)

    def to_bytes(self) -> bytes:
        return self._data.tobytes()

    def __len__(self) -> int:
        return self._n

    def popcount(self) -> int:
        return popcount(self._data)

    def parity(self) -> int:
        return self.popcount() & 1

    def __xor__(self, other: BitArray) -> BitArray:
        if len(other) != self._n:
            raise ValueError("XOR of bit arrays of different lengths")
        return BitArray.adopt(np.bitwise_xor(self._data, other._data), self._n)

    def __getitem__(self, index: slice) -> BitArray:
        if not isinstance(index, slice):
            raise TypeError("BitArray supports slicing only; use to_bits() for single bits")
        return BitArray.from_bits(self.to_bits()[index])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BitArray):
            return NotImplemented
        return self._n == other._n and bool(np.array_equal(self._data, other._data))

    def __hash__(self) -> int:
        return hash((self._n, self._data.tobytes()))

    def __repr__(self) -> str:
        return f"BitArray(<{self._n} bits>)"
