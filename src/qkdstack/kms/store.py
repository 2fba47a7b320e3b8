"""Persistent key store of a key management entity (KME): SQLite (default) or PostgreSQL.

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
import hmac
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdstack.errors import ConfigError, KeyStoreError

log = logging.getLogger(__name__)

CHUNK_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:qkdstack:kms:chunk")
"""Namespace of the name-based (RFC 9562 version 5) chunk UUIDs."""

AVAILABLE, RESERVED, ERASED = 0, 1, 2
"""Chunk states."""
KEY_PENDING, KEY_RESERVED, KEY_DONE = 0, 1, 2
"""Key states: pending at the master site until the peer confirmed; reserved at the slave site."""

_MAX_BATCH = 128


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


# ---------------------------------------------------------------------------------------------
# Backends: one connection each, used only from the store's worker thread.


class _Backend:
    placeholder = "?"
    blob = "BLOB"
    bigint = "INTEGER"
    count_delta: dict[tuple[str, int, int], int]
    """Counter changes of the open transaction not yet written (see :func:`_bump`)."""
    can_relax = False
    """True if :meth:`set_relaxed` can commit without fsync (SQLite with synchronous FULL or EXTRA)."""

    scrub_interval: float | None = None
    """Seconds between two :meth:`scrub` calls at most; None: this backend has nothing to scrub."""
    dirty = False
    """Key material was erased since the last successful :meth:`scrub` (set by the operations)."""
    _scrub_not_before = 0.0

    def set_relaxed(self, relaxed: bool) -> None:
        """Commit the next transactions without (True) or with (False) the configured durability."""

    def committed(self) -> None:
        """Called after each COMMIT (SQLite: wakes the WAL checkpointer)."""

    def scrub_delay(self) -> float | None:
        """Seconds until :meth:`scrub` is due (0: now); None when no key material was erased since the last one."""
        if not self.dirty or self.scrub_interval is None:
            return None
        return max(0.0, self._scrub_not_before - time.monotonic())

    def scrub(self) -> None:
        """Remove the old copies of erased key material (between transactions, never inside one).

        Called by the store at most every :attr:`scrub_interval` seconds after a transaction that
        erased key material committed. A failure is logged (no key bytes) and retried later.
        """
        ok = False
        try:
            ok = self._scrub()
        except Exception as exc:
            log.warning("key store: removing old copies of erased keys failed (%s); retrying", type(exc).__name__)
        interval = self.scrub_interval or 0.0
        self._scrub_not_before = time.monotonic() + (interval if ok else max(interval, 0.01))
        if ok:
            self.dirty = False

    def _scrub(self) -> bool:
        return True

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def schema(self) -> list[str]:
        b, big = self.blob, self.bigint
        return [
            f"""CREATE TABLE IF NOT EXISTS qkd_blocks (
                link_id TEXT NOT NULL, block_id TEXT NOT NULL, seq {big} NOT NULL,
                n_chunks INTEGER NOT NULL, chunk_bits INTEGER NOT NULL, added_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (link_id, block_id))""",
            f"""CREATE TABLE IF NOT EXISTS qkd_chunks (
                chunk_id TEXT PRIMARY KEY, link_id TEXT NOT NULL, block_seq {big} NOT NULL,
                idx INTEGER NOT NULL, pool SMALLINT NOT NULL, state SMALLINT NOT NULL,
                key_id TEXT, pos INTEGER, material {b})""",
            """CREATE INDEX IF NOT EXISTS qkd_chunks_avail
                ON qkd_chunks (link_id, pool, block_seq, idx) WHERE state = 0""",
            "CREATE INDEX IF NOT EXISTS qkd_chunks_key ON qkd_chunks (key_id)",
            """CREATE TABLE IF NOT EXISTS qkd_keys (
                key_id TEXT PRIMARY KEY, link_id TEXT NOT NULL, size_bits INTEGER NOT NULL,
                master_sae TEXT NOT NULL, slaves TEXT NOT NULL, remaining TEXT NOT NULL,
                state SMALLINT NOT NULL, local_master SMALLINT NOT NULL, created_at DOUBLE PRECISION NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS qkd_keys_pending ON qkd_keys (link_id) WHERE state = 0",
            # Chunk counts per (link, pool, state), kept in the same transactions as the chunks, so the
            # ETSI status and the water marks cost one small query instead of a table scan.
            f"""CREATE TABLE IF NOT EXISTS qkd_counts (
                link_id TEXT NOT NULL, pool SMALLINT NOT NULL, state SMALLINT NOT NULL, n {big} NOT NULL,
                PRIMARY KEY (link_id, pool, state))""",
        ]


