"""The key store's operations: plain functions run inside a transaction, on any backend.

Each takes the backend (one open transaction) and its arguments, and either returns its result or
raises a :class:`~qkdstack.errors.KeyStoreError`. The store (kms/store.py) batches them (group
commit). The SQL is the subset SQLite and PostgreSQL share (``?`` placeholders, translated by the
PostgreSQL backend).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from qkdstack.errors import KeyStoreError
from qkdstack.kms.backend import Backend
from qkdstack.kms.records import (
    AVAILABLE,
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


def _bump(db: Backend, link_id: str, changes: dict[tuple[int, int], int]) -> None:
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


def _write_counts(db: Backend) -> None:
    """Write the counter changes summed by :func:`_bump` (same transaction)."""
    rows = [(link_id, pool, state, n) for (link_id, pool, state), n in db.count_delta.items() if n]
    db.count_delta = {}
    if rows:
        db.executemany(
            "INSERT INTO qkd_counts (link_id, pool, state, n) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (link_id, pool, state) DO UPDATE SET n = qkd_counts.n + excluded.n",
            rows,
        )


def _move(db: Backend, link_id: str, where: str, params: Sequence[Any], to_state: int) -> None:
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


def _op_add_block(
    db: Backend, link_id: str, block_id: str, key: bytes, chunk_bits: int, limits: LinkLimits, proof: str | None = None
) -> int:
    nbytes = chunk_bits // 8
    n = len(key) // nbytes
    known = db.execute(
        "SELECT seq, n_chunks, chunk_bits FROM qkd_blocks WHERE link_id = ? AND block_id = ?", (link_id, block_id)
    )
    if known:
        n = _same_block(db, link_id, block_id, known[0], key, n, chunk_bits)
        if proof is not None:  # a retried add_block may bring the proof a first call lacked
            db.execute("UPDATE qkd_blocks SET proof = ? WHERE link_id = ? AND block_id = ? AND proof IS NULL",
                       (proof, link_id, block_id))
        return n
    stored = _held(db, link_id)
    if stored + n > limits.capacity:
        raise StoreFull(f"link {link_id!r} is full ({stored} of {limits.capacity} chunks); block not stored")
    seq = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM qkd_blocks WHERE link_id = ?", (link_id,))[0][0]
    db.execute(
        "INSERT INTO qkd_blocks (link_id, block_id, seq, n_chunks, chunk_bits, added_at, proof)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (link_id, block_id, seq, n, chunk_bits, time.time(), proof),
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


def _held(db: Backend, link_id: str) -> int:
    """Chunks of ``link_id`` held on disk: available (both pools) and reserved (not yet erased).

    The one measure of fullness: :func:`_op_add_block` (capacity), :meth:`KeyStore.can_store`,
    :meth:`KeyStore.is_full` and :meth:`KeyStore.is_low` all count it (via ``qkd_counts``). At the slave's
    site it includes the keys its slave SAEs have not fetched yet, which the master's site has
    already erased: the two sites' counts differ, so the node asks both (``can_store``).
    """
    return db.execute("SELECT COALESCE(SUM(n), 0) FROM qkd_counts WHERE link_id = ? AND state < 2", (link_id,))[0][0]


def _same_block(db: Backend, link_id: str, block_id: str, known: tuple, key: bytes, n: int, chunk_bits: int) -> int:
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


def _op_can_store(db: Backend, link_id: str, n_chunks: int, limits: LinkLimits) -> bool:
    return _held(db, link_id) + n_chunks <= limits.capacity


def _op_drop_orphans(db: Backend, link_id: str, chunk_ids: list[str], min_age_s: float) -> list[tuple[str, int]]:
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
    db: Backend,
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


def _reserve_many(db: Backend, calls: list[tuple]) -> list[tuple[bool, Any]]:
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
    db: Backend,
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


def _accept_many(db: Backend, calls: list[tuple]) -> list[tuple[bool, Any]]:
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


def _read_and_erase(db: Backend, key_rows: list[tuple[str, int]], erase: set[str]) -> list[DeliveredKey]:
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


def _op_proofs(db: Backend, key_ids: list[str]) -> dict[str, list[tuple[str, str | None]]]:
    """For each key: (block ID, proof JSON or None) of the key blocks its chunks come from, in key order."""
    out: dict[str, list[tuple[str, str | None]]] = {k: [] for k in key_ids}
    for sl in _slices(list(out)):
        for kid, block_id, proof in db.execute(
            "SELECT c.key_id, b.block_id, b.proof FROM qkd_chunks c"
            " JOIN qkd_blocks b ON b.link_id = c.link_id AND b.seq = c.block_seq"
            f" WHERE c.key_id IN {_in(len(sl))} ORDER BY c.key_id, c.pos",
            sl,
        ):
            if not out[kid] or out[kid][-1][0] != block_id:
                out[kid].append((block_id, proof))
    return out


def _op_deliver_master(db: Backend, key_ids: list[str]) -> list[DeliveredKey]:
    ok, value = _deliver_master_many(db, [(key_ids,)])[0]
    if not ok:
        raise value
    return value


def _deliver_master_many(db: Backend, calls: list[tuple]) -> list[tuple[bool, Any]]:
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


def _op_deliver_slave(db: Backend, key_ids: list[str], sae_id: str, master: str | None) -> list[DeliveredKey]:
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


def _op_release(db: Backend, key_ids: list[str]) -> int:
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


def _op_discard(db: Backend, link_id: str, chunk_ids: list[str], pool: int | None) -> int:
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


def _op_pending(db: Backend, link_id: str) -> list[Reservation]:
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


def _op_counts(db: Backend, link_id: str) -> LinkCounts:
    return _tally(db.execute("SELECT pool, state, n FROM qkd_counts WHERE link_id = ?", (link_id,)))


def _op_peer_mark(db: Backend, link_id: str) -> int:
    """The highest erased-chunk count the peer KME has shown for ``link_id`` (0 if none yet)."""
    rows = db.execute("SELECT peer_erased FROM qkd_peer_marks WHERE link_id = ?", (link_id,))
    return int(rows[0][0]) if rows else 0


def _op_raise_peer_mark(db: Backend, link_id: str, peer_erased: int) -> int:
    """Raise the peer's mark to ``peer_erased`` (never lower it); returns the mark now stored."""
    old = _op_peer_mark(db, link_id)
    if peer_erased > old:
        if db.execute("SELECT 1 FROM qkd_peer_marks WHERE link_id = ?", (link_id,)):
            db.execute("UPDATE qkd_peer_marks SET peer_erased = ? WHERE link_id = ?", (peer_erased, link_id))
        else:
            db.execute("INSERT INTO qkd_peer_marks (link_id, peer_erased) VALUES (?, ?)", (link_id, peer_erased))
        return peer_erased
    return old


def _op_recount(db: Backend, link_id: str) -> LinkCounts:
    """Counts by a full scan of the chunks (audit of the counters kept by every operation)."""
    return _tally(db.execute(
        "SELECT pool, state, COUNT(*) FROM qkd_chunks WHERE link_id = ? GROUP BY pool, state", (link_id,)
    ))


def _op_chunk_states(db: Backend, link_id: str) -> dict[str, tuple[int, str | None]]:
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
_MERGED: dict[Callable[..., Any], Callable[[Backend, list[tuple]], list[tuple[bool, Any]]]] = {
    _op_reserve: _reserve_many,
    _op_accept: _accept_many,
    _op_deliver_master: _deliver_master_many,
}
"""Operations of which a batch runs all calls together (fewer statements; each call refused alone)."""
