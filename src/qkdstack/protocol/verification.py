"""Error verification: check with a universal hash that Alice's and Bob's corrected keys agree.

After error correction Bob's key may still differ from Alice's (Cascade can miss an even
number of errors in every block). Alice draws a fresh hash key from the OS CSPRNG, sends
it (public) with her tag; Bob hashes his own key and answers ``ok`` or ``fail``. On a
mismatch both parties raise :class:`~qkdstack.errors.ProtocolAbort` — Bob only after
sending ``fail``, so Alice aborts too. The tag bits depend on the key and are sent as
``disclosed`` bits: the channel counts them as leakage, to be subtracted in privacy
amplification.

Hash choice
-----------
Poly1305 (Bernstein, "The Poly1305-AES message-authentication code", FSE 2005), keyed with a
fresh uniformly random 32-byte key ``(r, s)`` per verification. For a fixed ``s``, the
Poly1305 output is ``(h_r(msg) + s) mod 2^128`` with ``h_r`` the polynomial evaluation at
the clamped ``r`` modulo ``2^130 - 5``; Theorem 3.3 of that paper shows the family is
``epsilon``-almost-Delta-universal with ``epsilon = 8 * ceil(L / 16) / 2^106`` for messages
of at most ``L`` bytes. Two different keys therefore give equal tags (difference ``0``)
with probability at most that ``epsilon`` over the random ``r``, whatever the keys are.
For ``10**7`` key bits (``L ~ 1.25 MB``) one 128-bit tag gives ``epsilon ~ 8e-27``; when a
smaller ``eps_cor`` is asked for, ``t`` independent keys are used and their tags
concatenated, so the collision probability is ``epsilon**t``.

Poly1305 is chosen over a home-made polynomial hash in GF(2^64) or GF(2^128) because the
``cryptography`` package computes it in C (OpenSSL) at several GB/s, so verification costs
almost nothing next to Cascade and amplification, and its universality bound is proven
and standard. The message is ``len(key) as 8 little-endian bytes || packed key``, so keys of
different lengths (whose packed bytes can coincide after zero padding) never collide
trivially; a length mismatch is also checked directly.
"""

from __future__ import annotations

import hmac
import math
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.poly1305 import Poly1305

from qkdstack.bits import BitArray, pack
from qkdstack.errors import ConfigError, ProtocolAbort
from qkdstack.protocol import public_random
from qkdstack.protocol.channel import Channel

__all__ = ["TAG_BITS", "VerificationResult", "alice", "bob", "collision_bound", "tags_needed"]

STAGE = "verification"
TAG_BITS = 128
"""Bits in one Poly1305 tag."""
_KEY_BYTES = 32
_LENGTH_PREFIX = struct.Struct("<Q")


@dataclass(frozen=True)
class VerificationResult:
    """Outcome at one end: ``tag_bits`` disclosed, ``epsilon`` the collision bound achieved."""

    ok: bool
    tag_bits: int
    epsilon: float


def collision_bound(n_bits: int) -> float:
    """Poly1305 collision probability for one tag over a key of ``n_bits`` bits.

    ``8 * ceil(L / 16) / 2**106`` with ``L`` the message length in bytes (8-byte length
    prefix plus the packed key): Bernstein 2005, Theorem 3.3.
    """
    message_bytes = _LENGTH_PREFIX.size + (n_bits + 7) // 8
    return 8 * math.ceil(message_bytes / 16) / 2.0**106


def tags_needed(n_bits: int, eps_cor: float) -> int:
    """Smallest number ``t`` of independent tags with ``collision_bound(n_bits)**t <= eps_cor``."""
    if not 0.0 < eps_cor < 1.0:
        raise ConfigError(f"eps_cor must lie strictly between 0 and 1, got {eps_cor!r}")
    one = collision_bound(n_bits)
    t = max(1, math.ceil(math.log(eps_cor) / math.log(one)))
    while one**t > eps_cor:  # guard against rounding in the logarithms
        t += 1
    return t


def _message(key: np.ndarray) -> bytes:
    return _LENGTH_PREFIX.pack(key.size) + pack(key).tobytes()


def _tags(hash_keys: bytes, message: bytes) -> bytes:
    return b"".join(
        Poly1305.generate_tag(hash_keys[i : i + _KEY_BYTES], message) for i in range(0, len(hash_keys), _KEY_BYTES)
    )


def _check_key(key: np.ndarray) -> np.ndarray:
    key = np.asarray(key)
    if key.ndim != 1:
        raise ValueError("the key must be a one-dimensional 0/1 array")
    return key


async def alice(channel: Channel, key: np.ndarray, eps_cor: float) -> VerificationResult:
    """Alice's side: draw the hash keys, send them with her tags, learn Bob's verdict."""
    key = _check_key(key)
    t = tags_needed(key.size, eps_cor)
    hash_keys = public_random.token_bytes(_KEY_BYTES * t)
    tags = _tags(hash_keys, _message(key))
    await channel.send(
        f"{STAGE}.tag", disclosed=BitArray.from_bytes(tags), hash_keys=hash_keys, n_bits=key.size, tags=t
    )
    reply = await channel.recv(expect=f"{STAGE}.result")
    if reply["ok"] is not True:
        raise ProtocolAbort(STAGE, "Bob's key hash differs from Alice's: residual errors after error correction")
    return VerificationResult(ok=True, tag_bits=TAG_BITS * t, epsilon=collision_bound(key.size) ** t)


async def bob(channel: Channel, key: np.ndarray, eps_cor: float) -> VerificationResult:
    """Bob's side: hash his key with Alice's hash keys, compare in constant time, answer ok/fail."""
    key = _check_key(key)
    t = tags_needed(key.size, eps_cor)
    msg = await channel.recv(expect=f"{STAGE}.tag")
    hash_keys, n_alice, t_alice, their_tags = msg["hash_keys"], msg["n_bits"], msg["tags"], msg.disclosed
    well_formed = (
        isinstance(hash_keys, bytes)
        and isinstance(t_alice, int)
        and t_alice >= t
        and len(hash_keys) == _KEY_BYTES * t_alice
        and their_tags is not None
        and len(their_tags) == TAG_BITS * t_alice
    )
    if not well_formed:
        await channel.send(f"{STAGE}.result", ok=False)
        raise ProtocolAbort(STAGE, "Alice's verification message is malformed or uses too few tags for eps_cor")
    ours = _tags(hash_keys, _message(key))
    ok = hmac.compare_digest(ours, their_tags.to_bytes()) and n_alice == key.size
    await channel.send(f"{STAGE}.result", ok=ok)
    if not ok:
        raise ProtocolAbort(STAGE, "Bob's key hash differs from Alice's: residual errors after error correction")
    return VerificationResult(ok=True, tag_bits=TAG_BITS * t_alice, epsilon=collision_bound(key.size) ** t_alice)