class _SQLiteBackend(_Backend):
    def __init__(self, path: Path, synchronous: str, wal_truncate_interval: float = 0.1) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Create the database and its WAL/shared-memory companions 0600 *before* SQLite opens them
        # (SQLite then keeps the mode; it also copies the main file's mode to files it creates).
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(p, 0o600)
        # The store serialises all use of the connection (worker thread or a lock), possibly across threads.
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.synchronous = synchronous
        self.can_relax = synchronous in ("FULL", "EXTRA")
        self._relaxed = False
        # Erased keys: secure_delete makes SQLite overwrite deleted content (the freed space of a cell
        # whose material was set to NULL, freed pages) with zeros, in the page it writes. The WAL still
        # holds the earlier images of that page: scrub() truncates it (wal_checkpoint(TRUNCATE)) at
        # most every wal_truncate_interval seconds after a transaction that erased key material, and
        # journal_size_limit=0 also cuts the WAL back whenever SQLite restarts it from the beginning.
        self.conn.execute("PRAGMA secure_delete=ON")
        if self.conn.execute("PRAGMA secure_delete").fetchone()[0] != 1:
            raise KeyStoreError("this SQLite build cannot overwrite deleted content (secure_delete)")
        self.conn.execute("PRAGMA journal_size_limit=0")
        self.scrub_interval = wal_truncate_interval
        self.conn.execute("PRAGMA busy_timeout=10000")
        # Checkpoints (copying the WAL into the database file, with its own fsync) run on a thread with
        # a second connection instead of inside whichever COMMIT crosses 1000 WAL pages: a PASSIVE
        # checkpoint does not hold the write lock, so deliveries never wait for one (it made the slowest
        # commits 5-10x the median). SQLite's crash recovery is the same either way.
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, args=(str(path), synchronous), name="qkd-keystore-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_loop(self, path: str, synchronous: str) -> None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("PRAGMA busy_timeout=10000")
            while True:
                self._wake.wait()
                self._wake.clear()  # before reading _stop: close() sets _stop, then _wake
                if self._stop.wait(0.25):  # let commits accumulate: one checkpoint for many transactions
                    break
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # the next commit wakes us again
                    log.warning("key store checkpoint failed: %s", type(exc).__name__)
        finally:
            conn.close()

    def committed(self) -> None:
        """A transaction was committed: have the WAL checkpointed soon (not in the committing thread)."""
        self._wake.set()

    def _scrub(self) -> bool:
        """Copy the WAL into the database file and truncate the WAL to zero bytes.

        On the store's own connection between transactions, so it never waits for a writer and no
        writer waits for it on the event loop (the store queues operations meanwhile). Returns False
        if another checkpoint was running (SQLite reports busy; retried a little later).
        """
        busy, _log, _done = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return busy == 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def set_relaxed(self, relaxed: bool) -> None:
        # synchronous=NORMAL in WAL mode: COMMIT appends to the WAL without fsync. The transaction
        # survives a process crash (kill -9); power loss can drop it, but only together with every
        # later transaction: the WAL is replayed in order and any later FULL commit fsyncs it too.
        if relaxed != self._relaxed and self.can_relax:
            self.conn.execute(f"PRAGMA synchronous={'NORMAL' if relaxed else self.synchronous}")
            self._relaxed = relaxed

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._checkpointer.join()
        with contextlib.suppress(sqlite3.Error):  # leave no old page images in the WAL file
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()  # the last connection checkpoints the WAL completely (and removes it)


class _PostgresBackend(_Backend):
    placeholder = "%s"
    blob = "BYTEA"
    bigint = "BIGINT"

    def __init__(self, url: str) -> None:
        import psycopg

        try:
            self.conn = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            raise KeyStoreError(f"cannot connect to the PostgreSQL key store: {type(exc).__name__}") from None

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        cur = self.conn.execute(self._sql(sql), params, prepare=False)
        return cur.fetchall() if cur.description is not None else []

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(self._sql(sql), rows)

    def begin(self) -> None:
        self.conn.execute("BEGIN")

    def close(self) -> None:
        self.conn.close()


def _bump(db: _Backend, link_id: str, changes: dict[tuple[int, int], int]) -> None:
    """Add ``changes[(pool, state)]`` to the chunk counters of ``link_id``.

    The changes are summed in memory (``db.count_delta``) and written once per transaction by
    :func:`_write_counts` (before the COMMIT, and before any operation that reads the counters):
    one upsert per batch instead of one per operation.
    """
    delta = db.count_delta
    for (pool, state), n in changes.items():
        if n:
            key = (link_id, pool, state)
            delta[key] = delta.get(key, 0) + n


