"""Compact, self-describing binary codec for protocol messages.

A :class:`~qkdstack.transport.channel.Message` becomes one frame of bytes. Values may be
``None``, ``bool``, ``int`` (signed, 64-bit), ``float``, ``str``, ``bytes``,
:class:`numpy.ndarray` (numeric dtypes, any shape, sent raw little-endian),
:class:`~qkdstack.bits.BitArray` (sent packed), and ``list``/``dict`` of these.
Decoding validates every length against the frame, so a malformed or truncated frame
raises :class:`~qkdstack.errors.ChannelError` instead of crashing or over-reading.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from qkdstack.bits import BitArray
from qkdstack.errors import ChannelError

MAGIC = b"Q1"
_ALLOWED_DTYPES = {"u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f4", "f8", "b1"}
_MAX_DEPTH = 16

# Precompiled layouts and per-dtype tables: the codec runs once per protocol message (Cascade
# exchanges ~100 per frame), so per-call struct format parsing and dtype construction matter.
_I32, _U32, _U64, _I64, _F64, _U8 = (struct.Struct(f) for f in ("<i", "<I", "<Q", "<q", "<d", "<B"))
_SHAPES = [struct.Struct(f"<{k}Q") for k in range(9)]
_WIRE_DTYPES = {code: np.dtype("<" + code if code != "b1" else "?") for code in _ALLOWED_DTYPES}
"""Wire dtype of each code (little-endian); ``b1`` is numpy's bool."""
_NATIVE_DTYPES = {code: dt.newbyteorder("=") for code, dt in _WIRE_DTYPES.items()}
_ARRAY_HEADERS: dict[np.dtype, bytes] = {}
"""Tag and dtype code of an array of each (native or little-endian) dtype: ``a`` + code."""


def _array_header(dtype: np.dtype) -> bytes:
    head = _ARRAY_HEADERS.get(dtype)
    if head is None:
        code = dtype.kind + str(dtype.itemsize)
        if code not in _ALLOWED_DTYPES:
            raise ChannelError(f"cannot encode arrays of dtype {dtype}")
        head = _ARRAY_HEADERS[dtype] = b"a" + code.encode()
    return head


