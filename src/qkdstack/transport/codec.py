"""Compact, self-describing binary codec for protocol messages.

A :class:`~qkdstack.protocol.channel.Message` becomes one frame of bytes. Values may be
``None``, ``bool``, ``int`` (signed, 64-bit), ``float``, ``str``, ``bytes``,
:class:`numpy.ndarray` (numeric dtypes, any shape, sent raw little-endian),
:class:`~qkdstack.bits.BitArray` (sent packed), and ``list``/``dict`` of these.
Decoding validates every length against the frame, so a malformed or truncated frame
raises :class:`~qkdstack.errors.ChannelError` instead of crashing or over-reading.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from qkdstack.bits import BitArray
from qkdstack.errors import ChannelError

MAGIC = b"Q1"
_ALLOWED_DTYPES = {"u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f4", "f8", "b1"}
_MAX_DEPTH = 16


def _byte_view(arr: np.ndarray) -> memoryview:
    """The bytes of an array, without a copy where it is contiguous (``bytearray += ndarray`` would broadcast)."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def encode_value(value: Any, out: bytearray, depth: int = 0) -> None:
    """Append the encoding of one value to ``out``."""
    if depth > _MAX_DEPTH:
        raise ChannelError("message nests too deeply to encode")
    if value is None:
        out += b"N"
    elif value is True:
        out += b"T"
    elif value is False:
        out += b"F"
    elif isinstance(value, int | np.integer):
        out += b"i" + struct.pack("<q", int(value))
    elif isinstance(value, float | np.floating):
        out += b"f" + struct.pack("<d", float(value))
    elif isinstance(value, str):
        raw = value.encode()
        out += b"s" + struct.pack("<I", len(raw)) + raw
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = value if isinstance(value, bytes | bytearray) else bytes(value)
        out += b"b"
        out += struct.pack("<Q", len(raw))
        out += raw  # appended straight from the caller's buffer: one copy, into the frame
    elif isinstance(value, BitArray):
        out += b"B"
        out += struct.pack("<Q", len(value))
        out += _byte_view(value.packed)
    elif isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        code = arr.dtype.kind + str(arr.dtype.itemsize)
        if code not in _ALLOWED_DTYPES:
            raise ChannelError(f"cannot encode arrays of dtype {arr.dtype}")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        out += b"a" + code.encode() + struct.pack("<B", arr.ndim)
        out += struct.pack(f"<{arr.ndim}Q", *arr.shape)
        out += _byte_view(arr)
    elif isinstance(value, list | tuple):
        out += b"l" + struct.pack("<I", len(value))
        for item in value:
            encode_value(item, out, depth + 1)
    elif isinstance(value, dict):
        out += b"d" + struct.pack("<I", len(value))
        for key, item in value.items():
            if not isinstance(key, str):
                raise ChannelError("message dict keys must be strings")
            encode_value(key, out, depth + 1)
            encode_value(item, out, depth + 1)
    else:
        raise ChannelError(f"cannot encode a value of type {type(value).__name__}")


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ChannelError("truncated or malformed message frame")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def decode_value(reader: _Reader, depth: int = 0) -> Any:
    """Read one value written by :func:`encode_value`."""
    if depth > _MAX_DEPTH:
        raise ChannelError("message nests too deeply")
    tag = bytes(reader.take(1))
    if tag == b"N":
        return None
    if tag == b"T":
        return True
    if tag == b"F":
        return False
    if tag == b"i":
        return reader.unpack("<q")[0]
    if tag == b"f":
        return reader.unpack("<d")[0]
    if tag == b"s":
        (n,) = reader.unpack("<I")
        try:
            return bytes(reader.take(n)).decode()
        except UnicodeDecodeError as exc:
            raise ChannelError("malformed string in message frame") from exc
    if tag == b"b":
        (n,) = reader.unpack("<Q")
        return bytes(reader.take(n))
    if tag == b"B":
        (n,) = reader.unpack("<Q")
        raw = reader.take((n + 7) // 8)
        return BitArray.adopt(np.frombuffer(raw, dtype=np.uint8).copy(), n)
    if tag == b"a":
        code = bytes(reader.take(2)).decode(errors="replace")
        if code not in _ALLOWED_DTYPES:
            raise ChannelError("malformed array dtype in message frame")
        (ndim,) = reader.unpack("<B")
        if ndim > 8:
            raise ChannelError("malformed array rank in message frame")
        shape = reader.unpack(f"<{ndim}Q")
        dtype = np.dtype("<" + code if code != "b1" else "?")
        count = int(np.prod(shape, dtype=np.uint64)) if ndim else 1
        raw = reader.take(count * dtype.itemsize)
        return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if tag == b"l":
        (n,) = reader.unpack("<I")
        return [decode_value(reader, depth + 1) for _ in range(n)]
    if tag == b"d":
        (n,) = reader.unpack("<I")
        out = {}
        for _ in range(n):
            key = decode_value(reader, depth + 1)
            if not isinstance(key, str):
                raise ChannelError("malformed dict key in message frame")
            out[key] = decode_value(reader, depth + 1)
        return out
    raise ChannelError(f"unknown value tag {tag!r} in message frame")


def encode_message(kind: str, fields: dict[str, Any], disclosed: BitArray | None) -> bytes:
    """Encode a message (kind, public fields, disclosed bits) as one frame."""
    out = bytearray(MAGIC)
    encode_value(kind, out)
    encode_value(fields, out)
    encode_value(disclosed, out)
    return bytes(out)


def decode_message(frame: bytes | memoryview) -> tuple[str, dict[str, Any], BitArray | None]:
    """Decode a frame made by :func:`encode_message`; raises ChannelError if malformed."""
    reader = _Reader(frame)
    if bytes(reader.take(2)) != MAGIC:
        raise ChannelError("message frame has a bad magic number")
    kind = decode_value(reader)
    fields = decode_value(reader)
    disclosed = decode_value(reader)
    if not isinstance(kind, str) or not isinstance(fields, dict):
        raise ChannelError("malformed message frame")
    if disclosed is not None and not isinstance(disclosed, BitArray):
        raise ChannelError("malformed disclosed-bits field in message frame")
    if reader.pos != len(reader.buf):
        raise ChannelError("trailing bytes after message frame")
    return kind, fields, disclosed
