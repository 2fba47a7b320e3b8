"""The key management entity (KME) of one site: the service layer shared by ETSI 014 and in-unit delivery.

A :class:`KME` owns the site's :class:`~qkdstack.kms.store.KeyStore` and talks to the peer site's KME
over a :class:`PeerLink` (an authenticated request/response link; the node provides the real one,
:class:`InProcessPeerLink` connects two KMEs in one process). Every check of the ETSI GS QKD 014
semantics (number and size limits, extensions, who may fetch which key) lives here, so the REST
server (kms/etsi014.py) and the Unix-socket server (kms/local.py) only translate.

Key ID agreement (docs/kms.md has the message formats):

* The chunks of every key block have the same IDs at both sites (kms/store.py).
* Chunks with an even index are pool 0, odd are pool 1. The KME whose ID sorts first serves its
  own master SAEs from pool 0, the other from pool 1. Each pool has exactly one site that chooses
  from it, so concurrent ``enc_keys`` calls at both sites can never pick the same chunk.
* ``enc_keys`` at the master's site: (1) reserve chunks locally (state *pending*, one
  transaction); (2) ask the peer to reserve exactly these chunks for the named slave SAE(s)
  (``kms.reserve``, one transaction there, idempotent); (3) only after the peer confirmed, read
  the key bytes and erase them (one transaction) and answer the SAE.
* If the peer refuses, nothing left the site: the reservation is released. If the outcome is
  unknown (timeout, link failure, crash), the pending keys are erased at both sites with
  ``kms.discard`` (retried by :meth:`KME.resync` until the peer acknowledges): safe whatever the
  peer did, and the two stores agree again.
* If the peer does not hold the key block of a chunk (code ``unknown``: the block was stored at
  this site only), this site drops that block's unused chunks (once it is ``orphan_grace_s`` old)
  and retries with other chunks, so one such block costs its own keys only.

Rollback check: a key store restored from an older copy (a backup, a snapshot) holds again keys it
has already delivered, and as a slave it would hand them out a second time. Each site's count of
erased chunks only ever grows, so the two KMEs show each other that count (``kms.hello`` when the
link comes up, ``kms.sync`` soon after every local delivery, at most every ``sync_interval_s``) and
each keeps the highest count the peer has shown (``KeyStore.peer_mark``, in its own store). A peer
showing less than its mark was rolled back: it is told so and stops delivering keys
(:attr:`KME.rolled_back`, every request 503) until an operator intervenes; and after a restart a site
delivers keys to its slave SAEs only once the peer has confirmed its count. Not caught: deliveries of
the last ``sync_interval_s`` before the copy was taken, and both sites restored alike.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from qkdstack.errors import ChannelError, ConfigError, QKDError
from qkdstack.kms.store import (
    ChunksTaken,
    ChunksUnknown,
    InsufficientKeys,
    KeyNotAuthorized,
    KeyNotFound,
    KeyStore,
    KeyStoreError,
    Reservation,
    chunks_per_key,
)

log = logging.getLogger(__name__)

MSG_NOT_FOUND = "one or more keys specified are not found on KME"
PROOF_EXTENSION = "qkdstack_proof"
"""The optional extension asking for each key's proof (``extension_optional: [{"qkdstack_proof": true}]``)."""


PROOF_FIELDS = ("block_id", "length_bits", "eps_sec", "eps_cor", "bound", "qber_key", "qber_test", "leakage_bits",
                "finite_key", "provenance")
"""The fields of a round's proof (``KeyBlock.to_dict()`` with the node's provenance) kept with its key block:
all but the bulky ones (detection counts, the leakage ledger, stage timings, statistics)."""


def key_proof(block_meta: dict[str, Any]) -> dict[str, Any]:
    """The part of a round's proof (``KeyBlock.to_dict()``) stored with its block and returned with its keys."""
    kept = {name: block_meta[name] for name in PROOF_FIELDS if name in block_meta}
    return json.loads(json.dumps(kept, default=str))  # JSON values only, as data/rounds.jsonl writes them