def _byte_view(arr: np.ndarray) -> memoryview:
    """The bytes of an array, without a copy where it is contiguous (``bytearray += ndarray`` would broadcast)."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def _encode_array(value: np.ndarray, out: bytearray) -> None:
    arr = value if value.flags.c_contiguous else np.ascontiguousarray(value)
    head = _array_header(arr.dtype)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    out += head
    out += _U8.pack(arr.ndim)
    out += _SHAPES[arr.ndim].pack(*arr.shape) if arr.ndim <= 8 else struct.pack(f"<{arr.ndim}Q", *arr.shape)
    out += memoryview(arr.reshape(-1).view(np.uint8))


def _encode_str(value: str, out: bytearray) -> None:
    raw = value.encode()
    out += b"s"
    out += _U32.pack(len(raw))
    out += raw


def _encode_bits(value: BitArray, out: bytearray) -> None:
    out += b"B"
    out += _U64.pack(len(value))
    out += _byte_view(value.packed)


def _encode_int(value: int, out: bytearray) -> None:
    out += b"i"
    out += _I64.pack(value)


_LEAF_ENCODERS: dict[type, Any] = {
    np.ndarray: _encode_array,
    str: _encode_str,
    BitArray: _encode_bits,
    int: _encode_int,
}
"""Encoders of the commonest exact types (a dict look-up instead of a chain of isinstance checks)."""


def encode_value(value: Any, out: bytearray, depth: int = 0) -> None:
    """Append the encoding of one value to ``out``."""
    if depth > _MAX_DEPTH:
        raise ChannelError("message nests too deeply to encode")
    leaf = _LEAF_ENCODERS.get(type(value))
    if leaf is not None:
        leaf(value, out)
    elif value is None:
        out += b"N"
    elif value is True:
        out += b"T"
    elif value is False:
        out += b"F"
    elif isinstance(value, np.ndarray):
        _encode_array(value, out)
    elif isinstance(value, int | np.integer):
        _encode_int(int(value), out)
    elif isinstance(value, float | np.floating):
        out += b"f"
        out += _F64.pack(float(value))
    elif isinstance(value, str):
        _encode_str(value, out)
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = value if isinstance(value, bytes | bytearray) else bytes(value)
        out += b"b"
        out += _U64.pack(len(raw))
        out += raw  # appended straight from the caller's buffer: one copy, into the frame
    elif isinstance(value, BitArray):
        _encode_bits(value, out)
    elif isinstance(value, list | tuple):
        out += b"l"
        out += _U32.pack(len(value))
        for item in value:
            encode_value(item, out, depth + 1)
    elif isinstance(value, dict):
        out += b"d"
        out += _U32.pack(len(value))
        for key, item in value.items():
            if not isinstance(key, str):
                raise ChannelError("message dict keys must be strings")
            _encode_str(key, out)
            encode_value(item, out, depth + 1)
    else:
        raise ChannelError(f"cannot encode a value of type {type(value).__name__}")


_TRUNCATED = "truncated or malformed message frame"


class _Reader:
    __slots__ = ("buf", "pos", "size")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
        self.pos = 0
        self.size = len(self.buf)

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise ChannelError(_TRUNCATED)
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def read(self, layout: struct.Struct) -> tuple:
        """Unpack ``layout`` at the current position (bounds-checked) and move past it."""
        pos = self.pos
        if pos + layout.size > self.size:
            raise ChannelError(_TRUNCATED)
        self.pos = pos + layout.size
        return layout.unpack_from(self.buf, pos)


# Tag bytes as integers (indexing a memoryview of bytes yields ints).
_T_NONE, _T_TRUE, _T_FALSE, _T_INT, _T_FLOAT, _T_STR, _T_BYTES, _T_BITS, _T_ARRAY, _T_LIST, _T_DICT = b"NTFifsbBald"


def decode_value(reader: _Reader, depth: int = 0) -> Any:
    """Read one value written by :func:`encode_value`."""
    if depth > _MAX_DEPTH:
        raise ChannelError("message nests too deeply")
    pos = reader.pos
    if pos >= reader.size:
        raise ChannelError(_TRUNCATED)
    tag = reader.buf[pos]
    reader.pos = pos + 1
    if tag == _T_ARRAY:
        code = bytes(reader.take(2)).decode(errors="replace")
        dtype = _WIRE_DTYPES.get(code)
        if dtype is None:
            raise ChannelError("malformed array dtype in message frame")
        (ndim,) = reader.read(_U8)
        if ndim > 8:
            raise ChannelError("malformed array rank in message frame")
        shape = reader.read(_SHAPES[ndim])
        count = math.prod(shape)  # exact (Python ints): a huge claimed shape fails the bounds check
        nbytes = count * dtype.itemsize
        pos = reader.pos
        if nbytes > reader.size - pos:
            raise ChannelError(_TRUNCATED)
        reader.pos = pos + nbytes
        arr = np.frombuffer(reader.buf, dtype=dtype, count=count, offset=pos)
        native = _NATIVE_DTYPES[code]
        arr = arr.copy() if native == dtype else arr.astype(native)  # writable, owns its memory
        return arr.reshape(shape) if ndim != 1 else arr
    if tag == _T_BITS:
        (n,) = reader.read(_U64)
        raw = reader.take((n + 7) // 8)
        return BitArray.adopt(np.frombuffer(raw, dtype=np.uint8).copy(), n)
    if tag == _T_NONE:
        return None
    if tag == _T_TRUE:
        return True
    if tag == _T_FALSE:
        return False
    if tag == _T_INT:
        return reader.read(_I64)[0]
    if tag == _T_FLOAT:
        return reader.read(_F64)[0]
    if tag == _T_STR:
        (n,) = reader.read(_U32)
        try:
            return str(reader.take(n), "utf-8")
        except UnicodeDecodeError as exc:
            raise ChannelError("malformed string in message frame") from exc
    if tag == _T_BYTES:
        (n,) = reader.read(_U64)
        return bytes(reader.take(n))
    if tag == _T_LIST:
        (n,) = reader.read(_U32)
        return [decode_value(reader, depth + 1) for _ in range(n)]
    if tag == _T_DICT:
        (n,) = reader.read(_U32)
        out = {}
        for _ in range(n):
            key = decode_value(reader, depth + 1)
            if not isinstance(key, str):
                raise ChannelError("malformed dict key in message frame")
            out[key] = decode_value(reader, depth + 1)
        return out
    raise ChannelError(f"unknown value tag {bytes([tag])!r} in message frame")


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
    if reader.take(2) != MAGIC:
        raise ChannelError("message frame has a bad magic number")
    kind = decode_value(reader)
    fields = decode_value(reader)
    disclosed = decode_value(reader)
    if not isinstance(kind, str) or not isinstance(fields, dict):
        raise ChannelError("malformed message frame")
    if disclosed is not None and not isinstance(disclosed, BitArray):
        raise ChannelError("malformed disclosed-bits field in message frame")
    if reader.pos != reader.size:
        raise ChannelError("trailing bytes after message frame")
    return kind, fields, disclosed
