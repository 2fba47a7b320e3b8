"""A key store restored from an older copy must not deliver a key a second time (issue 10, item 2).

Each KME shows the peer its store's count of erased chunks (which only grows) and keeps the highest count
the peer has shown; a store that shows less than it did was rolled back, and delivery stops there.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from _kms_support import BACKENDS, Sites, factory_fixture
from qkdstack.errors import ChannelError
from qkdstack.kms.kme import KME, KMEConfig, KMEError, link_pair


@pytest.fixture(params=BACKENDS[:1])  # the copy of a database file is SQLite's; the logic is the backend's
def store_factory(request, tmp_path):
    yield from factory_fixture(request.param, tmp_path)


async def test_a_restored_slave_store_does_not_deliver_keys_twice(store_factory, tmp_path):
    sites = await Sites(store_factory).start()
    taken = await sites.a.enc_keys("SAE_A", "SAE_B", number=3)
    ids = [k["key_ID"] for k in taken["keys"]]
    # the operator's backup of site B: the three keys are reserved for SAE_B there, not yet fetched
    b_store = sites.b.store
    b_path = store_factory.location("b")
    b_store.close()
    shutil.copy(b_path, tmp_path / "backup.db")
    sites.b.store = store_factory("b", chunk_bits=sites.key_size)
    sites.link_ab, sites.link_ba = link_pair(sites.a, sites.b)
    await sites.a.attach_peer(sites.link_ab)
    await sites.b.attach_peer(sites.link_ba)
    first = await sites.b.dec_keys("SAE_B", "SAE_A", ids)  # delivered and erased at B
    assert [k["key_ID"] for k in first["keys"]] == ids
    await asyncio.sleep(0.5)  # B's kms.sync shows A the new count
    # B's disk is lost and the backup restored: the three keys are reserved for SAE_B again
    sites.b.store.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"b.db{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.db", b_path)
    restored = KME(KMEConfig("KME_B", "KME_A", frozenset({"SAE_B", "SAE_C"}), key_size=sites.key_size),
                   store_factory("b", chunk_bits=sites.key_size))
    # restarted, B delivers to its slaves only once A has confirmed its store: not yet
    with pytest.raises(KMEError) as before_link:
        await restored.dec_keys("SAE_B", "SAE_A", ids)
    assert before_link.value.status == 503
    link_ab, link_ba = link_pair(sites.a, restored)
    with pytest.raises(ChannelError, match="restored from an older copy"):
        await restored.attach_peer(link_ba)
    assert restored.rolled_back is not None
    with pytest.raises(KMEError) as stopped:
        await restored.dec_keys("SAE_B", "SAE_A", ids)
    assert stopped.value.status == 503 and "stopped" in stopped.value.message
    # A refuses the restored B as well (its hello shows fewer erased chunks than B showed before)
    with pytest.raises(ChannelError, match="restored from an older copy"):
        await sites.a.attach_peer(link_ab)
    await restored.close()
    await sites.stop()


async def test_marks_rise_with_deliveries_and_never_alarm_in_normal_operation(store_factory):
    sites = await Sites(store_factory).start()
    link = sites.a.config.link_id
    for _ in range(5):
        taken = await sites.a.enc_keys("SAE_A", "SAE_B", number=2)
        await sites.b.dec_keys("SAE_B", "SAE_A", [k["key_ID"] for k in taken["keys"]])
        taken = await sites.b.enc_keys("SAE_B", "SAE_A", number=1)
        await sites.a.dec_keys("SAE_A", "SAE_B", [k["key_ID"] for k in taken["keys"]])
    await asyncio.sleep(0.5)
    assert await sites.a.store.peer_mark(link) == (await sites.b.store.counts(link)).erased > 0
    assert await sites.b.store.peer_mark(link) == (await sites.a.store.counts(link)).erased > 0
    assert sites.a.rolled_back is None and sites.b.rolled_back is None
    # a reconnection (the node's link comes back) passes the check
    sites.link_ab, sites.link_ba = link_pair(sites.a, sites.b)
    await sites.a.attach_peer(sites.link_ab)
    await sites.b.attach_peer(sites.link_ba)
    await sites.agree()
    await sites.stop()
