"""The interface every key-store backend implements (one database connection each).

The store (kms/store.py) runs the SQL operations of kms/operations.py through it, only ever from
one thread at a time. Backends: kms/backend_sqlite.py (default) and kms/backend_postgres.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("qkdstack.kms.store")


class Backend:
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

    def prepare_scrub(self, done: Callable[[], None]) -> bool:
        """Start work that makes the next :meth:`scrub` shorter, off the store's threads; ``done`` is
        called (from another thread) when it is finished. False: nothing to prepare, scrub now."""
        return False

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

    def migrate(self) -> None:
        """Add the columns a store made by an older qkdstack lacks (after :meth:`schema`, same transaction).

        ``qkd_blocks.proof`` (nullable JSON text): the block's proof, returned with its keys on request.
        """
        if self.blob == "BYTEA":  # PostgreSQL
            self.execute("ALTER TABLE qkd_blocks ADD COLUMN IF NOT EXISTS proof TEXT")
        elif "proof" not in {row[1] for row in self.execute("PRAGMA table_info(qkd_blocks)")}:
            self.execute("ALTER TABLE qkd_blocks ADD COLUMN proof TEXT")

    def schema(self) -> list[str]:
        b, big = self.blob, self.bigint
        return [
            f"""CREATE TABLE IF NOT EXISTS qkd_blocks (
                link_id TEXT NOT NULL, block_id TEXT NOT NULL, seq {big} NOT NULL,
                n_chunks INTEGER NOT NULL, chunk_bits INTEGER NOT NULL, added_at DOUBLE PRECISION NOT NULL,
                proof TEXT,
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
            # The highest erased-chunk count the peer KME has shown for each link: a peer whose store shows
            # fewer was restored from an older copy (rollback check, see kme.py).
            f"""CREATE TABLE IF NOT EXISTS qkd_peer_marks (
                link_id TEXT PRIMARY KEY, peer_erased {big} NOT NULL)""",
        ]
