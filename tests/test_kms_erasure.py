"""Erased keys leave no trace in the SQLite files (issue 10, item 6).

Keys are delivered through the real store and KME APIs on real SQLite files, and then the raw bytes
of the database file, its ``-wal`` and its ``-shm`` are searched for every delivered key (and for
16-byte pieces of it) while the store is still open: none may be found. Undelivered keys are still
found in the files (so the search itself works).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from pathlib import Path

import pytest

from _kms_support import Sites, StoreFactory
from qkdstack.kms.store import chunk_id, open_store

LINK = "A-B"


def _pieces(key: bytes) -> list[bytes]:
    """The key and its 16-byte windows at every 8-byte offset (a page holds a chunk in one piece)."""
    return [key] + [key[i : i + 16] for i in range(0, max(1, len(key) - 15), 8)]


def _files(db: Path) -> dict[str, bytes]:
    out = {}
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{db}{suffix}")
        out[p.name] = p.read_bytes() if p.exists() else b""
    return out


def _found(files: dict[str, bytes], keys: list[bytes]) -> list[tuple[int, str]]:
    return [
        (i, name) for i, k in enumerate(keys) for name, data in files.items() for piece in _pieces(k) if piece in data
    ]


async def _until_clean(db: Path, keys: list[bytes], within: float) -> dict[str, bytes]:
    """The files of ``db`` once none of ``keys`` is in them; fails if that takes longer than ``within`` s.

    The truncation runs off the request's path (docs/kms.md gives the window), so the files are
    read again until they are clean; ``within`` is far above the window, for loaded test machines.
    """
    deadline = time.monotonic() + within
    while True:
        files = _files(db)
        found = _found(files, keys)
        if not found:
            return files
        assert time.monotonic() < deadline, f"erased key bytes still in {sorted({n for _, n in found})}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "worker-thread"])
async def test_delivered_keys_are_not_in_any_sqlite_file(tmp_path, inline):
    """Store API: deliveries at the master and the slave site, and a discard, then grep db/-wal/-shm."""
    a = open_store(tmp_path / "a.db", wal_truncate_interval=0.0, inline=inline)
    b = open_store(tmp_path / "b.db", wal_truncate_interval=0.0, inline=inline)
    try:
        block = secrets.token_bytes(32 * 64)
        for s in (a, b):
            await s.add_block(LINK, "blk", block)
        delivered: list[bytes] = []
        for _ in range(5):
            res = await a.reserve(LINK, 0, 3, 256, "SAE_A", ["SAE_B"])
            await b.accept(LINK, 0, res, "SAE_A", ["SAE_B"])
            got_a = await a.deliver_master([r.key_id for r in res])
            got_b = await b.deliver_slave([r.key_id for r in res], "SAE_B", master="SAE_A")
            assert [k.key for k in got_a] == [k.key for k in got_b]
            delivered += [k.key for k in got_a]
        # a discard (recovery of an unknown outcome) erases too: chunk 1 (pool 1) was never delivered
        await a.discard(LINK, [chunk_id(LINK, "blk", 1)])
        await b.discard(LINK, [chunk_id(LINK, "blk", 1)])
        erased = [*delivered, block[32:64]]
        for db in (tmp_path / "a.db", tmp_path / "b.db"):
            files = await _until_clean(db, erased, within=5.0)
            # the search works: undelivered chunks (pool 1, index 3 on) are still in the files
            assert _found(files, [block[32 * 3 : 32 * 4]]), "the undelivered key is not in the files?"
    finally:
        a.close()
        b.close()


async def test_default_window_through_the_kme(tmp_path):
    """KME enc_keys / dec_keys with the default truncation window: gone once the window has passed."""
    f = StoreFactory("sqlite", tmp_path)
    sites = await Sites(f, blocks=2, block_bytes=32 * 64).start()
    try:
        delivered: list[bytes] = []
        for master, slave, m_sae, s_sae in ((sites.a, sites.b, "SAE_A", "SAE_B"), (sites.b, sites.a, "SAE_B", "SAE_A")):
            for _ in range(4):
                got = await master.enc_keys(m_sae, s_sae, number=2, size=512)
                ids = [k["key_ID"] for k in got["keys"]]
                back = await slave.dec_keys(s_sae, m_sae, ids)
                keys = [base64.b64decode(k["key"]) for k in got["keys"]]
                assert keys == [base64.b64decode(k["key"]) for k in back["keys"]]
                delivered += keys
        window = sites.a.store.wal_truncate_interval
        assert 0 < window <= 1.0
        for name in ("a", "b"):
            files = await _until_clean(Path(f.location(name)), delivered, within=window + 5.0)
            assert sum(len(d) for d in files.values()) > 0
    finally:
        await sites.stop()
        f.close_all()
