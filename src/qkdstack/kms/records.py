"""Records of the key store shared by its parts: states, chunk IDs, limits, reservations, errors.

No I/O here. The store (kms/store.py) re-exports every name, so ``from qkdstack.kms.store import ...``
keeps working.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qkdstack.errors import ConfigError, KeyStoreError

CHUNK_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:qkdstack:kms:chunk")
"""Namespace of the name-based (RFC 9562 version 5) chunk UUIDs."""

AVAILABLE, RESERVED, ERASED = 0, 1, 2
"""Chunk states."""
KEY_PENDING, KEY_RESERVED, KEY_DONE = 0, 1, 2
"""Key states: pending at the master site until the peer confirmed; reserved at the slave site."""




class KeyNotFound(KeyStoreError):
    """One or more requested keys do not exist here or were already delivered to this SAE."""


class KeyNotAuthorized(KeyStoreError):
    """The requesting SAE is not among the slave SAEs the keys were reserved for."""


class InsufficientKeys(KeyStoreError):
    """Not enough available key material in the requested pool."""


class ChunksTaken(KeyStoreError):
    """The peer asked for chunks this store has already reserved or erased (``chunk_ids``)."""

    def __init__(self, message: str, chunk_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.chunk_ids = list(chunk_ids)


class ChunksUnknown(KeyStoreError):
    """The peer asked for chunks of key blocks this store does not hold (``chunk_ids``)."""

    def __init__(self, message: str, chunk_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.chunk_ids = list(chunk_ids)


class StoreFull(KeyStoreError):
    """Adding the block would exceed the link's capacity."""


class BlockConflict(KeyStoreError):
    """A block ID that is already stored was added again with different key bytes or length."""


def chunk_id(link_id: str, block_id: str, index: int) -> str:
    """The deterministic UUID of chunk ``index`` of block ``block_id`` on ``link_id``."""
    return str(uuid.uuid5(CHUNK_NAMESPACE, f"{link_id}\0{block_id}\0{index}"))


def chunks_per_key(size_bits: int, chunk_bits: int) -> int:
    return max(1, math.ceil(size_bits / chunk_bits))


@dataclass(frozen=True)
class LinkLimits:
    """Capacity and water marks of one link, counted in chunks (all pools, not yet erased).

    ``capacity``: :meth:`KeyStore.add_block` refuses a block that would exceed it.
    ``high_water``: :meth:`KeyStore.is_full` turns true here; key generation pauses.
    ``low_water``: :meth:`KeyStore.is_low` turns true below it; generation should resume
    (the gap between the two marks gives hysteresis).
    """

    capacity: int = 1 << 20
    high_water: int = (1 << 20) - (1 << 16)
    low_water: int = 1 << 18

    def __post_init__(self) -> None:
        if not 0 <= self.low_water <= self.high_water <= self.capacity:
            raise ConfigError("link limits need 0 <= low_water <= high_water <= capacity")


@dataclass(frozen=True)
class Reservation:
    """Key ``key_id`` made of ``chunk_ids`` (in order), ``size_bits`` long. No key material."""

    key_id: str
    chunk_ids: tuple[str, ...]
    size_bits: int

    def to_wire(self) -> dict[str, Any]:
        return {"key_ID": self.key_id, "chunk_IDs": list(self.chunk_ids), "size": self.size_bits}

    @classmethod
    def from_wire(cls, obj: Any) -> Reservation:
        try:
            key_id = str(uuid.UUID(str(obj["key_ID"])))
            chunk_ids = tuple(str(uuid.UUID(str(c))) for c in obj["chunk_IDs"])
            size = int(obj["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyStoreError("malformed reservation in peer message") from exc
        if not chunk_ids or chunk_ids[0] != key_id or size <= 0 or size % 8:
            raise KeyStoreError("inconsistent reservation in peer message")
        return cls(key_id, chunk_ids, size)


@dataclass(frozen=True)
class DeliveredKey:
    """A key handed out: its ID and bytes (the bytes are kept out of the repr)."""

    key_id: str
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class LinkCounts:
    """Chunk counts of one link: ``available[pool]``, ``reserved``, ``erased``."""

    available: tuple[int, int]
    reserved: int
    erased: int

    @property
    def stored(self) -> int:
        return self.available[0] + self.available[1] + self.reserved
