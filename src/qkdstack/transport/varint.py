"""LEB128 varints for compact index lists, encoded and decoded by compiled single-pass kernels.

Detection indices are strictly increasing and, at long distances, about 10^4 apart:
sending their differences as varints costs 1–3 bytes per detection instead of 8. Each
direction is one Numba pass over the data (gaps, lengths, bytes and every validity check
fused), because the vectorised NumPy form needed a dozen full-size temporaries and was
the largest cost of sifting (0.25 s each way for 3.8e6 detections; now about 0.02 s each
way on the 2-core development machine). Decoding is bound by the latency of the chain
"read a varint, learn where the next begins", hence the branch-free four-byte window.

Decoding validates everything that arrives from the peer: exactly ``count`` values, no
trailing bytes, no varint longer than 64 bits, no zero gap (a repeated index) and no
index past 2^64 - 1; any violation raises :class:`~qkdstack.errors.ChannelError`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qkdstack.errors import ChannelError

_MAX_BYTES = 10  # ceil(64 / 7)
_HIGH = np.uint64(0x80)
_LOW7 = np.uint64(0x7F)
_SEVEN = np.uint64(7)
_ZERO = np.uint64(0)
_TWO_BYTES = np.uint64(1 << 14)  # values below this take the branch-free path of _encode

# Status codes of the decoding kernel (0 = success).
_BAD_COUNT = 1
_TOO_LONG = 2
_REPEAT = 3
_OVERFLOW = 4
_MESSAGES = {
    _TOO_LONG: "varint longer than 64 bits",
    _REPEAT: "index list is not strictly increasing",
    _OVERFLOW: "index list runs past 2^64 - 1",
}


@njit(cache=True, inline="always")
def _varint_size(v: np.uint64) -> int:
    """Bytes in the varint of ``v``, without branches (a data-dependent loop mispredicts)."""
    return (
        1
        + (v >= np.uint64(1 << 7))
        + (v >= np.uint64(1 << 14))
        + (v >= np.uint64(1 << 21))
        + (v >= np.uint64(1 << 28))
        + (v >= np.uint64(1 << 35))
        + (v >= np.uint64(1 << 42))
        + (v >= np.uint64(1 << 49))
        + (v >= np.uint64(1 << 56))
        + (v >= np.uint64(1 << 63))
    )


@njit(cache=True, nogil=True)
def _encoded_size(values: np.ndarray, gaps: bool) -> int:
    """Bytes the varints of ``values`` (or of their gaps) take."""
    total = 0
    prev = _ZERO
    for i in range(values.size):
        v = values[i]
        total += _varint_size(v - prev if gaps else v)
        prev = v
    return total


@njit(cache=True, nogil=True)
def _encode(values: np.ndarray, gaps: bool, capacity: int) -> tuple[np.ndarray, int]:
    """Varints of ``values`` (or, with ``gaps``, of their successive differences), in one pass.

    Writes into a buffer of ``capacity`` bytes and returns (the bytes written, -1); or
    (empty, i) when ``gaps`` and ``values[i] <= values[i - 1]``; or (empty, -2) when the
    capacity would not do (the caller then sizes the buffer exactly). Values below 2^14 (the
    gaps of a frame at metro distances) are written as two bytes with the cursor advanced by
    one or two: a loop per byte mispredicts on the real mix of one- and two-byte gaps
    (15.6 -> 10 ms for 3.8e6 gaps at 25 km; a three-byte version gained nothing).
    """
    out = np.empty(capacity, np.uint8)
    pos = 0
    prev = _ZERO
    for i in range(values.size):
        v = values[i]
        if gaps:
            if v <= prev and i > 0:
                return out[:0], i
            v, prev = v - prev, v
        if pos + _MAX_BYTES > capacity:
            return out[:0], -2
        if v < _TWO_BYTES:  # one or two bytes, written without a data-dependent branch
            second = np.uint64(v >= _HIGH)
            out[pos] = np.uint8((v & _LOW7) | (second << _SEVEN))
            out[pos + 1] = np.uint8(v >> _SEVEN)
            pos += 1 + int(second)
            continue
        while v >= _HIGH:
            out[pos] = np.uint8((v & _LOW7) | _HIGH)
            v >>= _SEVEN
            pos += 1
        out[pos] = np.uint8(v)
        pos += 1
    return out[:pos], -1


def _encoded(values: np.ndarray, gaps: bool) -> bytes:
    v = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    # Three bytes cover every gap below 2^21 (detections at any practical distance): one pass.
    out, status = _encode(v, gaps, 3 * v.size + _MAX_BYTES)
    if status == -2:
        out, status = _encode(v, gaps, _encoded_size(v, gaps) + _MAX_BYTES)
    if status >= 0:
        raise ValueError("indices must be strictly increasing")
    return out.tobytes()


@njit(cache=True, inline="always")
def _read_slow(data: np.ndarray, pos: int) -> tuple[np.uint64, int, int]:
    """One varint read byte by byte: (value, new position, status)."""
    value = _ZERO
    shift = 0
    while True:
        if pos == data.size:
            return value, pos, _BAD_COUNT
        byte = data[pos]
        pos += 1
        if shift == 63 and byte > 1:  # the 10th byte may carry only bit 63
            return value, pos, _TOO_LONG
        value |= np.uint64(byte & 0x7F) << np.uint64(shift)
        if byte < 0x80:
            return value, pos, 0
        shift += 7
        if shift > 63:
            return value, pos, _TOO_LONG


@njit(cache=True, nogil=True)
def _decode(data: np.ndarray, count: int, gaps: bool) -> tuple[np.ndarray, int]:
    """Decode exactly ``count`` varints (with ``gaps``: and prefix-sum them). Returns (values, status).

    Varints of up to four bytes (every gap below 2^28) are read branch-free from a four-byte
    window; longer ones, and the last few bytes of the buffer, byte by byte.
    """
    out = np.empty(count, np.uint64)
    pos = 0
    end = data.size
    total = _ZERO
    for i in range(count):
        status = 0
        if pos + 4 <= end:
            b0 = np.uint64(data[pos])
            b1 = np.uint64(data[pos + 1])
            b2 = np.uint64(data[pos + 2])
            b3 = np.uint64(data[pos + 3])
            c0 = b0 >> _SEVEN  # continuation flags, cumulated: c_k = 1 iff bytes 0..k all continue
            c1 = c0 & (b1 >> _SEVEN)
            c2 = c1 & (b2 >> _SEVEN)
            if c2 & (b3 >> _SEVEN):
                value, pos, status = _read_slow(data, pos)
            else:
                value = (
                    (b0 & _LOW7)
                    | (((b1 & _LOW7) << _SEVEN) * c0)
                    | (((b2 & _LOW7) << np.uint64(14)) * c1)
                    | (((b3 & _LOW7) << np.uint64(21)) * c2)
                )
                pos += 1 + int(c0 + c1 + c2)
        else:
            value, pos, status = _read_slow(data, pos)
        if status:
            return out, status
        if gaps:
            if value == _ZERO and i > 0:
                return out, _REPEAT
            nxt = total + value
            if nxt < total:
                return out, _OVERFLOW
            total = nxt
            out[i] = total
        else:
            out[i] = value
    if pos != end:
        return out, _BAD_COUNT
    return out, 0


def _as_bytes_array(data: bytes | bytearray | memoryview) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _check_count(count: int) -> int:
    count = int(count)
    if count < 0:
        raise ChannelError("negative varint count")
    return count


def _decoded(data: bytes | bytearray | memoryview, count: int, gaps: bool) -> np.ndarray:
    count = _check_count(count)
    b = _as_bytes_array(data)
    if count > b.size:  # every varint takes at least one byte; refuse before allocating
        raise ChannelError(f"varint list does not hold exactly {count} values")
    values, status = _decode(b, count, gaps)
    if status == _BAD_COUNT:
        raise ChannelError(f"varint list does not hold exactly {count} values")
    if status:
        raise ChannelError(_MESSAGES[status])
    return values


def encode_uvarints(values: np.ndarray) -> bytes:
    """Encode non-negative integers (< 2^64) as concatenated LEB128 varints."""
    return _encoded(values, False)


def decode_uvarints(data: bytes | bytearray | memoryview, count: int) -> np.ndarray:
    """Decode exactly ``count`` LEB128 varints; raises ChannelError if the data do not fit."""
    return _decoded(data, count, False)


def encode_increasing(indices: np.ndarray) -> bytes:
    """Encode a strictly increasing index array as varint gaps (first value, then differences)."""
    return _encoded(indices, True)


def decode_increasing(data: bytes | bytearray | memoryview, count: int) -> np.ndarray:
    """Inverse of :func:`encode_increasing`; rejects gaps that would repeat an index."""
    return _decoded(data, count, True)
