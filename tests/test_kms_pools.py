"""Two pools under one-way traffic: the unused pool must not fill the store and starve the used one.

Key generation pauses at the high-water mark, which counts both pools. When only site A's SAEs take
keys (one-way traffic, or a relay that always sends the same way), B's pool used to fill the store while
A's ran dry: generation stopped and A's consumers got 503 for good. Each KME now trims its own pool to
half the high-water mark once the link is at the mark, at both sites (kms/kme.py, ``trim_own_pool``).
Real stores on both backends; two KMEs joined by the in-process peer link.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest

from _kms_support import BACKENDS, factory_fixture
from qkdstack.kms.kme import KME, KMEConfig, link_pair
from qkdstack.kms.store import LinkLimits

LIMITS = LinkLimits(capacity=200, high_water=160, low_water=40)
"""In chunks of 256 bits: a block of 20 chunks is a round's key."""


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path):
    yield from factory_fixture(request.param, tmp_path)


async def _sites(store_factory) -> tuple[KME, KME]:
    a = KME(KMEConfig("KME_A", "KME_B", frozenset({"SAE_A"})), store_factory("a", limits=LIMITS))
    b = KME(KMEConfig("KME_B", "KME_A", frozenset({"SAE_B"})), store_factory("b", limits=LIMITS))
    ab, ba = link_pair(a, b)
    await a.attach_peer(ab)
    await b.attach_peer(ba)
    return a, b


async def _settled(*kmes: KME) -> None:
    for _ in range(200):
        if not any(k._background for k in kmes):
            return
        await asyncio.sleep(0.01)


async def test_one_way_traffic_never_starves_the_used_pool(store_factory):
    a, b = await _sites(store_factory)
    link = a.config.link_id
    delivered = 0
    for i in range(40):  # the node's loop: generate while not full, and A's SAE takes what it can
        if not await a.is_full() and not await b.is_full():
            block = secrets.token_bytes(32 * 20)
            await a.add_block(f"block-{i}", block)
            await b.add_block(f"block-{i}", block)
            await _settled(a, b)
        got = await a.enc_keys("SAE_A", "SAE_B", number=4)
        back = await b.dec_keys("SAE_B", "SAE_A", [k["key_ID"] for k in got["keys"]])
        assert [k["key"] for k in got["keys"]] == [k["key"] for k in back["keys"]]
        delivered += 4
        for kme in (a, b):
            counts = await kme.store.counts(link)
            assert counts.available[1] <= LIMITS.high_water // 2 + 20, counts  # B's pool capped (one block of slack)
    assert delivered == 160  # A's consumers were served every time: generation never stopped for good
    # The two stores still hold exactly the same chunks.
    assert await a.store.counts(link) == await b.store.counts(link)


async def test_a_trim_only_erases_the_owners_pool_and_both_sites_alike(store_factory):
    a, b = await _sites(store_factory)
    link = a.config.link_id
    for i in range(8):  # 160 chunks: at the high-water mark, 80 in each pool
        block = secrets.token_bytes(32 * 20)
        await a.add_block(f"b{i}", block)
        await b.add_block(f"b{i}", block)
    await _settled(a, b)
    got = await a.enc_keys("SAE_A", "SAE_B", number=5)  # A's pool 75, B's 80: 155 chunks held
    await b.dec_keys("SAE_B", "SAE_A", [k["key_ID"] for k in got["keys"]])
    assert not await a.is_full()
    block = secrets.token_bytes(32 * 20)
    await a.add_block("b8", block)  # 175 held: over the mark, B's pool 90, A's 85
    await b.add_block("b8", block)
    await _settled(a, b)
    ca, cb = await a.store.counts(link), await b.store.counts(link)
    assert ca == cb  # the same chunks erased at both sites
    assert (ca.available[0], ca.available[1]) == (80, 80)  # each owner trimmed its own pool to half the mark
    got = await a.enc_keys("SAE_A", "SAE_B", number=80)  # and what is left is whole and the same at both sites
    back = await b.dec_keys("SAE_B", "SAE_A", [k["key_ID"] for k in got["keys"]])
    assert [k["key"] for k in got["keys"]] == [k["key"] for k in back["keys"]]
