"""Privacy amplification: compress the verified key to the secret length with Toeplitz hashing.

Alice draws a Toeplitz seed of ``n - 1`` bits from the OS CSPRNG (``secrets``), where
``n`` is the verified key length and ``m`` the output length the round computed from the
finite-key bound (Lim et al., PRA 89, 022307 (2014), Eq. (1)). The seed is public: she
sends it packed, and both parties compute ``[I | T] @ key mod 2`` (the modified Toeplitz
matrix of Hayashi and Tsurumaru, IEEE TIT 62, 2213 (2016)) with
:func:`qkdstack.protocol.toeplitz.toeplitz_hash`. These matrices with a uniform seed form
a 2-universal family, so by the leftover hash lemma the ``m`` output bits are
``eps_PA``-close to uniform and independent of Eve's information whenever ``m`` does not
exceed her min-entropy minus ``2 log2(1/eps_PA)`` (Tomamichel et al., Nat. Commun. 3, 634
(2012)); choosing ``m`` is the round's job, this stage only applies the hash.

Nothing here depends on a seeded generator: a fresh seed is drawn every call, so the same
key never meets the same hash twice.
"""

from __future__ import annotations

import asyncio
import operator
from dataclasses import dataclass

import numpy as np

from qkdstack.bits import BitArray
from qkdstack.errors import ProtocolAbort
from qkdstack.protocol import public_random
from qkdstack.protocol.channel import Channel
from qkdstack.protocol.toeplitz import ToeplitzPrecisionError, seed_length, toeplitz_hash

__all__ = ["AmplificationResult", "alice", "bob"]

STAGE = "amplification"


@dataclass(frozen=True, repr=False)
class AmplificationResult:
    """The final key (packed) and the length of the public seed used to make it."""

    key: BitArray
    seed_bits: int

    def __repr__(self) -> str:
        return f"AmplificationResult(key=<{len(self.key)} bits>, seed_bits={self.seed_bits})"


def _check(key: np.ndarray, output_length: int) -> tuple[np.ndarray, int]:
    key = np.asarray(key)
    if key.ndim != 1:
        raise ValueError("the key must be a one-dimensional 0/1 array")
    output_length = operator.index(output_length)
    if not 0 < output_length <= key.size:
        raise ProtocolAbort(
            STAGE, f"output length {output_length} bits is not in 1..{key.size} (the verified key length)"
        )
    return key, output_length


async def _hash(key: np.ndarray, seed: BitArray, output_length: int) -> BitArray:
    """The Toeplitz hash as a packed BitArray; an untrusted (inexact) FFT result aborts the round.

    The hash runs in a worker thread (its kernels release the GIL), so the event loop stays
    free meanwhile: a node keeps serving its key-delivery API, and in an in-memory round Bob
    starts hashing as soon as Alice has sent the seed instead of after her hash.
    """
    try:
        bits = await asyncio.to_thread(toeplitz_hash, key, seed.to_bits(), output_length)
    except ToeplitzPrecisionError as exc:
        raise ProtocolAbort(STAGE, str(exc)) from exc
    return BitArray.from_bits(bits)


async def alice(channel: Channel, key: np.ndarray, output_length: int) -> AmplificationResult:
    """Alice's side: draw and send a fresh Toeplitz seed from the CSPRNG, hash her key."""
    key, output_length = _check(key, output_length)
    seed_len = seed_length(key.size)
    seed = BitArray.from_bytes(public_random.token_bytes((seed_len + 7) // 8), seed_len)
    await channel.send(f"{STAGE}.seed", seed=seed, n_bits=key.size, output_length=output_length)
    return AmplificationResult(await _hash(key, seed, output_length), seed_len)


async def bob(channel: Channel, key: np.ndarray, output_length: int) -> AmplificationResult:
    """Bob's side: receive Alice's seed, check the lengths agree, hash his key."""
    key, output_length = _check(key, output_length)
    msg = await channel.recv(expect=f"{STAGE}.seed")
    seed = msg["seed"]
    if msg["n_bits"] != key.size or msg["output_length"] != output_length:
        raise ProtocolAbort(
            STAGE,
            f"Alice hashes {msg['n_bits']} bits to {msg['output_length']}, Bob {key.size} to {output_length}",
        )
    if not isinstance(seed, BitArray) or len(seed) != seed_length(key.size):
        raise ProtocolAbort(STAGE, "Alice's Toeplitz seed is malformed or of the wrong length")
    return AmplificationResult(await _hash(key, seed, output_length), len(seed))
