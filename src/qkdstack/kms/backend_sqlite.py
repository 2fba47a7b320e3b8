"""SQLite backend of the key store: WAL mode, 0600 files, checkpoints off the commit path, erased keys scrubbed."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qkdstack.errors import KeyStoreError
from qkdstack.kms.backend import Backend, log


class SQLiteBackend(Backend):
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
        # most every wal_truncate_interval seconds after a transaction that erased key material.
        # journal_size_limit cuts a WAL over 16 MiB back when SQLite restarts it from the beginning
        # (a bound on disk use; 0 cut it on every restart and cost about 5 % of the throughput).
        self.conn.execute("PRAGMA secure_delete=ON")
        if self.conn.execute("PRAGMA secure_delete").fetchone()[0] != 1:
            raise KeyStoreError("this SQLite build cannot overwrite deleted content (secure_delete)")
        self.conn.execute(f"PRAGMA journal_size_limit={16 << 20}")
        self.scrub_interval = wal_truncate_interval
        self.conn.execute("PRAGMA busy_timeout=10000")
        # Checkpoints (copying the WAL into the database file, with its own fsync) run on a thread with
        # a second connection instead of inside whichever COMMIT crosses 1000 WAL pages: a PASSIVE
        # checkpoint does not hold the write lock, so deliveries never wait for one (it made the slowest
        # commits 5-10x the median). SQLite's crash recovery is the same either way.
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        self._cv = threading.Condition()
        self._woken = False  # a commit since the last checkpoint
        self._stopping = False
        self._prepare: Callable[[], None] | None = None  # see prepare_scrub
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
                with self._cv:
                    self._cv.wait_for(lambda: self._woken or self._stopping or self._prepare is not None)
                    if self._prepare is None and not self._stopping:
                        # let commits accumulate: one checkpoint for many transactions
                        self._cv.wait_for(lambda: self._stopping or self._prepare is not None, timeout=0.25)
                    if self._stopping:
                        break
                    self._woken = False
                    prepared, self._prepare = self._prepare, None
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # the next commit wakes us again
                    log.warning("key store checkpoint failed: %s", type(exc).__name__)
                if prepared is not None:
                    with contextlib.suppress(Exception):  # e.g. the store's event loop is gone
                        prepared()
        finally:
            conn.close()

    def committed(self) -> None:
        """A transaction was committed: have the WAL checkpointed soon (not in the committing thread)."""
        with self._cv:
            self._woken = True
            self._cv.notify()

    def prepare_scrub(self, done: Callable[[], None]) -> bool:
        """Checkpoint (PASSIVE) on the checkpointer thread now, then call ``done`` from that thread.

        The copy and its fsync then happen while transactions go on, and the :meth:`scrub` that
        follows (which no transaction may overlap) only copies the frames committed since.
        """
        with self._cv:
            self._prepare = done
            self._cv.notify()
        return True

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
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._checkpointer.join()
        with contextlib.suppress(sqlite3.Error):  # leave no old page images in the WAL file
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()  # the last connection checkpoints the WAL completely (and removes it)
