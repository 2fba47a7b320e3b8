"""One-time-pad mode: information-theoretically secure encryption with QKD key.

Encryption is Vernam's cipher, ``c = m XOR k`` with a fresh, uniformly random pad ``k``
as long as the message and never reused: perfectly secret (Shannon, *Communication theory
of secrecy systems*, Bell Syst. Tech. J. 28, 656 (1949), Theorem 6), up to the QKD key's
ε_sec. The ciphertext is authenticated with a Wegman–Carter MAC (Wegman and Carter,
*New hash functions and their use in authentication and set equality*, JCSS 22, 265
(1981)): Poly1305 with a one-time key (r, s) taken from QKD key, ``tag = (poly_r(c) + s)
mod 2^128``. Poly1305 is ε-almost-Δ-universal with ε = 8⌈L/16⌉/2^106 for L-byte inputs
(Bernstein, *The Poly1305-AES message-authentication code*, FSE 2005, Theorem 3.3), and
with r and s used once, a forger succeeds with probability at most ε whatever its
computing power: authentication is information-theoretic too.

Key consumed per message of n bytes: n bytes of pad plus 32 bytes of MAC key, fetched in
ONE key request (ETSI 014 ``enc_keys`` is all or none): when the source cannot cover the
whole message, nothing is fetched and :class:`~qkdstack.errors.KeyStoreError` is raised.

The MAC is the authentication layer's :class:`~qkdstack.auth.wegman_carter.WegmanCarterMac`
used with a fresh hash key r *and* a fresh pad s per message (:data:`ONE_TIME_MAC`), so no
key-recycling argument is needed; any :class:`OneTimeMac` can be passed instead.

:class:`PadStream` is the streaming form used by the tunnel's ``--otp`` mode: an ordered
queue of QKD keys consumed byte by byte, never twice, with consumed bytes overwritten.
"""

from __future__ import annotations

import hmac
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from qkdstack.apps.keysource import KeySource, QKDKey, plan_request, source_limits
from qkdstack.auth.wegman_carter import HASH_KEY_BYTES, PAD_BYTES, TAG_BYTES, WegmanCarterMac
from qkdstack.errors import AuthenticationError, ChannelError, KeyStoreError

TAG_LEN = TAG_BYTES


class OneTimeMac(Protocol):
    """An information-theoretic one-time MAC: a key of ``key_bytes`` authenticates one message."""

    key_bytes: int
    tag_bytes: int

    def tag(self, key: bytes, message: bytes) -> bytes: ...


class WegmanCarterOneTime:
    """Wegman–Carter (Poly1305) with a one-time hash key r = key[:16] and pad s = key[16:32]."""

    key_bytes = HASH_KEY_BYTES + PAD_BYTES
    tag_bytes = TAG_BYTES

    def tag(self, key: bytes, message: bytes) -> bytes:
        return WegmanCarterMac(key[:HASH_KEY_BYTES]).tag(message, key[HASH_KEY_BYTES : self.key_bytes])


ONE_TIME_MAC = WegmanCarterOneTime()


