"""The post-processing's public randomness: the OS CSPRNG, or a seeded stream in the reproducible mode.

A round's public random choices (its block ID, Cascade's shuffle seed, LDPC's layout seed, the
verification hash keys, the Toeplitz seed) are announced on the channel, so they need not stay
secret; but the security proofs need them independent of everything Eve did before they were drawn
(a Toeplitz seed she knew in advance could shape her attack). So a node always draws them from the
OS (:mod:`secrets`).

For experiments that must repeat bit for bit, ``qkdstack distill --reproducible SEED`` and the Python
API's ``reproducible=SEED`` run their rounds inside :func:`reproducible`, which draws them from a
stream seeded with SEED instead (Python's Mersenne Twister: reproducible, *not* unpredictable). Keys of
that mode are not secret; every block made in it says so (``stats.public_randomness``). The mode is a
context variable set by those commands only: nothing in a node sets it, and a node's rounds run in
contexts of their own.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import uuid
from collections.abc import Coroutine, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

_T = TypeVar("_T")
_SEEDED: ContextVar[random.Random | None] = ContextVar("qkdstack_public_random", default=None)

SEEDED_LABEL = "seeded (reproducible mode): predictable, keys not secret"
"""What a block made in the reproducible mode records as its ``public_randomness``."""


def token_bytes(n: int) -> bytes:
    """``n`` public random bytes (the OS CSPRNG, or the reproducible mode's stream)."""
    rng = _SEEDED.get()
    return secrets.token_bytes(n) if rng is None else rng.randbytes(n)


def randbits(k: int) -> int:
    """A public random integer of ``k`` bits."""
    rng = _SEEDED.get()
    return secrets.randbits(k) if rng is None else rng.getrandbits(k)


def block_id() -> str:
    """A fresh block ID: a version-4 UUID from public random bytes."""
    return str(uuid.UUID(bytes=token_bytes(16), version=4))


def is_seeded() -> bool:
    """Whether the rounds of this context run in the reproducible mode."""
    return _SEEDED.get() is not None


def stream(seed: int) -> random.Random:
    """A reproducible stream of public randomness (for :func:`using`): several rounds draw from one."""
    return random.Random(seed)


@contextlib.contextmanager
def using(source: random.Random) -> Iterator[None]:
    """Draw the public randomness of the rounds run inside from ``source`` (a :func:`stream`)."""
    token = _SEEDED.set(source)
    try:
        yield
    finally:
        _SEEDED.reset(token)


def reproducible(seed: int) -> contextlib.AbstractContextManager[None]:
    """Draw the public randomness of the rounds run inside from a stream seeded with ``seed``."""
    return using(stream(seed))


async def run_using(source: random.Random | None, coro: Coroutine[Any, Any, _T]) -> _T:
    """Await ``coro`` with ``source`` as its public randomness (the OS's when None), in whatever thread it runs."""
    if source is None:
        return await coro
    with using(source):
        return await coro
