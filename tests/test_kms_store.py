"""Key store: same tests on SQLite and PostgreSQL (parametrised ``store_factory``)."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat

import pytest

from _kms_support import BACKENDS, factory_fixture
from qkdstack.errors import KeyStoreError
from qkdstack.kms.store import (
    ERASED,
    ChunksTaken,
    InsufficientKeys,
    KeyNotAuthorized,
    KeyNotFound,
    LinkLimits,
    Reservation,
    StoreFull,
    chunk_id,
    open_store,
)

LINK = "A-B"


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path):
    yield from factory_fixture(request.param, tmp_path)


async def test_chunk_ids_are_deterministic_and_hold_no_key_bits(store_factory):
    a, b = store_factory("a"), store_factory("b")
    block = secrets.token_bytes(32 * 10 + 5)  # 10 chunks of 256 bits and a dropped remainder
    assert await a.add_block(LINK, "round-1", block) == 10
    assert await b.add_block(LINK, "round-1", block) == 10
    sa, sb = await a.chunk_states(LINK), await b.chunk_states(LINK)
    assert set(sa) == set(sb) == {chunk_id(LINK, "round-1", i) for i in range(10)}
    # IDs depend only on (link, block, index): another key block under the same block ID gives the same IDs.
    assert chunk_id(LINK, "round-1", 3) == chunk_id(LINK, "round-1", 3) != chunk_id(LINK, "round-2", 3)
    assert await a.add_block(LINK, "round-1", block) == 10  # the same block again: a no-op


async def test_master_reserve_peer_accept_deliver_identical(store_factory):
    a, b = store_factory("a"), store_factory("b")
    block = secrets.token_bytes(32 * 16)
    for s in (a, b):
        await s.add_block(LINK, "blk", block)
    res = await a.reserve(LINK, 0, 3, 512, "SAE_A", ["SAE_B"])
    assert len(res) == 3 and all(len(r.chunk_ids) == 2 for r in res)
    # pool 0 = even chunk indices, in order
    assert res[0].chunk_ids == (chunk_id(LINK, "blk", 0), chunk_id(LINK, "blk", 2))
    await b.accept(LINK, 0, res, "SAE_A", ["SAE_B"])
    with pytest.raises(KeyStoreError, match="no longer available"):  # never accepted twice
        await b.accept(LINK, 0, res, "SAE_A", ["SAE_B"])
    got_a = await a.deliver_master([r.key_id for r in res])
    got_b = await b.deliver_slave([r.key_id for r in res], "SAE_B", master="SAE_A")
    assert [k.key for k in got_a] == [k.key for k in got_b]
    assert got_a[0].key == block[0:32] + block[64:96]
    assert all(len(k.key) == 64 for k in got_a)
    assert "key=" not in repr(got_a[0])
    # each key once
    with pytest.raises(KeyNotFound):
        await a.deliver_master([res[0].key_id])
    with pytest.raises(KeyNotFound, match="not found on KME"):
        await b.deliver_slave([res[0].key_id], "SAE_B")
    # material erased at both sites
    for s in (a, b):
        states = await s.chunk_states(LINK)
        assert all(states[c][0] == ERASED for r in res for c in r.chunk_ids)
        assert await s.counts(LINK) == await s.recount(LINK)


async def test_slave_rules_and_partial_sizes(store_factory):
    a, b = store_factory("a"), store_factory("b")
    block = secrets.token_bytes(32 * 8)
    for s in (a, b):
        await s.add_block(LINK, "blk", block)
    res = await a.reserve(LINK, 1, 1, 136, "SAE_A", ["SAE_B", "SAE_C"])
    await b.accept(LINK, 1, res, "SAE_A", ["SAE_B", "SAE_C"])
    kid = res[0].key_id
    with pytest.raises(KeyNotAuthorized):
        await b.deliver_slave([kid], "SAE_X")
    with pytest.raises(KeyNotFound):
        await b.deliver_slave([kid], "SAE_B", master="SAE_OTHER")
    with pytest.raises(KeyNotFound):
        await b.deliver_slave([kid, kid], "SAE_B")
    one = await b.deliver_slave([kid], "SAE_B")
    assert one[0].key == block[32:49]  # pool 1 starts at chunk 1; 136 bits = 17 bytes
    with pytest.raises(KeyNotFound):
        await b.deliver_slave([kid], "SAE_B")
    two = await b.deliver_slave([kid], "SAE_C")  # each slave once; erased after the last
    assert two[0].key == one[0].key
    assert (await b.chunk_states(LINK))[kid][0] == ERASED
    # a slave SAE cannot use dec_keys on keys its own site handed to a master
    with pytest.raises(KeyNotFound):
        await a.deliver_slave([kid], "SAE_B")


async def test_all_or_nothing_and_unknown_ids(store_factory):
    a, b = store_factory("a"), store_factory("b")
    block = secrets.token_bytes(32 * 8)
    for s in (a, b):
        await s.add_block(LINK, "blk", block)
    res = await a.reserve(LINK, 0, 2, 256, "SAE_A", ["SAE_B"])
    await b.accept(LINK, 0, res, "SAE_A", ["SAE_B"])
    with pytest.raises(KeyNotFound):
        await b.deliver_slave([res[0].key_id, "00000000-0000-0000-0000-000000000000"], "SAE_B")
    got = await b.deliver_slave([r.key_id for r in res], "SAE_B")  # nothing was consumed above
    assert len(got) == 2
    with pytest.raises(InsufficientKeys):
        await a.reserve(LINK, 0, 3, 256, "SAE_A", ["SAE_B"])  # 2 even chunks left, 3 asked


async def test_accept_refuses_foreign_pool_and_taken_chunks(store_factory):
    a, b = store_factory("a"), store_factory("b")
    block = secrets.token_bytes(32 * 8)
    for s in (a, b):
        await s.add_block(LINK, "blk", block)
    res_a = await a.reserve(LINK, 0, 1, 256, "SAE_A", ["SAE_B"])
    with pytest.raises(KeyStoreError, match="pool"):
        await b.accept(LINK, 1, res_a, "SAE_A", ["SAE_B"])
    await b.accept(LINK, 0, res_a, "SAE_A", ["SAE_B"])
    res_b = await b.reserve(LINK, 1, 1, 256, "SAE_B", ["SAE_A"])
    assert not set(res_b[0].chunk_ids) & set(res_a[0].chunk_ids)
    # a different key claiming an already reserved chunk is refused
    from qkdstack.kms.store import Reservation

    bogus = Reservation(chunk_id(LINK, "blk", 2), (chunk_id(LINK, "blk", 2),), 256)
    await b.accept(LINK, 0, [bogus], "SAE_A", ["SAE_B"])
    c2, c4 = chunk_id(LINK, "blk", 2), chunk_id(LINK, "blk", 4)
    with pytest.raises(KeyStoreError, match="no longer available"):
        await b.accept(LINK, 0, [Reservation(c4, (c4, c2), 512)], "SAE_A", ["SAE_B"])
    assert (await b.chunk_states(LINK))[c4][0] == 0  # the failed accept changed nothing
    with pytest.raises(KeyStoreError, match="unknown"):
        await b.accept(LINK, 0, [Reservation(chunk_id(LINK, "zzz", 0), (chunk_id(LINK, "zzz", 0),), 256)], "M", ["S"])


async def test_release_and_discard(store_factory):
    a = store_factory("a")
    await a.add_block(LINK, "blk", secrets.token_bytes(32 * 4))
    res = await a.reserve(LINK, 0, 1, 256, "SAE_A", ["SAE_B"])
    assert [r.key_id for r in await a.pending(LINK)] == [res[0].key_id]
    assert await a.release([res[0].key_id]) == 1
    assert (await a.counts(LINK)).available == (2, 2)
    res = await a.reserve(LINK, 0, 2, 256, "SAE_A", ["SAE_B"])
    assert await a.discard(LINK, list(res[0].chunk_ids) + list(res[1].chunk_ids)) == 2
    assert await a.pending(LINK) == []
    c = await a.counts(LINK)
    assert c.available == (0, 2) and c.erased == 2 and c.reserved == 0
    assert c == await a.recount(LINK)


async def test_capacity_and_water_marks(store_factory):
    s = store_factory("a", limits=LinkLimits(capacity=10, high_water=8, low_water=4), chunk_bits=64)
    assert await s.is_low(LINK) and not await s.is_full(LINK)
    await s.add_block(LINK, "b1", secrets.token_bytes(8 * 5))
    assert not await s.is_low(LINK) and not await s.is_full(LINK)
    await s.add_block(LINK, "b2", secrets.token_bytes(8 * 3))
    assert await s.is_full(LINK)
    with pytest.raises(StoreFull):
        await s.add_block(LINK, "b3", secrets.token_bytes(8 * 3))
    assert (await s.counts(LINK)).stored == 8


async def test_concurrent_reservations_never_share_chunks(store_factory):
    s = store_factory("a")
    await s.add_block(LINK, "blk", secrets.token_bytes(32 * 400))
    results = await asyncio.gather(*(s.reserve(LINK, i % 2, 3, 256, "M", ["S"]) for i in range(60)))
    chunks = [c for res in results for r in res for c in r.chunk_ids]
    assert len(chunks) == len(set(chunks)) == 180
    delivered = await asyncio.gather(*(s.deliver_master([r.key_id for r in res]) for res in results))
    keys = [k.key for batch in delivered for k in batch]
    assert len(set(keys)) == len(keys)
    assert await s.counts(LINK) == await s.recount(LINK)


async def test_one_batch_refuses_calls_alone(store_factory):
    """Calls queued together share statements, but each is refused on its own and nothing is shared."""
    s = store_factory("a")
    await s.add_block(LINK, "blk", secrets.token_bytes(32 * 20))  # 10 chunks per pool
    got = await asyncio.gather(
        *(s.reserve(LINK, 0, n, 256, "M", ["S"]) for n in (4, 8, 3, 1, 2)), return_exceptions=True
    )
    assert [len(g) if isinstance(g, list) else type(g) for g in got] == [4, InsufficientKeys, 3, 1, 2]
    chunks = [c for g in got if isinstance(g, list) for r in g for c in r.chunk_ids]
    assert len(chunks) == len(set(chunks)) == 10
    k = [[r.key_id for r in g] for g in got if isinstance(g, list)]
    out = await asyncio.gather(
        s.deliver_master(k[0]),
        s.deliver_master(k[0][:1]),  # already taken by the call before it in the same batch
        s.deliver_master([chunk_id(LINK, "blk", 1)]),  # not a pending key
        s.deliver_master(k[1] + k[2]),
        return_exceptions=True,
    )
    assert [len(o) if isinstance(o, list) else type(o) for o in out] == [4, KeyNotFound, KeyNotFound, 4]
    assert len({key.key for o in out if isinstance(o, list) for key in o}) == 8
    with pytest.raises(KeyNotFound):  # delivered once only, also across batches
        await s.deliver_master(k[1][:1])
    assert len(await s.deliver_master(k[3])) == 2
    assert (await s.counts(LINK)).available == (0, 10)
    assert await s.counts(LINK) == await s.recount(LINK)


async def test_restart_keeps_state(store_factory):
    a = store_factory("a")
    await a.add_block(LINK, "blk", secrets.token_bytes(32 * 4))
    res = await a.reserve(LINK, 0, 1, 256, "M", ["S"])
    await a.deliver_master([res[0].key_id])
    a.close()
    a2 = store_factory("a")
    c = await a2.counts(LINK)
    assert c.erased == 1 and c.available == (1, 2)
    with pytest.raises(KeyNotFound):
        await a2.deliver_master([res[0].key_id])


def test_sqlite_files_are_private(tmp_path):
    path = tmp_path / "sub" / "keys.db"
    s = open_store(path)
    try:
        for p in (path, tmp_path / "sub" / "keys.db-wal", tmp_path / "sub" / "keys.db-shm"):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    finally:
        s.close()


async def test_bad_block_and_params(tmp_path):
    s = open_store(tmp_path / "k.db")
    try:
        with pytest.raises(KeyStoreError):
            await s.add_block(LINK, "", b"x" * 32)
        with pytest.raises(KeyStoreError):
            await s.reserve(LINK, 0, 1, 12, "M", ["S"])
        assert "sqlite" in repr(s)
    finally:
        s.close()


async def test_close_from_the_loop_while_a_commit_is_in_flight(tmp_path):
    s = open_store(tmp_path / "k.db")
    adding = asyncio.ensure_future(s.add_block(LINK, "b", secrets.token_bytes(32 * 10)))
    for _ in range(3):
        await asyncio.sleep(0)  # let the batch run and its COMMIT start on the helper thread
    s.close()  # must neither deadlock nor lose the committed block
    assert await asyncio.wait_for(adding, 10) == 10
    s2 = open_store(tmp_path / "k.db")
    try:
        assert (await s2.counts(LINK)).available == (5, 5)
        with pytest.raises(KeyStoreError, match="closed"):
            await s.counts(LINK)
    finally:
        s2.close()


async def test_sqlite_only_local_reservations_commit_without_fsync(tmp_path):
    """Reservations commit with synchronous=NORMAL; accept, delivery and erasure keep FULL (fsync first)."""
    a, b = open_store(tmp_path / "a.db"), open_store(tmp_path / "b.db")
    try:
        block = secrets.token_bytes(32 * 16)
        for s in (a, b):
            await s.add_block(LINK, "blk", block)
        commits: list[tuple[str, str]] = []  # (synchronous in force at the COMMIT, the transaction's SQL)

        def trace(store) -> None:
            state = {"sync": "FULL", "txn": []}

            def cb(sql: str) -> None:
                if sql.startswith("PRAGMA synchronous="):
                    state["sync"] = sql.removeprefix("PRAGMA synchronous=")
                state["txn"].append(sql)
                if sql == "COMMIT":
                    commits.append((state["sync"], " ".join(state["txn"])))
                    state["txn"] = []

            store._db.conn.set_trace_callback(cb)

        trace(a)
        trace(b)
        res = await a.reserve(LINK, 0, 2, 256, "SAE_A", ["SAE_B"])
        await b.accept(LINK, 0, res, "SAE_A", ["SAE_B"])
        await a.deliver_master([r.key_id for r in res])
        await b.deliver_slave([r.key_id for r in res], "SAE_B", master="SAE_A")
        await a.discard(LINK, [chunk_id(LINK, "blk", 4)])
        relaxed = [t for sync, t in commits if sync == "NORMAL"]
        durable = [t for sync, t in commits if sync == "FULL"]
        assert len(relaxed) == 1 and "UPDATE qkd_chunks SET state = 1" in relaxed[0]  # the reservation only
        assert len(durable) == 4 and sum("material = NULL" in t for t in durable) == 3  # both deliveries, discard
        assert "material = NULL" not in relaxed[0]
    finally:
        a.close()
        b.close()


async def test_peer_reservations_of_one_batch_never_share_chunks(store_factory):
    """Concurrent accepts: a chunk or key ID goes to the first call only; a malformed call fails alone."""
    a, b = store_factory("a"), store_factory("b")
    block = secrets.token_bytes(32 * 20)
    for s in (a, b):
        await s.add_block(LINK, "blk", block)
    res = await a.reserve(LINK, 0, 4, 256, "SAE_A", ["SAE_B"])
    foreign = Reservation(chunk_id(LINK, "blk", 1), (chunk_id(LINK, "blk", 1),), 256)  # pool 1
    twice = Reservation(res[3].key_id, (res[3].chunk_ids[0],), 256)
    out = await asyncio.gather(
        b.accept(LINK, 0, res[:2], "SAE_A", ["SAE_B"]),
        b.accept(LINK, 0, res[1:3], "SAE_A", ["SAE_B"]),  # res[1] was taken by the call before
        b.accept(LINK, 0, [foreign], "SAE_A", ["SAE_B"]),
        b.accept(LINK, 0, [res[3], twice], "SAE_A", ["SAE_B"]),  # one chunk twice in one message
        b.accept(LINK, 0, [res[2]], "SAE_A", ["SAE_B"]),
        return_exceptions=True,
    )
    assert out[0] is None and out[4] is None
    assert isinstance(out[1], ChunksTaken) and set(out[1].chunk_ids) == set(res[1].chunk_ids)
    assert isinstance(out[2], KeyStoreError) and not isinstance(out[2], ChunksTaken)
    assert isinstance(out[3], ChunksTaken)
    states = await b.chunk_states(LINK)
    assert [states[r.key_id] for r in res] == [(1, res[0].key_id), (1, res[1].key_id), (1, res[2].key_id), (0, None)]
    assert await b.counts(LINK) == await b.recount(LINK)