def wants_proof(extensions: Sequence[Any] | None) -> bool:
    """Whether ``extension_optional`` (a list of objects; a bare name is taken too) asks for the proof."""
    return any(
        (isinstance(e, dict) and e.get(PROOF_EXTENSION) not in (None, False)) or e == PROOF_EXTENSION
        for e in extensions or ()
    )


class KMEError(QKDError):
    """A request refused with an ETSI GS QKD 014 status (400, 401, 503) and an Error body."""

    def __init__(self, status: int, message: str, details: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = list(details)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class PeerLink(Protocol):
    """An authenticated request/response link to the peer KME.

    ``request`` sends one JSON-compatible dict and returns the peer's answer (the dict the peer's
    :meth:`KME.handle_peer` returned). It raises :class:`~qkdstack.errors.ChannelError` (or
    ``OSError`` / ``asyncio.TimeoutError``) when the outcome is unknown.
    """

    async def request(self, message: dict[str, Any]) -> dict[str, Any]: ...


class InProcessPeerLink:
    """A :class:`PeerLink` to a KME in the same process (tests, simulations, benchmarks).

    Messages go through a JSON round trip so nothing is shared by reference. ``down = True``
    makes requests fail before delivery; ``lose_replies = True`` delivers the request but loses
    the answer (the outcome-unknown case).
    """

    def __init__(self, remote: KME, local_kme_id: str) -> None:
        self.remote = remote
        self.local_kme_id = local_kme_id
        self.down = False
        self.lose_replies = False

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            raise ChannelError("peer link is down")
        answer = await self.remote.handle_peer(self.local_kme_id, json.loads(json.dumps(message)))
        if self.lose_replies:
            raise ChannelError("peer link lost the answer")
        return json.loads(json.dumps(answer))


def link_pair(a: KME, b: KME) -> tuple[InProcessPeerLink, InProcessPeerLink]:
    """Two in-process links: the first for ``a`` (to ``b``), the second for ``b`` (to ``a``)."""
    return InProcessPeerLink(b, a.config.kme_id), InProcessPeerLink(a, b.config.kme_id)


@dataclass(frozen=True)
class KMEConfig:
    """What a KME needs to know.

    ``sae_ids``: the SAEs at this site (the subject CN of their client certificates).
    ``link_id``: the store's link name; by default ``"<lower id>|<higher id>"`` (the same at both sites).
    Sizes are in bits; ``key_size`` is the default size and also the store's chunk size.
    """

    kme_id: str
    peer_kme_id: str
    sae_ids: frozenset[str] = field(default_factory=frozenset)
    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 8192
    max_key_per_request: int = 128
    max_SAE_ID_count: int = 8  # noqa: N815  (the specification's name)
    peer_timeout_s: float = 10.0
    link_id: str = ""
    orphan_grace_s: float = 30.0
    """A key block the peer does not hold is dropped once it has been stored here this long (seconds)."""
    sync_interval_s: float = 0.2
    """Shortest time between two ``kms.sync`` messages (the rollback check's window, seconds)."""

    def __post_init__(self) -> None:
        if not self.kme_id or not self.peer_kme_id or self.kme_id == self.peer_kme_id:
            raise ConfigError("kme_id and peer_kme_id must be non-empty and different")
        object.__setattr__(self, "sae_ids", frozenset(self.sae_ids))
        for name in ("key_size", "min_key_size", "max_key_size"):
            v = getattr(self, name)
            if v <= 0 or v % 8:
                raise ConfigError(f"{name} must be a positive multiple of 8 bits, got {v}")
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ConfigError("key_size must lie between min_key_size and max_key_size")
        if self.max_key_per_request < 1 or self.max_SAE_ID_count < 0:
            raise ConfigError("max_key_per_request must be >= 1 and max_SAE_ID_count >= 0")
        if not self.orphan_grace_s >= 0:
            raise ConfigError("orphan_grace_s must be >= 0 seconds")
        if not self.link_id:
            object.__setattr__(self, "link_id", "|".join(sorted((self.kme_id, self.peer_kme_id))))

    @property
    def own_pool(self) -> int:
        """The pool this site's master SAEs are served from."""
        return 0 if self.kme_id < self.peer_kme_id else 1


def check_key_request(c: Any, number: Any, size: Any, extension_mandatory: Sequence[Any] | None,
                      slaves: Sequence[str]) -> tuple[int, int]:
    """ETSI 014 Get key's checks (section 5.4): ``(number, size)`` with their defaults, or KMEError 400.

    ``c`` is a KME's configuration (a link's :class:`KMEConfig` or a network site's): ``key_size``,
    ``min_key_size``, ``max_key_size``, ``max_key_per_request``, ``max_SAE_ID_count``. No
    ``extension_mandatory`` is supported, so any is refused.
    """
    number = 1 if number is None else number
    size = c.key_size if size is None else size
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= c.max_key_per_request:
        raise KMEError(400, f"number shall be between 1 and max_key_per_request ({c.max_key_per_request})")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 8:
        raise KMEError(400, "size shall be a multiple of 8")
    if not c.min_key_size <= size <= c.max_key_size:
        raise KMEError(400, f"size shall be between min_key_size ({c.min_key_size}) and max_key_size "
                       f"({c.max_key_size})")
    if extension_mandatory:
        names = sorted({str(k) for ext in extension_mandatory if isinstance(ext, dict) for k in ext})
        raise KMEError(400, "not all extension_mandatory parameters are supported",
                       [{"extension_mandatory_unsupported": names}])
    if len(set(slaves)) != len(slaves):
        raise KMEError(400, "slave SAE IDs must be distinct")
    if len(slaves) - 1 > c.max_SAE_ID_count:
        raise KMEError(400, f"at most max_SAE_ID_count ({c.max_SAE_ID_count}) additional slave SAE IDs")
    return number, size


def status_document(c: Any, target_kme_id: str, master_sae: str, slave_sae: str, *, stored_key_count: int,
                    max_key_count: int) -> dict[str, Any]:
    """ETSI 014 Status (section 6.1) for a KME whose configuration is ``c`` (a link's or a network site's)."""
    return {
        "source_KME_ID": c.kme_id,
        "target_KME_ID": target_kme_id,
        "master_SAE_ID": master_sae,
        "slave_SAE_ID": slave_sae,
        "key_size": c.key_size,
        "stored_key_count": stored_key_count,
        "max_key_count": max_key_count,
        "max_key_per_request": c.max_key_per_request,
        "max_key_size": c.max_key_size,
        "min_key_size": c.min_key_size,
        "max_SAE_ID_count": c.max_SAE_ID_count,
    }


def _key_entry(key_id: str, key: bytes, proofs: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"key_ID": key_id, "key": base64.b64encode(key).decode("ascii")}
    if proofs is not None:
        entry["key_extension"] = {PROOF_EXTENSION: proofs.get(key_id, [])}
    return entry


class KME:
    """One site's key management entity. Attach the peer with :meth:`attach_peer`."""

    TAKE_ATTEMPTS = 8
    """enc_keys attempts when the peer reports chunks as already used (this store lost transactions)."""

    def __init__(self, config: KMEConfig, store: KeyStore) -> None:
        if store.chunk_bits != config.key_size:
            raise ConfigError("the key store's chunk size must equal the KME's key_size")
        self.config = config
        self.store = store
        self.peer: PeerLink | None = None
        self.remote_sae_ids: frozenset[str] = frozenset()
        self._background: set[asyncio.Task] = set()
        self._in_flight: set[str] = set()  # key IDs between local reservation and the peer's answer
        self.rolled_back: str | None = None
        """Set when the peer showed that this site's key store is older than before: delivery stops."""
        self._confirmed = False  # the peer has confirmed this store's erased count since start
        self._sync_task: asyncio.Task | None = None
        self._sync_again = False
        self._trim_task: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"KME({self.config.kme_id!r}, peer={self.config.peer_kme_id!r})"

    # -- wiring ----------------------------------------------------------------------------

    async def attach_peer(self, link: PeerLink) -> None:
        """Use ``link`` for the peer KME: exchange SAE lists (``kms.hello``) and resolve pending keys.

        Call it whenever the authenticated node link (re)connects. Raises ChannelError if the
        peer does not answer or is not the configured peer KME.
        """
        self.peer = link
        answer = await self._peer_request(
            {"type": "kms.hello", "kme_ID": self.config.kme_id, "SAE_IDs": sorted(self.config.sae_ids),
             **await self._marks()}
        )
        if answer.get("code") == "rolled_back":
            self.peer = None
            await self._check_marks(answer)  # sets rolled_back when it names this site
            raise ChannelError(f"the peer KME refused the link: {answer.get('error')}")
        if answer.get("kme_ID") != self.config.peer_kme_id or not answer.get("ok"):
            self.peer = None
            raise ChannelError(f"the peer link does not lead to KME {self.config.peer_kme_id!r}")
        refusal = await self._check_marks(answer)
        if refusal is not None:
            self.peer = None
            raise ChannelError(refusal["error"])
        self._confirmed = True
        self.remote_sae_ids = frozenset(str(s) for s in answer.get("SAE_IDs", []))
        await self.resync()

    # -- rollback check ----------------------------------------------------------------------

    async def _marks(self) -> dict[str, int]:
        """This site's erased-chunk count and the highest count the peer has shown (see the module doc)."""
        counts = await self.store.counts(self.config.link_id)
        return {"erased": counts.erased, "peer_erased_seen": await self.store.peer_mark(self.config.link_id)}

    async def _check_marks(self, theirs: dict[str, Any]) -> dict[str, Any] | None:
        """Compare the peer's counts with ours; raise our mark of the peer. Returns a refusal, or None.

        ``theirs["erased"]`` below our mark: the peer's store went back. ``theirs["peer_erased_seen"]``
        above our own count: ours did (then :attr:`rolled_back` is set and delivery stops here).
        """
        try:
            their_erased = int(theirs["erased"])
            seen_here = int(theirs["peer_erased_seen"])
        except (KeyError, TypeError, ValueError):
            return {"ok": False, "error": "the peer KME did not show its key store's counts"}
        c = self.config
        mine = await self._marks()
        if seen_here > mine["erased"]:
            self.rolled_back = (
                f"key delivery at {c.kme_id} is stopped: its key store has erased {mine['erased']} chunks but "
                f"the peer KME {c.peer_kme_id} has already seen {seen_here}, so the store was restored from an "
                "older copy and could deliver keys a second time (see docs/kms.md, 'Rollback')"
            )
            log.error("%s", self.rolled_back)
            return {"ok": False, "code": "rolled_back", "site": c.kme_id, "error": self.rolled_back}
        if their_erased < mine["peer_erased_seen"]:
            error = (
                f"the key store of {c.peer_kme_id} shows {their_erased} erased chunks, fewer than the "
                f"{mine['peer_erased_seen']} it showed before: it was restored from an older copy; the link is "
                "refused so that no key is delivered twice (see docs/kms.md, 'Rollback')"
            )
            log.error("%s", error)
            return {"ok": False, "code": "rolled_back", "site": c.peer_kme_id, "error": error}
        await self.store.raise_peer_mark(c.link_id, their_erased)
        return None

    def _delivered(self) -> None:
        """Keys were erased here: show the peer the new count soon (at most every ``sync_interval_s``)."""
        if self.peer is None:
            return
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_again = True
            return

        async def run() -> None:
            try:
                while True:
                    self._sync_again = False
                    answer = await self._peer_request({"type": "kms.sync", **await self._marks()})
                    await self._check_marks(answer)
                    await asyncio.sleep(self.config.sync_interval_s)
                    if not self._sync_again:
                        return
            except (QKDError, OSError, TimeoutError) as exc:
                log.warning("could not show the key store's count to the peer KME yet (%s)", type(exc).__name__)

        self._sync_task = asyncio.get_running_loop().create_task(run())
        self._background.add(self._sync_task)
        self._sync_task.add_done_callback(self._background.discard)

    def _check_delivery_allowed(self, slave: bool = False) -> None:
        if self.rolled_back is not None:
            raise KMEError(503, "key delivery is stopped at this site", [{"reason": self.rolled_back}])
        if slave and not self._confirmed:
            raise KMEError(
                503, "not enough keys available for this request",
                [{"reason": "the peer KME has not yet confirmed this site's key store since it started "
                            "(the KME peer link is not up yet); retry shortly"}],
            )

    def detach_peer(self) -> None:
        self.peer = None

    async def add_block(self, block_id: str, key: bytes, proof: dict[str, Any] | None = None) -> int:
        """Store an accepted key block (identical call at both sites). Returns the chunks stored.

        ``proof``: the block's proof (no key bits), returned with its keys when a consumer asks
        (:data:`PROOF_EXTENSION`; docs/kms.md, "A proof with every key").
        """
        stored = await self.store.add_block(self.config.link_id, block_id, key, proof)
        self._trim_soon()
        return stored

    TRIM_BATCH = 4096
    """At most this many chunks per trim (one ``kms.discard`` message); every stored block triggers another."""
    TRIM_MASTER = "qkdstack-trim"
    """The master SAE ID under which :meth:`trim_own_pool` reserves the chunks it is about to erase."""

    async def trim_own_pool(self) -> int:
        """Keep this site's own pool from filling the store with keys nobody draws; returns chunks erased.

        Key generation pauses at the link's high-water mark, which counts both pools. When consumers draw
        unevenly (one-way traffic, a relay that always sends the same way), the pool nobody draws from
        fills the store, generation stops, and the other pool runs dry: its consumers get 503 for good.
        So the site that owns a pool (the only one that reserves from it) keeps it at no more than half the
        high-water mark once the link is at the mark: it reserves its pool's oldest surplus chunks (so no
        consumer takes them meanwhile) and erases them at both sites (``kms.discard``, then here; a failure
        leaves a pending reservation that :meth:`resync` erases at both sites later). Unused key is given
        up instead of starving the other direction (docs/kms.md, "Two pools").
        """
        c = self.config
        if self.peer is None:
            return 0
        counts = await self.store.counts(c.link_id)
        limits = self.store.limits(c.link_id)
        surplus = min(counts.available[c.own_pool] - limits.high_water // 2, self.TRIM_BATCH)
        if counts.stored < limits.high_water or surplus <= 0:
            return 0
        try:
            reservations = await self.store.reserve(c.link_id, c.own_pool, surplus, self.store.chunk_bits,
                                                    self.TRIM_MASTER, [self.TRIM_MASTER])
        except InsufficientKeys:
            return 0
        ids = [r.key_id for r in reservations]
        self._in_flight.update(ids)
        try:
            await self._discard_both(reservations)
        except (QKDError, OSError, TimeoutError):
            return 0  # pending: resync erases them at both sites once the peer answers
        finally:
            self._in_flight.difference_update(ids)
        log.info("KME %s: own pool of link %s trimmed by %d unused chunks (the link was at its high-water mark "
                 "while the other pool ran low)", c.kme_id, c.link_id, len(reservations))
        return len(reservations)

    def _trim_soon(self) -> None:
        """Run :meth:`trim_own_pool` in the background (one at a time)."""
        if self._trim_task is not None and not self._trim_task.done():
            return

        async def run() -> None:
            try:
                await self.trim_own_pool()
            except (QKDError, OSError) as exc:
                log.warning("KME %s: trimming its pool failed: %s", self.config.kme_id, type(exc).__name__)

        self._trim_task = asyncio.get_running_loop().create_task(run())
        self._background.add(self._trim_task)
        self._trim_task.add_done_callback(self._background.discard)

    async def is_full(self) -> bool:
        return await self.store.is_full(self.config.link_id)

    async def can_store(self, bits: int) -> bool:
        """Whether a key block of ``bits`` bits still fits in this site's store (see ``KeyStore.can_store``)."""
        return await self.store.can_store(self.config.link_id, bits)

    async def is_low(self) -> bool:
        return await self.store.is_low(self.config.link_id)

    async def resync(self) -> int:
        """Erase, at both sites, keys whose peer reservation has an unknown outcome. Returns keys resolved."""
        pending = [r for r in await self.store.pending(self.config.link_id) if r.key_id not in self._in_flight]
        if not pending or self.peer is None:
            return 0
        await self._discard_both(pending)
        return len(pending)

    async def close(self) -> None:
        for t in list(self._background):
            t.cancel()
        for t in list(self._background):
            with contextlib.suppress(BaseException):
                await t

    # -- peer protocol ---------------------------------------------------------------------

    async def _peer_request(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.peer is None:
            raise ChannelError("no peer link attached")
        async with asyncio.timeout(self.config.peer_timeout_s):  # cheaper than wait_for: no extra task
            answer = await self.peer.request(message)
        if not isinstance(answer, dict):
            raise ChannelError("malformed answer from the peer KME")
        return answer

    async def _discard_both(self, reservations: Sequence[Reservation]) -> None:
        chunks = [c for r in reservations for c in r.chunk_ids]
        answer = await self._peer_request({"type": "kms.discard", "link_ID": self.config.link_id, "chunk_IDs": chunks})
        if not answer.get("ok"):
            raise ChannelError("the peer KME refused to discard keys")
        await self.store.discard(self.config.link_id, chunks)

    def _discard_later(self, reservations: Sequence[Reservation]) -> None:
        async def run() -> None:
            try:
                await self._discard_both(reservations)
            except (QKDError, OSError, TimeoutError) as exc:
                log.warning(
                    "could not discard %d unconfirmed keys yet (%s); resync will retry",
                    len(reservations),
                    type(exc).__name__,
                )

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def handle_peer(self, sender_kme_id: str, message: dict[str, Any]) -> dict[str, Any]:
        """Answer one request from the peer KME (the node calls this for every ``kms.*`` message).

        ``sender_kme_id`` is the authenticated identity of the sender. Always returns a dict;
        ``{"ok": False, "error": ...}`` on refusal.
        """
        if sender_kme_id != self.config.peer_kme_id:
            return {"ok": False, "error": "unknown peer KME"}
        kind = message.get("type")
        try:
            if kind in ("kms.hello", "kms.sync"):
                refusal = await self._check_marks(message)
                if refusal is not None:
                    return {**refusal, **await self._marks()}
                if kind == "kms.sync":
                    return {"ok": True, **await self._marks()}
                self._confirmed = True
                self.remote_sae_ids = frozenset(str(s) for s in message.get("SAE_IDs", []))
                return {"ok": True, "kme_ID": self.config.kme_id, "SAE_IDs": sorted(self.config.sae_ids),
                        **await self._marks()}
            if kind == "kms.reserve":
                return await self._peer_reserve(message)
            if kind == "kms.discard":
                if message.get("link_ID") != self.config.link_id:
                    return {"ok": False, "error": "unknown link"}
                chunks = [str(uuid.UUID(str(c))) for c in message.get("chunk_IDs", [])]
                # only chunks of the sender's own pool: the peer cannot erase keys this site hands out
                erased = await self.store.discard(self.config.link_id, chunks, pool=1 - self.config.own_pool)
                return {"ok": True, "erased": erased}
        except (KeyStoreError, ValueError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": False, "error": "unknown message type"}

    async def _peer_reserve(self, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("link_ID") != self.config.link_id:
            return {"ok": False, "error": "unknown link"}
        master = str(message.get("master_SAE_ID", ""))
        slaves = [str(s) for s in message.get("slave_SAE_IDs", [])]
        if not slaves or any(s not in self.config.sae_ids for s in slaves):
            return {"ok": False, "error": "unknown slave SAE", "code": "unknown_slave"}
        reservations = [Reservation.from_wire(k) for k in message.get("keys", [])]
        try:
            await self.store.accept(self.config.link_id, 1 - self.config.own_pool, reservations, master, slaves)
        except ChunksTaken as exc:
            return {"ok": False, "error": str(exc), "code": "taken", "chunk_IDs": exc.chunk_ids}
        except ChunksUnknown as exc:
            return {"ok": False, "error": str(exc), "code": "unknown", "chunk_IDs": exc.chunk_ids}
        return {"ok": True}

    # -- ETSI GS QKD 014 semantics ---------------------------------------------------------

    def _check_sae(self, sae_id: str) -> None:
        if sae_id not in self.config.sae_ids:
            raise KMEError(401, "SAE is not registered at this KME", [{"SAE_ID": sae_id}])

    async def peer_down_error(self) -> KMEError:
        """The 503 when the KME peer link is not up. It starts with the link's first accepted round (its key
        authenticates the link), so before any key block was stored the truth is that no key exists yet."""
        counts = await self.store.counts(self.config.link_id)
        if counts.stored == 0 and counts.erased == 0:
            return KMEError(503, "no key exists yet: the link has not distilled its first key block (the KME peer "
                            "link starts with it); retry shortly")
        return KMEError(503, "the peer KME is not connected (the KME peer link is down or still coming up); retry "
                        "shortly")

    async def _check_slave(self, slave: str) -> None:
        if not self.remote_sae_ids:  # never connected: the peer's SAE list is not known yet
            raise await self.peer_down_error()
        if slave not in self.remote_sae_ids:
            raise KMEError(400, "slave SAE ID is not known to the peer KME", [{"slave_SAE_ID": slave}])

    async def status(self, master_sae: str, slave_sae: str) -> dict[str, Any]:
        """ETSI 014 Status for the master SAE ``master_sae`` and slave SAE ``slave_sae``."""
        self._check_sae(master_sae)
        await self._check_slave(slave_sae)
        c = self.config
        counts = await self.store.counts(c.link_id)
        per_key = chunks_per_key(c.key_size, self.store.chunk_bits)
        return status_document(c, c.peer_kme_id, master_sae, slave_sae,
                               stored_key_count=counts.available[c.own_pool] // per_key,
                               max_key_count=self.store.limits(c.link_id).capacity // 2 // per_key)

    async def enc_keys(
        self,
        master_sae: str,
        slave_sae: str,
        number: int | None = None,
        size: int | None = None,
        additional_slave_SAE_IDs: Sequence[str] | None = None,
        extension_mandatory: Sequence[Any] | None = None,
        extension_optional: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        """ETSI 014 Get key: reserve keys at both sites, then hand them to the master SAE (Key container)."""
        self._check_sae(master_sae)
        self._check_delivery_allowed()
        slaves = [slave_sae, *(additional_slave_SAE_IDs or [])]
        number, size = check_key_request(self.config, number, size, extension_mandatory, slaves)
        # extension_optional: qkdstack_proof is served; any other is ignored, as the specification allows.
        proof = wants_proof(extension_optional)
        for s in slaves:
            await self._check_slave(s)
        if self.peer is None:
            raise await self.peer_down_error()
        for attempt in range(self.TAKE_ATTEMPTS):
            result = await self._take(
                master_sae, slaves, number, size, last=attempt == self.TAKE_ATTEMPTS - 1, proof=proof
            )
            if result is not None:
                return result
        raise AssertionError("unreachable")

    async def _take(
        self, master_sae: str, slaves: list[str], number: int, size: int, *, last: bool, proof: bool = False
    ) -> dict[str, Any] | None:
        """One attempt of enc_keys' reserve / peer reserve / deliver; None: retry (stale chunks dropped)."""
        c = self.config
        try:
            reservations = await self.store.reserve(c.link_id, c.own_pool, number, size, master_sae, slaves)
        except InsufficientKeys:
            raise KMEError(503, "not enough keys available for this request") from None
        except KeyStoreError as exc:
            raise KMEError(503, "key store error", [{"reason": str(exc)}]) from None
        ids = [r.key_id for r in reservations]
        self._in_flight.update(ids)
        try:
            return await self._confirm_and_deliver(reservations, master_sae, slaves, last=last, proof=proof)
        finally:
            self._in_flight.difference_update(ids)

    async def _confirm_and_deliver(
        self, reservations: list[Reservation], master_sae: str, slaves: list[str], *, last: bool, proof: bool = False
    ) -> dict[str, Any] | None:
        c = self.config
        ids = [r.key_id for r in reservations]
        message = {
            "type": "kms.reserve",
            "link_ID": c.link_id,
            "master_SAE_ID": master_sae,
            "slave_SAE_IDs": slaves,
            "keys": [r.to_wire() for r in reservations],
        }
        try:
            answer = await self._peer_request(message)
        except (QKDError, OSError, TimeoutError, asyncio.CancelledError) as exc:
            self._discard_later(reservations)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise KMEError(503, "the peer KME did not confirm the reservation") from None
        if not answer.get("ok"):
            await self.store.release(ids)  # the peer reserved nothing: the bits never left this site
            if answer.get("code") == "taken":
                # The peer already used these chunks for a key this site no longer knows (this store lost
                # recent transactions, e.g. power loss with synchronous=NORMAL): erase them here too.
                ours = {cid for r in reservations for cid in r.chunk_ids}
                taken = [str(x) for x in answer.get("chunk_IDs", []) if str(x) in ours]
                await self.store.discard(c.link_id, taken)
                log.warning("dropped %d chunks the peer KME had already used", len(taken))
                if not last:
                    return None
            if answer.get("code") == "unknown":
                if await self._drop_orphans(reservations, answer.get("chunk_IDs", [])) and not last:
                    return None  # go on with the chunks of other blocks
                raise KMEError(
                    503,
                    "not enough keys available for this request",
                    [{"reason": "the next key blocks are not stored at the peer KME yet"}],
                )
            if answer.get("code") == "unknown_slave":
                raise KMEError(400, "slave SAE ID is not known to the peer KME", [{"slave_SAE_IDs": slaves}])
            raise KMEError(503, "the peer KME refused the reservation", [{"reason": str(answer.get("error"))}])
        try:
            proofs = await self.store.proofs(ids) if proof else None
            keys = await self.store.deliver_master(ids)
        except KeyStoreError:
            raise KMEError(503, "key store error during delivery") from None
        self._delivered()
        return {"keys": [_key_entry(k.key_id, k.key, proofs) for k in keys]}

    async def _drop_orphans(self, reservations: Sequence[Reservation], unknown: Any) -> bool:
        """The peer does not hold the key blocks of these chunks: erase those blocks here too.

        A block stored at this site only (the peer's ``add_block`` failed, or a crash lost it there)
        would otherwise be reserved first forever (oldest chunks first) and refused by the peer
        every time. Safe: none of its bits can have left either site (the peer has no such chunks,
        and this site hands a chunk out only after the peer reserved it). A block stored here less
        than ``orphan_grace_s`` ago is kept (the peer may be storing it right now). Returns whether
        anything was dropped. Logs block IDs and counts, never key bytes.
        """
        c = self.config
        ours = {cid for r in reservations for cid in r.chunk_ids}
        chunks = [str(x) for x in unknown if str(x) in ours] if isinstance(unknown, list) else []
        try:
            dropped = await self.store.drop_orphans(c.link_id, chunks, c.orphan_grace_s)
        except KeyStoreError:
            raise KMEError(503, "key store error") from None
        for block_id, n in dropped:
            log.warning(
                "KME %s: key block %s is not stored at the peer KME %s; discarded its %d unused chunks here",
                c.kme_id, block_id, c.peer_kme_id, n,
            )
        return bool(dropped)

    async def dec_keys(
        self, slave_sae: str, master_sae: str, key_ids: Sequence[Any], extension_optional: Sequence[Any] | None = None
    ) -> dict[str, Any]:
        """ETSI 014 Get key with key IDs: the slave SAE fetches keys the master SAE took (Key container).

        ``extension_optional`` asking for :data:`PROOF_EXTENSION` adds each key's proof (ETSI 014 has no
        such field in a Key IDs request: the REST server takes it from ``key_IDs_extension``).
        """
        self._check_sae(slave_sae)
        if not key_ids:
            raise KMEError(400, "key_ID or key_IDs is required")
        if len(key_ids) > self.config.max_key_per_request:
            raise KMEError(400, f"at most max_key_per_request ({self.config.max_key_per_request}) key IDs")
        try:
            ids = [str(uuid.UUID(str(k))) for k in key_ids]
        except ValueError:
            raise KMEError(400, MSG_NOT_FOUND, [{"reason": "key_ID is not a UUID"}]) from None
        self._check_delivery_allowed(slave=True)
        try:
            proofs = await self.store.proofs(ids) if wants_proof(extension_optional) else None
            keys = await self.store.deliver_slave(ids, slave_sae, master_sae)
        except KeyNotAuthorized:
            raise KMEError(401, "the SAE is not authorized to get one or more keys specified") from None
        except KeyNotFound:
            raise KMEError(400, MSG_NOT_FOUND) from None
        except KeyStoreError:
            raise KMEError(503, "key store error during delivery") from None
        self._delivered()
        return {"keys": [_key_entry(k.key_id, k.key, proofs) for k in keys]}