def _write_counts(db: _Backend) -> None:
    """Write the counter changes summed by :func:`_bump` (same transaction)."""
    rows = [(link_id, pool, state, n) for (link_id, pool, state), n in db.count_delta.items() if n]
    db.count_delta = {}
    if rows:
        db.executemany(
            "INSERT INTO qkd_counts (link_id, pool, state, n) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (link_id, pool, state) DO UPDATE SET n = qkd_counts.n + excluded.n",
            rows,
        )


def _move(db: _Backend, link_id: str, where: str, params: Sequence[Any], to_state: int) -> None:
    """Count the chunks matching ``where`` by (pool, state) and book them over to ``to_state``."""
    changes: dict[tuple[int, int], int] = {}
    for pool, state, n in db.execute(
        f"SELECT pool, state, COUNT(*) FROM qkd_chunks WHERE {where} GROUP BY pool, state", params
    ):
        if state != to_state:
            changes[(pool, state)] = changes.get((pool, state), 0) - n
            changes[(pool, to_state)] = changes.get((pool, to_state), 0) + n
    _bump(db, link_id, changes)


def _in(n: int) -> str:
    return "(" + ",".join("?" * n) + ")"


# ---------------------------------------------------------------------------------------------
# Operations: plain functions run inside a transaction on the worker thread.