def xor_bytes(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bytes:
    """Byte-wise XOR of two equal-length strings (big-integer XOR: C speed, no Python loop)."""
    n = len(a)
    if len(b) != n:
        raise ValueError("xor_bytes needs equal lengths")
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


@dataclass(frozen=True)
class OtpMessage:
    """A one-time-pad ciphertext: the IDs of the keys it consumed, the ciphertext and the tag."""

    key_ids: tuple[str, ...]
    ciphertext: bytes = field(repr=False)
    tag: bytes = field(repr=False)

    def authenticated_data(self) -> bytes:
        """What the tag covers: key IDs, lengths and the ciphertext (encrypt-then-MAC)."""
        ids = b"".join(struct.pack(">H", len(k.encode())) + k.encode() for k in self.key_ids)
        return b"qkdstack otp v1" + struct.pack(">HQ", len(self.key_ids), len(self.ciphertext)) + ids + self.ciphertext

    def to_bytes(self) -> bytes:
        """Wire form: u16 count, (u16 len, id)*, u64 len, ciphertext, tag."""
        ids = b"".join(struct.pack(">H", len(k.encode())) + k.encode() for k in self.key_ids)
        head = struct.pack(">H", len(self.key_ids)) + ids + struct.pack(">Q", len(self.ciphertext))
        return head + self.ciphertext + self.tag

    @classmethod
    def from_bytes(cls, data: bytes, tag_bytes: int = TAG_LEN) -> OtpMessage:
        try:
            (count,) = struct.unpack_from(">H", data, 0)
            pos, ids = 2, []
            for _ in range(count):
                (n,) = struct.unpack_from(">H", data, pos)
                ids.append(data[pos + 2 : pos + 2 + n].decode())
                pos += 2 + n
            (clen,) = struct.unpack_from(">Q", data, pos)
            pos += 8
        except (struct.error, UnicodeDecodeError):
            raise ChannelError("malformed one-time-pad message") from None
        if len(data) != pos + clen + tag_bytes:
            raise ChannelError("malformed one-time-pad message (length mismatch)")
        return cls(tuple(ids), data[pos : pos + clen], data[pos + clen :])

    def __repr__(self) -> str:
        return f"OtpMessage(keys={len(self.key_ids)}, ciphertext_bytes={len(self.ciphertext)})"


def key_bytes_needed(message_len: int, mac: OneTimeMac = ONE_TIME_MAC) -> int:
    """QKD key bytes one message of ``message_len`` bytes consumes: pad plus MAC key."""
    return message_len + mac.key_bytes


def _split(keys: Sequence[QKDKey], message_len: int, mac: OneTimeMac) -> tuple[bytes, bytes]:
    material = b"".join(k.key for k in keys)
    need = key_bytes_needed(message_len, mac)
    if len(material) < need:
        raise KeyStoreError(f"the keys cover {len(material)} bytes, the message needs {need}")
    return material[: mac.key_bytes], material[mac.key_bytes : need]


async def otp_encrypt(source: KeySource, plaintext: bytes, mac: OneTimeMac = ONE_TIME_MAC) -> OtpMessage:
    """Encrypt ``plaintext`` with fresh QKD key (master side); refuses, consuming nothing, if short of key."""
    max_bits, max_keys = source_limits(source)
    number, size_bits = plan_request(key_bytes_needed(len(plaintext), mac), max_bits, max_keys)
    keys = await source.get_new_keys(number, size_bits)
    mac_key, pad = _split(keys, len(plaintext), mac)
    msg = OtpMessage(tuple(k.key_id for k in keys), xor_bytes(plaintext, pad), b"")
    return OtpMessage(msg.key_ids, msg.ciphertext, mac.tag(mac_key, msg.authenticated_data()))


async def otp_decrypt(source: KeySource, message: OtpMessage, mac: OneTimeMac = ONE_TIME_MAC) -> bytes:
    """Verify and decrypt (slave side); a bad tag raises AuthenticationError and yields nothing.

    The keys are consumed either way (a key once fetched is never handed out again).
    """
    keys = await source.get_keys_by_id(list(message.key_ids))
    mac_key, pad = _split(keys, len(message.ciphertext), mac)
    if not hmac.compare_digest(mac.tag(mac_key, message.authenticated_data()), message.tag):
        raise AuthenticationError("one-time-pad message failed Wegman–Carter authentication")
    return xor_bytes(message.ciphertext, pad)


class PadStream:
    """An ordered stream of one-time-pad bytes built from QKD keys, each byte used once.

    Both ends append the same keys in the same order (the order the key IDs were announced
    on the link), so ``take(n)`` yields the same bytes at both ends. Consumed bytes are
    overwritten with zeros in the buffer (best effort: Python may hold other copies).
    """

    def __init__(self) -> None:
        self._chunks: deque[bytearray] = deque()
        self._offset = 0
        self.available = 0
        self.consumed = 0

    def append(self, keys: Sequence[QKDKey]) -> None:
        for k in keys:
            self._chunks.append(bytearray(k.key))
            self.available += len(k.key)

    def take(self, n: int) -> bytes:
        """The next ``n`` pad bytes; KeyStoreError (nothing taken) if fewer are available."""
        if n > self.available:
            raise KeyStoreError(f"one-time pad exhausted: {n} bytes needed, {self.available} available")
        out = bytearray()
        while len(out) < n:
            chunk = self._chunks[0]
            k = min(n - len(out), len(chunk) - self._offset)
            out += chunk[self._offset : self._offset + k]
            chunk[self._offset : self._offset + k] = bytes(k)
            self._offset += k
            if self._offset == len(chunk):
                self._chunks.popleft()
                self._offset = 0
        self.available -= n
        self.consumed += n
        return bytes(out)

    def discard(self) -> int:
        """Erase everything left (at connection end); returns the bytes discarded."""
        left = self.available
        for chunk in self._chunks:
            chunk[:] = bytes(len(chunk))
        self._chunks.clear()
        self._offset = 0
        self.available = 0
        return left
