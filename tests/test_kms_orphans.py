"""Key blocks at one site only, blocks added twice, and the fullness checks (issue 10, item 5).

Real stores on both backends; two KMEs joined by the in-process peer link.
"""

from __future__ import annotations

import base64
import logging
import secrets

import pytest

from _kms_support import BACKENDS, factory_fixture
from qkdstack.errors import KeyStoreError
from qkdstack.kms.kme import KME, KMEConfig, KMEError, link_pair
from qkdstack.kms.store import (
    AVAILABLE,
    ERASED,
    BlockConflict,
    ChunksUnknown,
    LinkLimits,
    StoreFull,
    chunk_id,
)

LINK = "A-B"


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path):
    yield from factory_fixture(request.param, tmp_path)


async def _sites(store_factory, grace: float) -> tuple[KME, KME]:
    a = KME(KMEConfig("KME_A", "KME_B", frozenset({"SAE_A"}), orphan_grace_s=grace), store_factory("a"))
    b = KME(KMEConfig("KME_B", "KME_A", frozenset({"SAE_B"}), orphan_grace_s=grace), store_factory("b"))
    ab, ba = link_pair(a, b)
    await a.attach_peer(ab)
    await b.attach_peer(ba)
    return a, b


async def _exchange(master: KME, slave: KME, m_sae: str, s_sae: str, number: int) -> list[bytes]:
    got = await master.enc_keys(m_sae, s_sae, number=number)
    back = await slave.dec_keys(s_sae, m_sae, [k["key_ID"] for k in got["keys"]])
    keys = [base64.b64decode(k["key"]) for k in got["keys"]]
    assert keys == [base64.b64decode(k["key"]) for k in back["keys"]], "the sites handed out different keys"
    return keys


@pytest.mark.parametrize("orphan_at", ["A", "B"])
async def test_block_at_one_site_only_costs_its_own_keys(store_factory, orphan_at, caplog):
    a, b = await _sites(store_factory, grace=0.0)
    sites = {"A": (a, b, "SAE_A", "SAE_B"), "B": (b, a, "SAE_B", "SAE_A")}
    master, slave, m_sae, s_sae = sites[orphan_at]
    orphan = secrets.token_bytes(32 * 20)
    await master.add_block("orphan", orphan)  # the oldest block, at one site only
    shared = [secrets.token_bytes(32 * 20) for _ in range(2)]
    for i, blk in enumerate(shared):
        await a.add_block(f"round-{i}", blk)
        await b.add_block(f"round-{i}", blk)
    link = a.config.link_id
    with caplog.at_level(logging.WARNING, logger="qkdstack.kms.kme"):
        keys = await _exchange(master, slave, m_sae, s_sae, number=3)  # answered 503 for good before the fix
    assert all(k not in orphan for k in keys)
    assert "orphan" in caplog.text and orphan.hex()[:16] not in caplog.text
    # the orphan block is gone at its site (both pools), and nothing of it reached the other site
    states = await master.store.chunk_states(link)
    assert all(states[chunk_id(link, "orphan", i)][0] == ERASED for i in range(20))
    assert chunk_id(link, "orphan", 0) not in await slave.store.chunk_states(link)
    # both directions keep working, and no key bits were handed out twice
    more = await _exchange(slave, master, s_sae, m_sae, number=4) + await _exchange(master, slave, m_sae, s_sae, 4)
    assert len(set(keys + more)) == len(keys + more) == 11
    for kme in (a, b):
        assert await kme.store.pending(link) == []
        assert await kme.store.counts(link) == await kme.store.recount(link)
    sa, sb = await a.store.chunk_states(link), await b.store.chunk_states(link)
    for cid in set(sa) & set(sb):
        assert (sa[cid][0] == AVAILABLE) == (sb[cid][0] == AVAILABLE)
    await a.close()
    await b.close()


