"""Persistent key store of a key management entity (KME): SQLite (default) or PostgreSQL.

The parts: kms/records.py (states, IDs, errors, records), kms/backend.py (the backend interface),
kms/backend_sqlite.py and kms/backend_postgres.py (one module per backend), kms/operations.py (the
SQL operations), and here the :class:`KeyStore` (batching, group commit) and :func:`open_store`.

Design (see docs/kms.md for the full story):

* **Chunks.** A distilled key block accepted by both sites is cut into fixed-size chunks of
  ``chunk_bits`` bits (default 256; a trailing remainder shorter than a chunk is dropped).
  Chunk ``i`` of block ``block_id`` on link ``link_id`` gets the ID
  ``uuid5(CHUNK_NAMESPACE, f"{link_id}\\0{block_id}\\0{i}")``: both sites derive the same IDs from
  data both know (the block ID is agreed in the round), without extra messages and without
  a single key bit in the ID.
* **Pools.** Chunk ``i`` belongs to pool ``i % 2``. The KME whose ID sorts first serves its own
  master SAEs from pool 0, the other from pool 1, so the two sites never pick the same chunk for
  two different keys even when both serve ``enc_keys`` at the same moment (see kms/kme.py).
* **Keys.** A delivered key of ``size`` bits (a multiple of 8) consumes ``ceil(size / chunk_bits)``
  chunks of one pool; its key ID is the ID of its first chunk; its bytes are the concatenated
  chunks truncated to ``size / 8`` bytes (the unused tail of the last chunk is erased with it).
* **States.** chunk: available -> reserved -> erased.  key: pending (master site, peer not yet
  confirmed) -> reserved (slave site, waiting for its slave SAE(s)) -> done. Delivery reads the
  bytes and erases them (``material = NULL``) in the same transaction that records the delivery,
  so a key is handed out at most once even if the process is killed at any instant.
* **Group commit.** Every operation runs on one worker thread with its own database connection.
  Operations queued together run in one transaction, each inside its own SAVEPOINT (a failing
  operation rolls back alone), and no caller sees a result before the COMMIT returned. With
  SQLite ``synchronous=FULL`` a delivery is durable before its key leaves the store.

Key bytes never appear in logs, reprs or exception messages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qkdstack.errors import ConfigError, KeyStoreError
from qkdstack.kms.backend import Backend
from qkdstack.kms.backend_postgres import PostgresBackend
from qkdstack.kms.backend_sqlite import SQLiteBackend
from qkdstack.kms.operations import (
    _CHECK_FIRST,
    _MERGED,
    _READS_COUNTS,
    _RELAXED,
    _op_accept,
    _op_add_block,
    _op_can_store,
    _op_chunk_states,
    _op_counts,
    _op_deliver_master,
    _op_deliver_slave,
    _op_discard,
    _op_drop_orphans,
    _op_peer_mark,
    _op_pending,
    _op_proofs,
    _op_raise_peer_mark,
    _op_recount,
    _op_release,
    _op_reserve,
    _write_counts,
)
from qkdstack.kms.records import (
    AVAILABLE,
    CHUNK_NAMESPACE,
    ERASED,
    KEY_DONE,
    KEY_PENDING,
    KEY_RESERVED,
    RESERVED,
    BlockConflict,
    ChunksTaken,
    ChunksUnknown,
    DeliveredKey,
    InsufficientKeys,
    KeyNotAuthorized,
    KeyNotFound,
    LinkCounts,
    LinkLimits,
    Reservation,
    StoreFull,
    chunk_id,
    chunks_per_key,
)

__all__ = [
    "AVAILABLE",
    "CHUNK_NAMESPACE",
    "ERASED",
    "KEY_DONE",
    "KEY_PENDING",
    "KEY_RESERVED",
    "RESERVED",
    "BlockConflict",
    "ChunksTaken",
    "ChunksUnknown",
    "DeliveredKey",
    "InsufficientKeys",
    "KeyNotAuthorized",
    "KeyNotFound",
    "KeyStore",
    "KeyStoreError",
    "LinkCounts",
    "LinkLimits",
    "Reservation",
    "StoreFull",
    "chunk_id",
    "chunks_per_key",
    "open_store",
]

log = logging.getLogger(__name__)

_MAX_BATCH = 128


class KeyStore:
    """The key store: one API over SQLite or PostgreSQL, used from asyncio code.

    Open with :func:`open_store`. All methods are coroutines; each is one transaction (group
    committed with whatever other operations are queued at the same moment).

    ``inline=True`` (SQLite's default) runs each batch on the event-loop thread: every operation
    queued during one loop iteration goes into one transaction, with no thread hand-over (a loaded
    machine can take milliseconds to schedule a worker thread). ``inline=False`` (PostgreSQL's
    default, whose statements are network round trips) runs batches on a worker thread.
    """

    def __init__(
        self,
        backend_factory: Callable[[], Backend],
        *,
        chunk_bits: int = 256,
        limits: LinkLimits | None = None,
        description: str = "",
        inline: bool = False,
    ) -> None:
        if chunk_bits <= 0 or chunk_bits % 8:
            raise ConfigError("chunk_bits must be a positive multiple of 8")
        self.chunk_bits = chunk_bits
        self.default_limits = limits or LinkLimits()
        self._limits: dict[str, LinkLimits] = {}
        self.description = description
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self.inline = inline
        self._thread: threading.Thread | None = None
        if inline:
            self._db = self._open(backend_factory)
            self._lock = threading.Lock()
            self._pending: list = []
            self._flush_scheduled = False
            self._committing = False
            self._commit_cf: concurrent.futures.Future | None = None
            self._committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qkd-keystore-commit")
            self._scrub_timer: asyncio.TimerHandle | None = None
            self._scrub_preparing = False  # the backend's prepare_scrub is running
            self._scrub_ready = False  # ... and has finished: the scrub itself is short now
            self.wal_truncate_interval = self._db.scrub_interval
            return
        ready: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._worker, args=(backend_factory, ready), name="qkd-keystore", daemon=True
        )
        self._thread.start()
        err = ready.get()
        if err is not None:
            self._thread.join()
            raise err
        self.wal_truncate_interval = ready.get()

    def __repr__(self) -> str:
        return f"KeyStore({self.description}, chunk_bits={self.chunk_bits})"

    # -- worker ----------------------------------------------------------------------------

    @staticmethod
    def _open(factory: Callable[[], Backend]) -> Backend:
        db = None
        try:
            db = factory()
            db.begin()
            db.count_delta = {}
            for stmt in db.schema():
                db.execute(stmt)
            db.migrate()
            db.execute("COMMIT")
        except Exception as exc:
            if db is not None:
                with contextlib.suppress(Exception):
                    db.close()
            if isinstance(exc, KeyStoreError):
                raise
            raise KeyStoreError(f"cannot open key store: {type(exc).__name__}: {exc}") from None
        return db

    def _worker(self, factory: Callable[[], Backend], ready: queue.SimpleQueue) -> None:
        try:
            db = self._open(factory)
        except KeyStoreError as exc:
            ready.put(exc)
            return
        ready.put(None)
        ready.put(db.scrub_interval)
        try:
            while True:
                delay = db.scrub_delay()
                try:
                    item = self._queue.get(timeout=delay) if delay is not None else self._queue.get()
                except queue.Empty:  # erased key material waits for its scrub, and nothing else is queued
                    db.scrub()
                    continue
                if item is None:
                    break
                batch = [item]
                stop = False
                while len(batch) < _MAX_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                self._run_batch(db, batch)
                if db.scrub_delay() == 0:
                    db.scrub()
                if stop:
                    break
        finally:
            db.close()

    @staticmethod
    def _exec_batch(db: Backend, batch: list) -> list[tuple[bool, Any]]:
        """BEGIN and run each operation; the caller commits.

        An operation that fails rolls back alone: operations in ``_CHECK_FIRST`` raise their
        refusals (:class:`KeyStoreError`) before they write anything, so they need no SAVEPOINT
        (two statements fewer per operation on the hot path); any other failure of theirs fails
        the whole transaction (the caller rolls back and every operation of the batch gets an
        error). The others run inside their own SAVEPOINT.
        """
        db.begin()
        db.count_delta = {}
        merged: dict[int, tuple[bool, Any]] = {}
        for fn, many in _MERGED.items():
            idx = [i for i, op in enumerate(batch) if op[0] is fn]
            if len(idx) > 1:
                try:
                    out = many(db, [batch[i][1] for i in idx])
                except KeyStoreError:
                    continue  # refused before writing anything: run the calls one by one below
                merged.update(zip(idx, out, strict=True))
        results: list[tuple[bool, Any]] = []
        for i, (fn, args, _loop, _fut) in enumerate(batch):
            if i in merged:
                results.append(merged[i])
                continue
            if fn in _READS_COUNTS:
                _write_counts(db)
            if fn in _CHECK_FIRST:
                try:
                    res = fn(db, *args)
                except KeyStoreError as exc:
                    results.append((False, exc))
                else:
                    results.append((True, res))
                continue
            db.execute("SAVEPOINT op")
            saved = dict(db.count_delta)
            try:
                res = fn(db, *args)
            except Exception as exc:
                db.execute("ROLLBACK TO SAVEPOINT op")
                db.execute("RELEASE SAVEPOINT op")
                db.count_delta = saved
                if not isinstance(exc, KeyStoreError):
                    log.error("key store operation %s failed: %s", fn.__name__, type(exc).__name__)
                    exc = KeyStoreError(f"key store operation failed: {type(exc).__name__}")
                results.append((False, exc))
            else:
                db.execute("RELEASE SAVEPOINT op")
                results.append((True, res))
        _write_counts(db)
        return results

    @staticmethod
    def _failed(db: Backend, batch: list, exc: BaseException) -> list[tuple[bool, Any]]:
        with contextlib.suppress(Exception):
            db.execute("ROLLBACK")
        log.error("key store transaction failed: %s", type(exc).__name__)
        err = KeyStoreError(f"key store transaction failed: {type(exc).__name__}")
        return [(False, err)] * len(batch)

    @staticmethod
    def _deliver(batch: list, results: list[tuple[bool, Any]]) -> None:
        """Hand results to the callers (only ever after the COMMIT returned)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for (_fn, _args, loop, fut), (ok, value) in zip(batch, results, strict=True):
            if loop is running:
                _settle(fut, ok, value)
            else:
                with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, fut, ok, value)

    def _run_batch(self, db: Backend, batch: list) -> None:
        """Worker-thread mode: the whole transaction on this thread."""
        try:
            results = self._exec_batch(db, batch)
            db.execute("COMMIT")
            db.committed()
        except Exception as exc:
            results = self._failed(db, batch, exc)
        self._deliver(batch, results)

    def _flush(self) -> None:
        """Inline mode: statements on the loop thread, the COMMIT (fsync) on a helper thread.

        While a COMMIT is in flight no new transaction starts; operations queue up and form the
        next batch (group commit that grows with the disk's latency).
        """
        self._flush_scheduled = False
        if self._committing or not self._pending:
            return
        batch, self._pending = self._pending, []
        relaxed = False
        if self._db.can_relax:
            # Local reservations commit first, in a transaction of their own without fsync (see
            # _RELAXED); the others follow in the next transaction, with the configured durability.
            fast = [op for op in batch if op[0] in _RELAXED]
            if fast:
                if len(fast) < len(batch):
                    self._pending = [op for op in batch if op[0] not in _RELAXED]
                batch, relaxed = fast, True
        self._lock.acquire()
        try:
            self._db.set_relaxed(relaxed)
            results = self._exec_batch(self._db, batch)
        except Exception as exc:
            results = self._failed(self._db, batch, exc)
            self._lock.release()
            self._deliver(batch, results)
            self._schedule_flush()
            return
        self._committing = True
        loop = asyncio.get_running_loop()
        self._commit_cf = self._committer.submit(self._commit)
        commit = asyncio.wrap_future(self._commit_cf, loop=loop)

        def done(f: asyncio.Future) -> None:
            nonlocal results
            exc = f.exception()
            if exc is not None:
                results = self._failed(self._db, batch, exc)
            self._committing = False
            self._lock.release()
            self._deliver(batch, results)
            self._after_commit()

        commit.add_done_callback(done)

    def _after_commit(self) -> None:
        """Inline mode, on the loop: scrub erased key material if due (else arm a timer), then flush."""
        delay = None if self._closed else self._db.scrub_delay()
        if delay == 0:
            if self._scrub_ready:
                self._start_scrub()
                return
            if not self._scrub_preparing:
                loop = asyncio.get_running_loop()
                if self._db.prepare_scrub(lambda: loop.call_soon_threadsafe(self._scrub_prepared)):
                    self._scrub_preparing = True  # transactions go on meanwhile
                else:
                    self._start_scrub()
                    return
        elif delay is not None and self._scrub_timer is None:
            self._scrub_timer = asyncio.get_running_loop().call_later(delay, self._scrub_timer_fired)
        self._schedule_flush()

    def _scrub_prepared(self) -> None:
        self._scrub_preparing = False
        self._scrub_ready = True
        if not (self._closed or self._committing or self._flush_scheduled):
            self._after_commit()  # else the commit in flight (or the flush about to run) starts the scrub

    def _scrub_timer_fired(self) -> None:
        self._scrub_timer = None
        if self._closed or self._committing or self._flush_scheduled:
            return  # the commit in flight (or the flush about to run) checks again when it is done
        self._after_commit()

    def _start_scrub(self) -> None:
        """Run :meth:`Backend.scrub` on the committer thread like a COMMIT: operations queue meanwhile.

        The results of the transaction that erased the keys have already gone to their callers; the
        scrub is off their path, and later operations wait for it as for a commit in flight.
        """
        if self._scrub_timer is not None:
            self._scrub_timer.cancel()
            self._scrub_timer = None
        self._scrub_ready = False
        self._committing = True
        self._lock.acquire()
        self._commit_cf = self._committer.submit(self._db.scrub)
        scrub = asyncio.wrap_future(self._commit_cf, loop=asyncio.get_running_loop())

        def done(_f: asyncio.Future) -> None:
            self._committing = False
            self._lock.release()
            self._after_commit()  # a failed scrub (busy) is due again a little later: arms the timer

        scrub.add_done_callback(done)

    def _commit(self) -> None:
        self._db.execute("COMMIT")
        self._db.committed()

    def _schedule_flush(self) -> None:
        if self._pending and not self._flush_scheduled and not self._committing and not self._closed:
            self._flush_scheduled = True
            self._pending[0][2].call_soon(self._flush)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise KeyStoreError("the key store is closed")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self.inline:
            self._pending.append((fn, args, loop, fut))
            self._schedule_flush()
        else:
            self._queue.put((fn, args, loop, fut))
        # Once queued, the operation runs and commits even if the caller is cancelled (a cancelled
        # future only drops the result: _settle skips it), so no asyncio.shield is needed.
        return await fut

    # -- public API ------------------------------------------------------------------------

    def set_limits(self, link_id: str, limits: LinkLimits) -> None:
        """Capacity and water marks of ``link_id`` (default: the store's ``limits``)."""
        self._limits[link_id] = limits

    def limits(self, link_id: str) -> LinkLimits:
        return self._limits.get(link_id, self.default_limits)

    async def add_block(self, link_id: str, block_id: str, key: bytes, proof: dict[str, Any] | None = None) -> int:
        """Store a distilled key block agreed by both sites; returns the number of chunks stored.

        ``key`` holds the block's bits packed MSB first (``BitArray.to_bytes()``). Call it with the
        same ``link_id``, ``block_id`` and bytes at both sites. Raises :class:`StoreFull` beyond capacity.
        Idempotent: the same block again (same ID, same bytes) stores nothing and returns the same
        count; the same ID with other bytes or another length raises :class:`BlockConflict`.

        ``proof`` (optional, JSON-compatible, no key bits): the block's proof, kept with the block and
        returned with its keys on request (:meth:`proofs`).
        """
        if not isinstance(key, bytes | bytearray | memoryview):
            raise KeyStoreError("key block must be bytes")
        if not block_id:
            raise KeyStoreError("block_id must not be empty")
        proof_json = None if proof is None else json.dumps(proof, sort_keys=True, separators=(",", ":"))
        return await self._call(
            _op_add_block, link_id, str(block_id), bytes(key), self.chunk_bits, self.limits(link_id), proof_json
        )

    async def proofs(self, key_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """For each key ID: the proofs of the key blocks its chunks come from (``{"block_id": ...}`` alone for
        a block stored without one). Reads no key material; call it before the keys are delivered."""
        rows = await self._call(_op_proofs, list(dict.fromkeys(key_ids)))
        return {
            kid: [{**(json.loads(p) if p else {}), "block_id": block_id} for block_id, p in blocks]
            for kid, blocks in rows.items()
        }

    async def can_store(self, link_id: str, bits: int) -> bool:
        """Whether a key block of ``bits`` bits still fits on ``link_id`` (:meth:`add_block` would store it).

        True iff the chunks held (available and reserved, both pools) plus the block's
        ``bits // chunk_bits`` chunks stay within the link's capacity. One small query. The two sites'
        answers can differ (the slave's site holds the keys its SAEs have not fetched yet): ask both
        before a round, and run it only if both say yes. Only ``add_block`` makes the count grow, so
        the answer holds until the next block is added.
        """
        if bits < 0:
            raise KeyStoreError("bits must not be negative")
        return await self._call(_op_can_store, link_id, bits // self.chunk_bits, self.limits(link_id))

    async def drop_orphans(self, link_id: str, chunk_ids: Sequence[str], min_age_s: float) -> list[tuple[str, int]]:
        """Erase the available chunks of the key blocks holding ``chunk_ids``, which the peer does not hold.

        Only blocks stored here at least ``min_age_s`` seconds ago. Returns (block ID, chunks erased)
        for each block dropped (no key material).
        """
        if not chunk_ids:
            return []
        return await self._call(_op_drop_orphans, link_id, list(chunk_ids), min_age_s)

    async def reserve(
        self, link_id: str, pool: int, number: int, size_bits: int, master: str, slaves: Sequence[str]
    ) -> list[Reservation]:
        """Reserve ``number`` keys of ``size_bits`` from ``pool`` for a local master SAE (state pending)."""
        if size_bits <= 0 or size_bits % 8 or number <= 0:
            raise KeyStoreError("number must be positive and size a positive multiple of 8")
        return await self._call(_op_reserve, link_id, pool, number, size_bits, self.chunk_bits, master, list(slaves))

    async def accept(
        self, link_id: str, pool: int, reservations: Sequence[Reservation], master: str, slaves: Sequence[str]
    ) -> None:
        """Peer side: reserve the keys the peer chose (from its ``pool``) for our slave SAEs.

        Raises :class:`ChunksTaken` if a chunk or key ID is already in use here (all or nothing).
        """
        await self._call(_op_accept, link_id, pool, list(reservations), self.chunk_bits, master, list(slaves))

    async def deliver_master(self, key_ids: Sequence[str]) -> list[DeliveredKey]:
        """Master side, after the peer confirmed: return the keys' bytes and erase them."""
        return await self._call(_op_deliver_master, list(key_ids))

    async def deliver_slave(self, key_ids: Sequence[str], sae_id: str, master: str | None = None) -> list[DeliveredKey]:
        """Slave side: return the keys to ``sae_id`` once; erase each when all its slaves have it.

        Raises :class:`KeyNotFound` (unknown, other master, or already delivered to this SAE) or
        :class:`KeyNotAuthorized` (the SAE is not a slave of the keys). All or nothing.
        """
        ids = list(dict.fromkeys(key_ids))
        if len(ids) != len(key_ids):
            raise KeyNotFound("one or more keys specified are not found on KME")
        return await self._call(_op_deliver_slave, ids, sae_id, master)

    async def release(self, key_ids: Sequence[str]) -> int:
        """Return pending reservations to the pool (only when the peer surely did not reserve them)."""
        return await self._call(_op_release, list(key_ids))

    async def discard(self, link_id: str, chunk_ids: Sequence[str], pool: int | None = None) -> int:
        """Erase chunks whatever their state (recovery of reservations whose outcome is unknown).

        With ``pool``, only chunks of that pool are erased. Returns the chunks newly erased.
        """
        if not chunk_ids:
            return 0
        return await self._call(_op_discard, link_id, list(chunk_ids), pool)

    async def pending(self, link_id: str) -> list[Reservation]:
        """Reservations of local master SAEs the peer has not confirmed (to resolve after a crash)."""
        return await self._call(_op_pending, link_id)

    async def counts(self, link_id: str) -> LinkCounts:
        return await self._call(_op_counts, link_id)

    async def peer_mark(self, link_id: str) -> int:
        """The highest erased-chunk count the peer KME has shown for the link (its rollback watermark)."""
        return await self._call(_op_peer_mark, link_id)

    async def raise_peer_mark(self, link_id: str, peer_erased: int) -> int:
        """Record that the peer KME showed ``peer_erased`` erased chunks (the mark only rises); returns the mark."""
        return await self._call(_op_raise_peer_mark, link_id, int(peer_erased))

    async def recount(self, link_id: str) -> LinkCounts:
        """:meth:`counts` recomputed by a full scan (audits; must equal :meth:`counts`)."""
        return await self._call(_op_recount, link_id)

    async def chunk_states(self, link_id: str) -> dict[str, tuple[int, str | None]]:
        return await self._call(_op_chunk_states, link_id)

    async def is_full(self, link_id: str) -> bool:
        """True at or above the high-water mark: the node should pause key generation on this link."""
        return (await self.counts(link_id)).stored >= self.limits(link_id).high_water

    async def is_low(self, link_id: str) -> bool:
        """True below the low-water mark: the node should (re)start key generation on this link."""
        return (await self.counts(link_id)).stored < self.limits(link_id).low_water

    def close(self) -> None:
        """Finish queued operations and close the database connection."""
        if not self._closed:
            self._closed = True
            if self._thread is None:
                if self._scrub_timer is not None:
                    self._scrub_timer.cancel()
                    self._scrub_timer = None
                if self._committing:
                    # A COMMIT is in flight: wait for it on its thread (its completion callback, which
                    # releases the lock, may be queued on this very event loop).
                    with contextlib.suppress(Exception):
                        self._commit_cf.result()
                else:
                    self._lock.acquire()
                    self._lock.release()
                for _fn, _args, loop, fut in self._pending:
                    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                        loop.call_soon_threadsafe(_settle, fut, False, KeyStoreError("the key store is closed"))
                self._pending = []
                self._db.close()
                self._committer.shutdown(wait=True)
                return
            self._queue.put(None)
            self._thread.join()


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def open_store(
    location: str | os.PathLike[str],
    *,
    chunk_bits: int = 256,
    limits: LinkLimits | None = None,
    synchronous: str = "FULL",
    inline: bool | None = None,
    wal_truncate_interval: float = 0.1,
) -> KeyStore:
    """Open (creating if needed) a key store.

    ``location``: a ``postgresql://`` (or ``postgres://``) URL selects PostgreSQL (psycopg 3);
    ``sqlite:///PATH`` or anything else is a SQLite file path (created 0600 with its -wal/-shm files, WAL mode).
    ``synchronous``: SQLite's ``synchronous`` pragma; ``FULL`` (default) makes every delivery
    durable across power loss before the key leaves the store; ``NORMAL`` survives process
    crashes (kill -9) but not power loss. ``inline``: see :class:`KeyStore` (default: True for
    SQLite, False for PostgreSQL). ``wal_truncate_interval`` (SQLite, seconds): after a transaction
    that erased key material, the WAL is checkpointed and truncated to zero bytes at most this often,
    so erased keys stay in the ``-wal`` file at most about this long (docs/kms.md); 0 truncates
    after every such transaction.
    """
    loc = os.fspath(location)
    if loc.startswith(("postgresql://", "postgres://")):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None:  # an optional dependency (pyproject.toml's [postgres] extra)
            raise ConfigError("[kms] store postgresql://... needs psycopg, which is not installed; install it with "
                              "pip install 'qkdstack[postgres]'")
        return KeyStore(lambda: PostgresBackend(loc), chunk_bits=chunk_bits, limits=limits, description="postgresql")
    if loc.startswith("sqlite:///"):
        loc = loc.removeprefix("sqlite:///")  # SQLAlchemy style: sqlite:///rel.db, sqlite:////abs/path.db
    if synchronous.upper() not in {"FULL", "NORMAL", "EXTRA"}:
        raise ConfigError("synchronous must be FULL, NORMAL or EXTRA")
    sync = synchronous.upper()
    if not 0 <= wal_truncate_interval <= 3600:
        raise ConfigError("wal_truncate_interval must be between 0 and 3600 seconds")
    return KeyStore(
        lambda: SQLiteBackend(Path(loc), sync, wal_truncate_interval),
        chunk_bits=chunk_bits,
        limits=limits,
        description=f"sqlite:{loc}",
        inline=True if inline is None else inline,
    )