def _op_add_block(db: _Backend, link_id: str, block_id: str, key: bytes, chunk_bits: int, limits: LinkLimits) -> int:
    nbytes = chunk_bits // 8
    n = len(key) // nbytes
    known = db.execute(
        "SELECT seq, n_chunks, chunk_bits FROM qkd_blocks WHERE link_id = ? AND block_id = ?", (link_id, block_id)
    )
    if known:
        return _same_block(db, link_id, block_id, known[0], key, n, chunk_bits)
    stored = _held(db, link_id)
    if stored + n > limits.capacity:
        raise StoreFull(f"link {link_id!r} is full ({stored} of {limits.capacity} chunks); block not stored")
    seq = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM qkd_blocks WHERE link_id = ?", (link_id,))[0][0]
    db.execute(
        "INSERT INTO qkd_blocks (link_id, block_id, seq, n_chunks, chunk_bits, added_at) VALUES (?, ?, ?, ?, ?, ?)",
        (link_id, block_id, seq, n, chunk_bits, time.time()),
    )
    rows = [
        (chunk_id(link_id, block_id, i), link_id, seq, i, i % 2, AVAILABLE, key[i * nbytes : (i + 1) * nbytes])
        for i in range(n)
    ]
    db.executemany(
        "INSERT INTO qkd_chunks (chunk_id, link_id, block_seq, idx, pool, state, material)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    _bump(db, link_id, {(0, AVAILABLE): (n + 1) // 2, (1, AVAILABLE): n // 2})
    return n


def _held(db: _Backend, link_id: str) -> int:
    """Chunks of ``link_id`` held on disk: available (both pools) and reserved (not yet erased).

    The one measure of fullness: :func:`_op_add_block` (capacity), :meth:`KeyStore.can_store`,
    :meth:`KeyStore.is_full` and :meth:`KeyStore.is_low` all count it (via ``qkd_counts``). At the slave's
    site it includes the keys its slave SAEs have not fetched yet, which the master's site has
    already erased: the two sites' counts differ, so the node asks both (``can_store``).
    """
    return db.execute("SELECT COALESCE(SUM(n), 0) FROM qkd_counts WHERE link_id = ? AND state < 2", (link_id,))[0][0]


def _same_block(db: _Backend, link_id: str, block_id: str, known: tuple, key: bytes, n: int, chunk_bits: int) -> int:
    """``add_block`` of a block ID already stored: a no-op if it is the same block, else :class:`BlockConflict`.

    The node retries ``add_block`` after a crash between storing a block and recording that it did
    (the pending file is removed after the store), so the same call must be harmless. The stored
    chunks that are not erased yet are compared with the new bytes in constant time; erased chunks
    cannot be compared (their material is gone) and are taken as equal.
    """
    seq, n_old, bits_old = known
    if n_old != n or bits_old != chunk_bits:
        raise BlockConflict(f"block {block_id!r} is already stored on link {link_id!r} with another length")
    nbytes = chunk_bits // 8
    rows = db.execute(
        "SELECT idx, material FROM qkd_chunks WHERE link_id = ? AND block_seq = ? AND material IS NOT NULL"
        " ORDER BY idx",
        (link_id, seq),
    )
    ours = b"".join(bytes(m) for _i, m in rows)
    theirs = b"".join(key[i * nbytes : (i + 1) * nbytes] for i, _m in rows)
    if not hmac.compare_digest(ours, theirs):
        raise BlockConflict(f"block {block_id!r} is already stored on link {link_id!r} with other key bytes")
    return n


def _op_can_store(db: _Backend, link_id: str, n_chunks: int, limits: LinkLimits) -> bool:
    return _held(db, link_id) + n_chunks <= limits.capacity


def _op_drop_orphans(db: _Backend, link_id: str, chunk_ids: list[str], min_age_s: float) -> list[tuple[str, int]]:
    """Erase the available chunks of the key blocks that hold ``chunk_ids`` (blocks the peer does not hold).

    Only blocks added at least ``min_age_s`` seconds ago (a fresh block may still be on its way into
    the peer's store). Both pools: the peer can use none of the block's chunks either. Reserved
    chunks are left alone (their keys are resolved by their own requests). Returns (block ID,
    chunks erased) per block dropped.
    """
    seqs: dict[int, tuple[str, float]] = {}
    for sl in _slices(chunk_ids):
        for seq, bid, added in db.execute(
            "SELECT DISTINCT c.block_seq, b.block_id, b.added_at FROM qkd_chunks c"
            " JOIN qkd_blocks b ON b.link_id = c.link_id AND b.seq = c.block_seq"
            f" WHERE c.link_id = ? AND c.chunk_id IN {_in(len(sl))}",
            [link_id, *sl],
        ):
            seqs[seq] = (bid, added)
    cutoff = time.time() - min_age_s
    out = []
    for seq, (bid, added) in sorted(seqs.items()):
        if added > cutoff:
            continue
        n = db.execute(
            "SELECT COUNT(*) FROM qkd_chunks WHERE link_id = ? AND block_seq = ? AND state = 0", (link_id, seq)
        )[0][0]
        if not n:
            continue
        _move(db, link_id, "link_id = ? AND block_seq = ? AND state = 0", [link_id, seq], ERASED)
        db.execute(
            "UPDATE qkd_chunks SET state = 2, material = NULL WHERE link_id = ? AND block_seq = ? AND state = 0",
            (link_id, seq),
        )
        db.dirty = True
        out.append((bid, n))
    return out


def _op_reserve(
    db: _Backend,
    link_id: str,
    pool: int,
    number: int,
    size_bits: int,
    chunk_bits: int,
    master: str,
    slaves: list[str],
) -> list[Reservation]:
    ok, value = _reserve_many(db, [(link_id, pool, number, size_bits, chunk_bits, master, slaves)])[0]
    if not ok:
        raise value
    return value


def _reserve_many(db: _Backend, calls: list[tuple]) -> list[tuple[bool, Any]]:
    """Several :func:`_op_reserve` calls (their argument tuples) with one SELECT, UPDATE and INSERT.

    Each call takes the oldest available chunks of its pool left by the calls before it, or is
    refused with :class:`InsufficientKeys` (decided before anything is written).
    """
    results: list[tuple[bool, Any]] = [(False, None)] * len(calls)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault((call[0], call[1]), []).append(i)
    updates: list[tuple] = []
    key_rows: list[tuple] = []
    now = time.time()
    for (link_id, pool), idxs in groups.items():
        needs = [calls[i][2] * chunks_per_key(calls[i][3], calls[i][4]) for i in idxs]
        ids = [
            r[0]
            for r in db.execute(
                "SELECT chunk_id FROM qkd_chunks WHERE link_id = ? AND pool = ? AND state = 0"
                " ORDER BY block_seq, idx LIMIT ?",
                (link_id, pool, sum(needs)),
            )
        ]
        start = 0
        for i, need in zip(idxs, needs, strict=True):
            _link, _pool, number, size_bits, _bits, master, slaves = calls[i]
            if len(ids) - start < need:
                results[i] = (
                    False,
                    InsufficientKeys(
                        f"link {link_id!r} holds {len(ids) - start} chunks for this direction, {need} needed"
                    ),
                )
                continue
            per_key = need // number
            slaves_json = json.dumps(sorted(slaves))
            out: list[Reservation] = []
            for k in range(start, start + need, per_key):
                group = tuple(ids[k : k + per_key])
                out.append(Reservation(group[0], group, size_bits))
                updates.extend((group[0], pos, cid) for pos, cid in enumerate(group))
                key_rows.append((group[0], link_id, size_bits, master, slaves_json, "[]", KEY_PENDING, 1, now))
            start += need
            results[i] = (True, out)
        _bump(db, link_id, {(pool, AVAILABLE): -start, (pool, RESERVED): start})
    if updates:
        db.executemany("UPDATE qkd_chunks SET state = 1, key_id = ?, pos = ? WHERE chunk_id = ? AND state = 0", updates)
        db.executemany(
            "INSERT INTO qkd_keys (key_id, link_id, size_bits, master_sae, slaves, remaining, state, local_master,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            key_rows,
        )
    return results


def _op_accept(
    db: _Backend,
    link_id: str,
    pool: int,
    reservations: list[Reservation],
    chunk_bits: int,
    master: str,
    slaves: list[str],
) -> None:
    ok, value = _accept_many(db, [(link_id, pool, reservations, chunk_bits, master, slaves)])[0]
    if not ok:
        raise value


def _accept_many(db: _Backend, calls: list[tuple]) -> list[tuple[bool, Any]]:
    """Several :func:`_op_accept` calls (peer reservations) with one SELECT per table, one UPDATE, one INSERT.

    Each call is all or nothing and is refused before anything is written: :class:`ChunksTaken` if a
    key ID is known here or a chunk is not available (also when an earlier call of the same batch
    took it), :class:`KeyStoreError` for chunks that are unknown, of another link or of the wrong pool.
    """
    key_ids = list(dict.fromkeys(r.key_id for call in calls for r in call[2]))
    chunk_ids = list(dict.fromkeys(c for call in calls for r in call[2] for c in r.chunk_ids))
    known: set[str] = set()
    for sl in _slices(key_ids):
        known.update(r[0] for r in db.execute(f"SELECT key_id FROM qkd_keys WHERE key_id IN {_in(len(sl))}", sl))
    chunks: dict[str, tuple] = {}
    for sl in _slices(chunk_ids):
        for cid, lk, pl, st in db.execute(
            f"SELECT chunk_id, link_id, pool, state FROM qkd_chunks WHERE chunk_id IN {_in(len(sl))}", sl
        ):
            chunks[cid] = (lk, pl, st)
    now = time.time()
    results: list[tuple[bool, Any]] = []
    updates: list[tuple] = []
    key_rows: list[tuple] = []
    for link_id, pool, reservations, chunk_bits, master, slaves in calls:
        slaves_json = json.dumps(sorted(slaves))
        call_updates: list[tuple] = []
        call_keys: list[tuple] = []
        taken: list[str] = []
        unknown: list[str] = []
        seen: set[str] = set()  # chunks of this call's earlier reservations
        try:
            for r in reservations:
                if len(r.chunk_ids) != chunks_per_key(r.size_bits, chunk_bits):
                    raise KeyStoreError(f"reservation {r.key_id} has the wrong number of chunks for its size")
                if r.key_id in known:
                    # Not idempotent on purpose: the master site never resends a reservation (an unknown
                    # outcome is resolved by discarding), so a known key ID means the master site lost state.
                    taken.extend(r.chunk_ids)
                    continue
                if len(set(r.chunk_ids)) != len(r.chunk_ids):
                    raise KeyStoreError(f"key {r.key_id}: a chunk is listed twice")
                missing = [c for c in r.chunk_ids if c not in chunks]
                if missing:
                    unknown.extend(missing)
                    continue
                busy = []
                for cid in r.chunk_ids:
                    lk, pl, st = chunks[cid]
                    if lk != link_id or pl != pool:
                        raise KeyStoreError(f"key {r.key_id}: chunk from another link or the other site's pool")
                    if st != AVAILABLE or cid in seen:
                        busy.append(cid)
                seen.update(r.chunk_ids)
                if busy:
                    taken.extend(busy)
                    continue
                call_updates.extend((r.key_id, pos, cid) for pos, cid in enumerate(r.chunk_ids))
                call_keys.append(
                    (r.key_id, link_id, r.size_bits, master, slaves_json, slaves_json, KEY_RESERVED, 0, now)
                )
            if unknown:
                # Their key block is not stored here (yet): the master site drops such blocks (kms/kme.py).
                raise ChunksUnknown(f"{len(unknown)} chunks are unknown here (key block not stored here)", unknown)
            if taken:
                raise ChunksTaken(f"{len(taken)} chunks are no longer available (already reserved or erased)", taken)
        except KeyStoreError as exc:
            results.append((False, exc))
            continue
        for key_id, _pos, cid in call_updates:  # later calls of this batch see these as taken
            lk, pl, _st = chunks[cid]
            chunks[cid] = (lk, pl, RESERVED)
            known.add(key_id)
        updates.extend(call_updates)
        key_rows.extend(call_keys)
        _bump(db, link_id, {(pool, AVAILABLE): -len(call_updates), (pool, RESERVED): len(call_updates)})
        results.append((True, None))
    if updates:
        db.executemany("UPDATE qkd_chunks SET state = 1, key_id = ?, pos = ? WHERE chunk_id = ?", updates)
        db.executemany(
            "INSERT INTO qkd_keys (key_id, link_id, size_bits, master_sae, slaves, remaining, state, local_master,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            key_rows,
        )
    return results


def _slices(ids: Sequence[str], n: int = 500) -> list[Sequence[str]]:
    """``ids`` in slices of at most ``n`` (bound parameters per statement stay far below the limits)."""
    return [ids[i : i + n] for i in range(0, len(ids), n)]


def _read_and_erase(db: _Backend, key_rows: list[tuple[str, int]], erase: set[str]) -> list[DeliveredKey]:
    """Concatenate each key's chunks; erase the chunks of keys in ``erase`` (same transaction)."""
    ids = [k for k, _ in key_rows]
    parts: dict[str, list[bytes]] = {k: [] for k in ids}
    changes: dict[tuple[str, int], int] = {}
    for sl in _slices(list(parts)):
        for kid, material, link_id, pool in db.execute(
            f"SELECT key_id, material, link_id, pool FROM qkd_chunks WHERE key_id IN {_in(len(sl))}"
            " ORDER BY key_id, pos",
            sl,
        ):
            if material is None:
                raise KeyStoreError("key material already erased")  # cannot happen if states are consistent
            parts[kid].append(bytes(material))
            if kid in erase:
                changes[(link_id, pool)] = changes.get((link_id, pool), 0) + 1
    out = [DeliveredKey(kid, b"".join(parts[kid])[: size // 8]) for kid, size in key_rows]
    for sl in _slices(sorted(erase)):
        db.execute(f"UPDATE qkd_chunks SET state = 2, material = NULL WHERE key_id IN {_in(len(sl))}", sl)
    if erase:
        db.dirty = True
    for (link_id, pool), n in changes.items():
        _bump(db, link_id, {(pool, RESERVED): -n, (pool, ERASED): n})
    return out


def _op_deliver_master(db: _Backend, key_ids: list[str]) -> list[DeliveredKey]:
    ok, value = _deliver_master_many(db, [(key_ids,)])[0]
    if not ok:
        raise value
    return value


def _deliver_master_many(db: _Backend, calls: list[tuple]) -> list[tuple[bool, Any]]:
    """Several :func:`_op_deliver_master` calls: read and erase all their keys with one statement each.

    A call is refused (:class:`KeyNotFound`) before anything is written if one of its keys is not
    pending here or was already taken by an earlier call of the same batch.
    """
    info: dict[str, tuple] = {}
    for sl in _slices(list(dict.fromkeys(k for (ids,) in calls for k in ids))):
        for r in db.execute(f"SELECT key_id, size_bits, state FROM qkd_keys WHERE key_id IN {_in(len(sl))}", sl):
            info[r[0]] = r
    results: list[tuple[bool, Any]] = []
    claimed: set[str] = set()
    spans: list[tuple[int, int, int]] = []  # (call, start, end) in key_rows
    key_rows: list[tuple[str, int]] = []
    for i, (ids,) in enumerate(calls):
        if any(k not in info or info[k][2] != KEY_PENDING or k in claimed for k in ids):
            results.append((False, KeyNotFound("one or more keys specified are not found on KME")))
            continue
        claimed.update(ids)
        spans.append((i, len(key_rows), len(key_rows) + len(ids)))
        key_rows.extend((k, info[k][1]) for k in ids)
        results.append((True, None))
    if key_rows:
        out = _read_and_erase(db, key_rows, claimed)
        for sl in _slices(sorted(claimed)):
            db.execute(f"UPDATE qkd_keys SET state = 2 WHERE key_id IN {_in(len(sl))}", sl)
        for i, a, b in spans:
            results[i] = (True, out[a:b])
    return results


def _op_deliver_slave(db: _Backend, key_ids: list[str], sae_id: str, master: str | None) -> list[DeliveredKey]:
    rows = db.execute(
        f"SELECT key_id, size_bits, state, slaves, remaining, master_sae, local_master FROM qkd_keys"
        f" WHERE key_id IN {_in(len(key_ids))}",
        key_ids,
    )
    info = {r[0]: r for r in rows}
    unauthorized = False
    for k in key_ids:
        r = info.get(k)
        if r is None or r[6] == 1 or (master is not None and r[5] != master):
            raise KeyNotFound("one or more keys specified are not found on KME")
        if sae_id not in json.loads(r[3]):
            unauthorized = True
    if unauthorized:
        raise KeyNotAuthorized("the requesting SAE is not a slave SAE of one or more keys specified")
    for k in key_ids:
        r = info[k]
        if r[2] != KEY_RESERVED or sae_id not in json.loads(r[4]):
            raise KeyNotFound("one or more keys specified are not found on KME")
    erase: set[str] = set()
    updates = []
    for k in key_ids:
        remaining = [s for s in json.loads(info[k][4]) if s != sae_id]
        if not remaining:
            erase.add(k)
        updates.append((json.dumps(remaining), KEY_DONE if not remaining else KEY_RESERVED, k))
    out = _read_and_erase(db, [(k, info[k][1]) for k in key_ids], erase)
    db.executemany("UPDATE qkd_keys SET remaining = ?, state = ? WHERE key_id = ?", updates)
    return out


def _op_release(db: _Backend, key_ids: list[str]) -> int:
    """Undo a pending reservation whose key bits never left this site (the peer refused it)."""
    rows = db.execute(
        f"SELECT key_id, link_id FROM qkd_keys WHERE key_id IN {_in(len(key_ids))} AND state = 0", key_ids
    )
    ids = [r[0] for r in rows]
    for link_id in {r[1] for r in rows}:
        sub = [r[0] for r in rows if r[1] == link_id]
        _move(db, link_id, f"key_id IN {_in(len(sub))}", sub, AVAILABLE)
    if ids:
        db.execute(f"UPDATE qkd_chunks SET state = 0, key_id = NULL, pos = NULL WHERE key_id IN {_in(len(ids))}", ids)
        db.execute(f"DELETE FROM qkd_keys WHERE key_id IN {_in(len(ids))}", ids)
    return len(ids)


def _op_discard(db: _Backend, link_id: str, chunk_ids: list[str], pool: int | None) -> int:
    """Erase these chunks (whatever their state) and close the keys they belonged to."""
    if pool is not None:
        ph = _in(len(chunk_ids))
        rows = db.execute(f"SELECT chunk_id FROM qkd_chunks WHERE chunk_id IN {ph} AND pool = ?", [*chunk_ids, pool])
        chunk_ids = [r[0] for r in rows]
    if not chunk_ids:
        return 0
    ph = _in(len(chunk_ids))
    keys = db.execute(
        f"SELECT DISTINCT key_id FROM qkd_chunks WHERE chunk_id IN {ph} AND key_id IS NOT NULL", chunk_ids
    )
    rows = db.execute(f"SELECT COUNT(*) FROM qkd_chunks WHERE chunk_id IN {ph} AND state < 2", chunk_ids)
    _move(db, link_id, f"link_id = ? AND chunk_id IN {ph}", [link_id, *chunk_ids], ERASED)
    db.execute(
        f"UPDATE qkd_chunks SET state = 2, material = NULL WHERE link_id = ? AND chunk_id IN {ph}",
        [link_id, *chunk_ids],
    )
    db.dirty = True
    k = [r[0] for r in keys]
    if k:
        db.execute(f"UPDATE qkd_keys SET state = 2, remaining = '[]' WHERE key_id IN {_in(len(k))}", k)
    return rows[0][0]


def _op_pending(db: _Backend, link_id: str) -> list[Reservation]:
    rows = db.execute(
        "SELECT k.key_id, k.size_bits, c.chunk_id FROM qkd_keys k JOIN qkd_chunks c ON c.key_id = k.key_id"
        " WHERE k.link_id = ? AND k.state = 0 ORDER BY k.key_id, c.pos",
        (link_id,),
    )
    groups: dict[str, tuple[int, list[str]]] = {}
    for kid, size, cid in rows:
        groups.setdefault(kid, (size, []))[1].append(cid)
    return [Reservation(k, tuple(c), s) for k, (s, c) in groups.items()]


def _tally(rows: list[tuple]) -> LinkCounts:
    """LinkCounts from (pool, state, count) rows."""
    avail = [0, 0]
    reserved = erased = 0
    for pool, state, n in rows:
        if state == AVAILABLE:
            avail[pool] += n
        elif state == RESERVED:
            reserved += n
        else:
            erased += n
    return LinkCounts((avail[0], avail[1]), reserved, erased)


def _op_counts(db: _Backend, link_id: str) -> LinkCounts:
    return _tally(db.execute("SELECT pool, state, n FROM qkd_counts WHERE link_id = ?", (link_id,)))


def _op_recount(db: _Backend, link_id: str) -> LinkCounts:
    """Counts by a full scan of the chunks (audit of the counters kept by every operation)."""
    return _tally(db.execute(
        "SELECT pool, state, COUNT(*) FROM qkd_chunks WHERE link_id = ? GROUP BY pool, state", (link_id,)
    ))


def _op_chunk_states(db: _Backend, link_id: str) -> dict[str, tuple[int, str | None]]:
    """chunk ID -> (state, key ID) of every chunk of a link (audits and tests; no key material)."""
    return {
        r[0]: (r[1], r[2])
        for r in db.execute("SELECT chunk_id, state, key_id FROM qkd_chunks WHERE link_id = ?", (link_id,))
    }


_CHECK_FIRST = frozenset({_op_reserve, _op_accept, _op_deliver_master, _op_deliver_slave})
"""Operations that raise their refusals before their first write (no SAVEPOINT needed)."""
_RELAXED = frozenset({_op_reserve})
"""Operations committed without fsync (SQLite inline mode with synchronous FULL/EXTRA).

Only the master site's local reservation (key state *pending*). It survives kill -9 like every
commit. Power loss can drop it only if no later transaction reached the disk either (WAL order),
so a lost reservation never had its key delivered here: every delivery commits with fsync. The
chunks then look available again while the peer may hold them reserved; the next attempt to use
them gets ``taken`` from the peer and erases them (kms/kme.py). Durability before a key leaves the
store is unchanged: deliveries, peer reservations and erasures keep the configured synchronous.
"""
_READS_COUNTS = frozenset({_op_add_block, _op_counts, _op_can_store})
"""Operations that read ``qkd_counts``: the summed counter changes are written before them."""
_MERGED: dict[Callable[..., Any], Callable[[_Backend, list[tuple]], list[tuple[bool, Any]]]] = {
    _op_reserve: _reserve_many,
    _op_accept: _accept_many,
    _op_deliver_master: _deliver_master_many,
}
"""Operations of which a batch runs all calls together (fewer statements; each call refused alone)."""


# ---------------------------------------------------------------------------------------------


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
        backend_factory: Callable[[], _Backend],
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
    def _open(factory: Callable[[], _Backend]) -> _Backend:
        db = None
        try:
            db = factory()
            db.begin()
            db.count_delta = {}
            for stmt in db.schema():
                db.execute(stmt)
            db.execute("COMMIT")
        except Exception as exc:
            if db is not None:
                with contextlib.suppress(Exception):
                    db.close()
            if isinstance(exc, KeyStoreError):
                raise
            raise KeyStoreError(f"cannot open key store: {type(exc).__name__}: {exc}") from None
        return db

    def _worker(self, factory: Callable[[], _Backend], ready: queue.SimpleQueue) -> None:
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
    def _exec_batch(db: _Backend, batch: list) -> list[tuple[bool, Any]]:
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
    def _failed(db: _Backend, batch: list, exc: BaseException) -> list[tuple[bool, Any]]:
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
                loop.call_soon_threadsafe(_settle, fut, ok, value)

    def _run_batch(self, db: _Backend, batch: list) -> None:
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
            self._start_scrub()
            return
        if delay is not None and self._scrub_timer is None:
            self._scrub_timer = asyncio.get_running_loop().call_later(delay, self._scrub_timer_fired)
        self._schedule_flush()

    def _scrub_timer_fired(self) -> None:
        self._scrub_timer = None
        if self._closed or self._committing or self._flush_scheduled:
            return  # the commit in flight (or the flush about to run) checks again when it is done
        self._after_commit()

    def _start_scrub(self) -> None:
        """Run :meth:`_Backend.scrub` on the committer thread like a COMMIT: operations queue meanwhile.

        The results of the transaction that erased the keys have already gone to their callers; the
        scrub is off their path, and later operations wait for it as for a commit in flight.
        """
        if self._scrub_timer is not None:
            self._scrub_timer.cancel()
            self._scrub_timer = None
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

    async def add_block(self, link_id: str, block_id: str, key: bytes) -> int:
        """Store a distilled key block agreed by both sites; returns the number of chunks stored.

        ``key`` holds the block's bits packed MSB first (``BitArray.to_bytes()``). Call it with the
        same ``link_id``, ``block_id`` and bytes at both sites. Raises :class:`StoreFull` beyond capacity.
        Idempotent: the same block again (same ID, same bytes) stores nothing and returns the same
        count; the same ID with other bytes or another length raises :class:`BlockConflict`.
        """
        if not isinstance(key, bytes | bytearray | memoryview):
            raise KeyStoreError("key block must be bytes")
        if not block_id:
            raise KeyStoreError("block_id must not be empty")
        return await self._call(
            _op_add_block, link_id, str(block_id), bytes(key), self.chunk_bits, self.limits(link_id)
        )

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
        return KeyStore(lambda: _PostgresBackend(loc), chunk_bits=chunk_bits, limits=limits, description="postgresql")
    if loc.startswith("sqlite:///"):
        loc = loc.removeprefix("sqlite:///")  # SQLAlchemy style: sqlite:///rel.db, sqlite:////abs/path.db
    if synchronous.upper() not in {"FULL", "NORMAL", "EXTRA"}:
        raise ConfigError("synchronous must be FULL, NORMAL or EXTRA")
    sync = synchronous.upper()
    if not 0 <= wal_truncate_interval <= 3600:
        raise ConfigError("wal_truncate_interval must be between 0 and 3600 seconds")
    return KeyStore(
        lambda: _SQLiteBackend(Path(loc), sync, wal_truncate_interval),
        chunk_bits=chunk_bits,
        limits=limits,
        description=f"sqlite:{loc}",
        inline=True if inline is None else inline,
    )