async def test_fresh_block_missing_at_the_peer_is_kept(store_factory):
    """Within the grace period the block may still be on its way into the peer's store: keep it."""
    a, b = await _sites(store_factory, grace=3600.0)
    blk = secrets.token_bytes(32 * 8)
    await a.add_block("round-0", blk)
    with pytest.raises(KMEError) as err:
        await a.enc_keys("SAE_A", "SAE_B")
    assert err.value.status == 503
    link = a.config.link_id
    assert (await a.store.counts(link)).available == (4, 4)  # nothing erased, nothing pending
    assert await a.store.pending(link) == []
    await b.add_block("round-0", blk)  # the peer catches up
    assert await _exchange(a, b, "SAE_A", "SAE_B", 2) == [blk[0:32], blk[64:96]]
    await a.close()
    await b.close()


async def test_accept_names_every_unknown_chunk(store_factory):
    a, b = store_factory("a"), store_factory("b")
    await a.add_block(LINK, "only-a", secrets.token_bytes(32 * 8))
    res = await a.reserve(LINK, 0, 2, 512, "SAE_A", ["SAE_B"])
    with pytest.raises(ChunksUnknown) as err:
        await b.accept(LINK, 0, res, "SAE_A", ["SAE_B"])
    assert err.value.chunk_ids == [c for r in res for c in r.chunk_ids]
    assert "only-a" not in str(err.value)


async def test_add_block_twice(store_factory):
    s = store_factory("a", chunk_bits=256)
    block = secrets.token_bytes(32 * 10 + 7)
    assert await s.add_block(LINK, "blk", block) == 10
    before = await s.counts(LINK)
    assert await s.add_block(LINK, "blk", block) == 10  # the same block again: a no-op
    assert await s.counts(LINK) == before == await s.recount(LINK)
    other = bytearray(block)
    other[40] ^= 1
    with pytest.raises(BlockConflict) as err:
        await s.add_block(LINK, "blk", bytes(other))
    assert block.hex()[:16] not in str(err.value) and "other key bytes" in str(err.value)
    with pytest.raises(BlockConflict, match="length"):
        await s.add_block(LINK, "blk", block[: 32 * 9])
    # after deliveries the block is still recognised (erased chunks cannot be compared, the rest can)
    res = await s.reserve(LINK, 0, 2, 256, "M", ["S"])
    await s.deliver_master([r.key_id for r in res])
    assert await s.add_block(LINK, "blk", block) == 10
    with pytest.raises(BlockConflict):
        await s.add_block(LINK, "blk", bytes(other))
    assert await s.counts(LINK) == await s.recount(LINK)
    assert (await s.counts(LINK)).erased == 2


async def test_fullness_counts_the_slave_sites_reserved_chunks(store_factory):
    limits = LinkLimits(capacity=12, high_water=10, low_water=2)
    a, b = store_factory("a", limits=limits, chunk_bits=64), store_factory("b", limits=limits, chunk_bits=64)
    block = secrets.token_bytes(8 * 10)
    for s in (a, b):
        await s.add_block(LINK, "b1", block)
        assert await s.can_store(LINK, 64 * 2) and not await s.can_store(LINK, 64 * 3)
        assert await s.can_store(LINK, 64 * 3 - 1)  # a remainder shorter than a chunk is dropped
    res = await a.reserve(LINK, 0, 2, 64, "SAE_A", ["SAE_B"])
    await b.accept(LINK, 0, res, "SAE_A", ["SAE_B"])
    await a.deliver_master([r.key_id for r in res])
    # A erased the two keys; B keeps them reserved until its slave SAE fetches them
    assert (await a.counts(LINK)).stored == 8 and (await b.counts(LINK)).stored == 10
    assert await a.can_store(LINK, 64 * 4) and not await b.can_store(LINK, 64 * 4)
    assert await b.is_full(LINK) and not await a.is_full(LINK)
    with pytest.raises(StoreFull):
        await b.add_block(LINK, "b2", secrets.token_bytes(8 * 4))
    assert await b.counts(LINK) == await b.recount(LINK)
    assert await b.add_block(LINK, "b1", block) == 10  # a block already stored is no StoreFull
    await b.deliver_slave([r.key_id for r in res], "SAE_B")
    assert await b.can_store(LINK, 64 * 4)
    assert await b.add_block(LINK, "b2", secrets.token_bytes(8 * 4)) == 4
    assert not await b.can_store(LINK, 64)
    with pytest.raises(KeyStoreError):  # negative sizes are refused
        await b.can_store(LINK, -1)
