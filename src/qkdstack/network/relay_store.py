"""Relayed keys at the destination site, until their slave SAEs fetch them (docs/network.md).

A key relayed to this site is stored here under its end-to-end key ID for the named slave SAE(s) of
this site and the master SAE, with the path it crossed. ``dec_keys`` takes it: all or nothing, once
per slave SAE; when the last slave has it, the row is deleted. The file is SQLite, created 0600, in
WAL mode with ``secure_delete`` (deleted rows are overwritten with zeros in the database file) and a
WAL checkpoint with truncation after every deletion, so erased keys do not linger in the ``-wal``
file either. ``synchronous=FULL``: a key is durable before the source hears that it arrived.

Key bytes never appear in logs, reprs or exception messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qkdstack.errors import KeyStoreError
from qkdstack.kms.store import KeyNotAuthorized, KeyNotFound

_SCHEMA = """
CREATE TABLE IF NOT EXISTS relayed (
    key_id TEXT PRIMARY KEY,
    master TEXT NOT NULL,
    slaves TEXT NOT NULL,
    waiting TEXT NOT NULL,
    key BLOB NOT NULL,
    path TEXT NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL
)
"""


@dataclass(frozen=True)
class RelayedKey:
    """A relayed key as stored or delivered (bytes kept out of the repr)."""

    key_id: str
    key: bytes = field(repr=False)
    path: tuple[str, ...] = ()


class RelayStore:
    """The relay store of one site. Open with :func:`open_relay_store`; all methods are coroutines."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Create the file 0600 before SQLite opens it: SQLite gives its -wal and -shm files the same mode.
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"cannot open the relay store {self.path}: {type(exc).__name__}") from None
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RelayStore({str(self.path)!r})"

    async def _run(self, fn, *args):
        if self._closed:
            raise KeyStoreError("the relay store is closed")
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn, *args):
        with self._lock:
            if self._closed:
                raise KeyStoreError("the relay store is closed")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(*args)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise KeyStoreError(f"relay store operation failed: {type(exc).__name__}") from None
            if isinstance(out, tuple) and out and out[0] == "deleted":
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                out = out[1]
            return out

    # -- operations ----------------------------------------------------------------------------

    async def put(
        self, keys: Sequence[RelayedKey], master: str, slaves: Sequence[str], source: str
    ) -> None:
        """Store ``keys`` for ``slaves`` (all or nothing). A key ID already here is refused (KeyStoreError)."""

        def op() -> None:
            now = time.time()
            for k in keys:
                if self._db.execute("SELECT 1 FROM relayed WHERE key_id = ?", (k.key_id,)).fetchone():
                    raise KeyStoreError("a relayed key with this ID is already stored")
                self._db.execute(
                    "INSERT INTO relayed VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (k.key_id, master, json.dumps(list(slaves)), json.dumps(list(slaves)), k.key,
                     json.dumps(list(k.path)), source, now),
                )

        await self._run(op)

    async def take(self, key_ids: Sequence[str], slave: str, master: str) -> list[RelayedKey]:
        """Deliver keys to ``slave`` once (all or nothing); a key is deleted when its last slave has it.

        :class:`KeyNotFound`: unknown, another master, or already delivered to this SAE.
        :class:`KeyNotAuthorized`: the SAE is not a slave of the key.
        """

        def op():
            out: list[RelayedKey] = []
            deleted = False
            for kid in key_ids:
                row = self._db.execute(
                    "SELECT master, slaves, waiting, key, path FROM relayed WHERE key_id = ?", (kid,)
                ).fetchone()
                if row is None or row[0] != master:
                    raise KeyNotFound("one or more keys specified are not found on KME")
                slaves, waiting = json.loads(row[1]), json.loads(row[2])
                if slave not in slaves:
                    raise KeyNotAuthorized("the SAE is not authorized to get one or more keys specified")
                if slave not in waiting:
                    raise KeyNotFound("one or more keys specified are not found on KME")
                waiting.remove(slave)
                if waiting:
                    self._db.execute("UPDATE relayed SET waiting = ? WHERE key_id = ?", (json.dumps(waiting), kid))
                else:
                    self._db.execute("DELETE FROM relayed WHERE key_id = ?", (kid,))
                    deleted = True
                out.append(RelayedKey(kid, bytes(row[3]), tuple(json.loads(row[4]))))
            return ("deleted", out) if deleted else out

        if len(set(key_ids)) != len(key_ids):
            raise KeyNotFound("one or more keys specified are not found on KME")
        return await self._run(op)

    async def void(self, key_ids: Sequence[str], source: str) -> int:
        """Delete keys that ``source`` relayed here (its relay failed); returns how many were deleted."""

        def op():
            n = 0
            for kid in key_ids:
                n += self._db.execute("DELETE FROM relayed WHERE key_id = ? AND source = ?", (kid, source)).rowcount
            return ("deleted", n) if n else n

        return await self._run(op)

    async def contains(self, key_ids: Sequence[str]) -> list[bool]:
        """For each key ID, whether a relayed key with it is stored here."""

        def op():
            return [
                self._db.execute("SELECT 1 FROM relayed WHERE key_id = ?", (k,)).fetchone() is not None
                for k in key_ids
            ]

        return await self._run(op)

    async def count(self) -> int:
        """The number of relayed keys stored (not yet fetched by all their slaves)."""
        return await self._run(lambda: self._db.execute("SELECT COUNT(*) FROM relayed").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()


def open_relay_store(path: str | os.PathLike[str]) -> RelayStore:
    """Open (creating 0600 if needed) the relay store at ``path`` (a SQLite file)."""
    return RelayStore(path)
