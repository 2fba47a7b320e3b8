"""Wegman–Carter message authentication with Poly1305, keyed from QKD key material.

Construction
------------
Poly1305 (Bernstein, "The Poly1305-AES message-authentication code", FSE 2005) with key ``(r, s)``
computes ``tag = (h_r(m) + s) mod 2^128`` where ``h_r(m)`` is the evaluation at the clamped point
``r`` of the polynomial whose coefficients are the padded 16-byte blocks of ``m``, modulo
``p = 2^130 - 5``. Bernstein (2005, Theorem 3.3) shows that for every pair of distinct messages of at
most ``L`` bytes and every ``delta``, ``Pr_r[h_r(m) - h_r(m') = delta (mod 2^128)] <= 8*ceil(L/16)/2^106``:
``h`` is ``epsilon``-almost-Delta-universal over the group ``Z_{2^128}`` (r has 106 free bits after
clamping). Adding a *uniform, secret, never reused* ``s`` is a one-time pad in that group, so
``(r, s) -> h_r(m) + s`` is ``epsilon``-almost-strongly-universal: the Wegman–Carter MAC (Wegman and
Carter, JCSS 22, 265 (1981)). Here ``s`` is not AES(nonce) as in Poly1305-AES but fresh QKD key, so the
security is information-theoretic, and the tag is computed by ``cryptography``'s C Poly1305.

Key recycling
-------------
Portmann ("Key recycling in authentication", IEEE TIT 60(7), 4383 (2014)) proves that with an
``epsilon``-almost-strongly-universal family whose output is one-time padded, the *hash key* ``r`` may be
reused for many tags while only the pad is consumed per tag; the composed protocol is
``rounds*(messages*epsilon + epsilon')``-secure (``epsilon'`` is the
distance of the initial key from uniform). His proof is written for XOR pads; it uses only that
the pad is a uniform element of the group in which the hash differences are bounded, so it carries
over to Poly1305's ``Z_{2^128}``. The reuse is allowed only while every verification has
succeeded: a rejected forgery tells the adversary something about ``r``, so after any failure the
verifier discards ``r`` and takes a fresh one (:mod:`qkdstack.auth.pool` enforces this).

Key bits
--------
Per tag: one 128-bit pad ``s``. Per hash key: 128 bits of key material (Poly1305 clamps 22 of them
away, which is what the ``2^106`` in the bound accounts for).

The transcript MAC
------------------
:class:`TranscriptMac` observes every frame of a round on a
:class:`~qkdstack.transport.channel.Channel` and MACs the *whole* transcript once per direction, so a
round costs two 128-bit pads instead of a tag per message (Kiktenko et al., arXiv:1903.10237). See
:func:`encode_transcript` for the exact encoding.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives.poly1305 import Poly1305

from qkdstack.errors import AuthenticationError, ConfigError

TAG_BYTES = 16
HASH_KEY_BYTES = 16
PAD_BYTES = 16
_MOD = 1 << 128

ALICE = "alice"
BOB = "bob"
A_TO_B = "a2b"
B_TO_A = "b2a"
DIRECTIONS = (A_TO_B, B_TO_A)


def poly1305_epsilon(message_bytes: int) -> float:
    """Forgery probability of one Poly1305 Wegman–Carter tag on a message of ``message_bytes`` bytes.

    ``8*ceil(L/16)/2^106`` (Bernstein 2005, Theorem 3.3): the bound on
    ``Pr_r[h_r(m) - h_r(m') = delta]`` that a one-time-padded tag turns into the substitution
    (forgery) probability.
    """
    if message_bytes < 0:
        raise ConfigError("message_bytes must be non-negative.")
    return 8 * max(1, math.ceil(message_bytes / 16)) / 2.0**106


def _check_key(name: str, value: bytes, n: int) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != n:
        raise ConfigError(f"{name} must be {n} bytes.")
    return bytes(value)


class WegmanCarterMac:
    """A Poly1305 hash keyed with a (recyclable) hash key ``r``; each tag needs a fresh 16-byte pad.

    ``tag(m, pad) = (h_r(m) + pad) mod 2^128``, little-endian, exactly ``Poly1305(r || pad)(m)``.
    The key never appears in ``repr``.
    """

    __slots__ = ("_r",)

    def __init__(self, hash_key: bytes) -> None:
        self._r = _check_key("hash_key", hash_key, HASH_KEY_BYTES)

    def __repr__(self) -> str:
        return "WegmanCarterMac(<hash key hidden>)"

    def hash(self, chunks: bytes | Iterator[bytes] | list[bytes]) -> int:
        """``h_r(m) mod 2^128`` of the concatenation of ``chunks`` (Poly1305 with a zero pad)."""
        p = Poly1305(self._r + bytes(PAD_BYTES))
        if isinstance(chunks, bytes | bytearray | memoryview):
            p.update(chunks)
        else:
            for c in chunks:
                p.update(c)
        return int.from_bytes(p.finalize(), "little")

    def tag(self, message: bytes | list[bytes], pad: bytes) -> bytes:
        """The 16-byte tag of ``message`` (bytes or a list of chunks) with one-time ``pad``."""
        s = int.from_bytes(_check_key("pad", pad, PAD_BYTES), "little")
        return ((self.hash(message) + s) % _MOD).to_bytes(TAG_BYTES, "little")

    def verify(self, message: bytes | list[bytes], pad: bytes, tag: bytes) -> bool:
        """Whether ``tag`` is the tag of ``message`` under ``pad`` (constant-time comparison)."""
        expected = self.tag(message, pad)
        return hmac.compare_digest(expected, bytes(tag)) if len(tag) == TAG_BYTES else False


def other(role: str) -> str:
    """The other party's role."""
    return BOB if role == ALICE else ALICE


def direction_of(role: str, observed: str) -> str:
    """The absolute direction (``"a2b"``/``"b2a"``) of a frame ``observed`` as ``"sent"``/``"received"``."""
    if role not in (ALICE, BOB):
        raise ConfigError(f"role must be 'alice' or 'bob', not {role!r}.")
    if observed not in ("sent", "received"):
        raise ConfigError(f"direction must be 'sent' or 'received', not {observed!r}.")
    return A_TO_B if (role == ALICE) == (observed == "sent") else B_TO_A


_TRANSCRIPT_LABEL = b"qkdstack/transcript/v1"


class TranscriptMac:
    """Records one round's transcript, as a frame observer of a Channel, for a single MAC per direction.

    Attach with ``channel.add_observer(tm.observe)`` (or :meth:`attach`) *before* the round's first
    message and detach before the tags are exchanged. Both parties record the same transcript
    independently of which one they are: frames are filed under their absolute direction
    (A->B or B->A), so Alice's "sent" and Bob's "received" land in the same stream.

    Encoding (:func:`encode_transcript`): a label, the link and round identifiers, then the A->B
    frames in order and then the B->A frames in order, each frame prefixed by its direction byte,
    its index within its direction and its length (8-byte big-endian). Any change - a flipped bit, a
    truncated, dropped, injected, duplicated (replayed) or reordered frame, or a frame moved to the other
    direction - changes the encoding. Frames of the two directions are kept as two ordered streams
    rather than one interleaving so that two messages sent concurrently in opposite directions, which
    the two ends may observe in different orders, do not make honest transcripts differ; within a
    direction the order is bound by the index, and across directions by the protocol's causality
    (each party's messages are computed from what it received).
    """

    def __init__(self, role: str, link_id: str, round_id: int) -> None:
        direction_of(role, "sent")  # validates role
        self.role = role
        self.link_id = link_id
        self.round_id = int(round_id)
        self._frames: dict[str, list[bytes]] = {A_TO_B: [], B_TO_A: []}
        self._channel = None
        self.closed = False

    def __repr__(self) -> str:
        n = {d: len(f) for d, f in self._frames.items()}
        return f"TranscriptMac(role={self.role!r}, round_id={self.round_id}, frames={n})"

    def observe(self, direction: str, frame: bytes) -> None:
        """Frame observer: file ``frame`` under its absolute direction."""
        if self.closed:
            raise AuthenticationError("a frame crossed the channel after the transcript was closed")
        self._frames[direction_of(self.role, direction)].append(bytes(frame))

    def attach(self, channel: Any) -> None:
        """Start observing ``channel``."""
        channel.add_observer(self.observe)
        self._channel = channel

    def detach(self) -> None:
        """Stop observing and freeze the transcript."""
        if self._channel is not None:
            self._channel.remove_observer(self.observe)
            self._channel = None
        self.closed = True

    @property
    def frame_count(self) -> dict[str, int]:
        return {d: len(f) for d, f in self._frames.items()}

    @property
    def byte_length(self) -> int:
        """Length of the encoded transcript in bytes (the ``L`` of the forgery bound)."""
        return sum(len(c) for c in self.chunks())

    def chunks(self) -> list[bytes]:
        """The encoded transcript as a list of byte strings (see :func:`encode_transcript`)."""
        return encode_transcript(self.link_id, self.round_id, self._frames[A_TO_B], self._frames[B_TO_A])

    def tag(self, mac: WegmanCarterMac, pad: bytes) -> bytes:
        """The Wegman–Carter tag of the transcript."""
        return mac.tag(self.chunks(), pad)

    def verify(self, mac: WegmanCarterMac, pad: bytes, tag: bytes) -> bool:
        return mac.verify(self.chunks(), pad, tag)

    def digest(self) -> bytes:
        """SHA-256 of the encoded transcript: what the bootstrap signatures (PKI, OpenPGP) sign."""
        h = hashlib.sha256()
        for c in self.chunks():
            h.update(c)
        return h.digest()

    def epsilon(self) -> float:
        """Forgery probability of one tag on this transcript (:func:`poly1305_epsilon`)."""
        return poly1305_epsilon(self.byte_length)


def encode_transcript(link_id: str, round_id: int, a2b: list[bytes], b2a: list[bytes]) -> list[bytes]:
    """Injective encoding of a round transcript as chunks.

    ``label || u16 len(link) || link || i64 round_id || u64 n_a2b || u64 n_b2a`` followed, for each frame,
    by ``dir (1 byte: 1 = A->B, 2 = B->A) || u64 index || u64 length || frame``.
    """
    link = link_id.encode()
    out = [_TRANSCRIPT_LABEL, struct.pack(">H", len(link)), link, struct.pack(">qQQ", round_id, len(a2b), len(b2a))]
    for code, frames in ((1, a2b), (2, b2a)):
        for i, f in enumerate(frames):
            out.append(struct.pack(">BQQ", code, i, len(f)))
            out.append(f)
    return out
