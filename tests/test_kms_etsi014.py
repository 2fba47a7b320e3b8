"""ETSI GS QKD 014 over real mutual TLS: two KMEs, SAE certificates made by the test, both backends."""

from __future__ import annotations

import asyncio
import base64
import ssl
import uuid

import httpx
import pytest

from _kms_support import BACKENDS, PKI, Sites, factory_fixture
from qkdstack.kms.kme import KME

NOT_FOUND = "one or more keys specified are not found on KME"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path):
    yield from factory_fixture(request.param, tmp_path)


@pytest.fixture
async def sites(store_factory, pki):
    s = await Sites(store_factory).start(pki)
    yield s
    await s.stop()


def client(pki: PKI, name: str | None, srv, site: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=srv.url, verify=pki.client_context(name, site), timeout=10)


async def test_master_takes_slave_fetches_once_third_refused(sites, pki):
    async with (
        client(pki, "SAE_A", sites.srv_a, "A") as sae_a,
        client(pki, "SAE_B", sites.srv_b, "B") as sae_b,
        client(pki, "SAE_C", sites.srv_b, "B") as sae_c,
    ):
        st = (await sae_a.get("/api/v1/keys/SAE_B/status")).json()
        assert st["source_KME_ID"] == "KME_A" and st["target_KME_ID"] == "KME_B"
        assert st["master_SAE_ID"] == "SAE_A" and st["slave_SAE_ID"] == "SAE_B"
        assert st["key_size"] == 256 and st["stored_key_count"] > 0 and st["min_key_size"] == 64
        for f in ("max_key_count", "max_key_per_request", "max_key_size", "max_SAE_ID_count"):
            assert isinstance(st[f], int)
        r = await sae_a.get("/api/v1/keys/SAE_B/enc_keys", params={"number": 2, "size": 512})
        assert r.status_code == 200, r.text
        keys = r.json()["keys"]
        assert len(keys) == 2 and all(len(base64.b64decode(k["key"])) == 64 for k in keys)
        ids = [k["key_ID"] for k in keys]
        assert all(uuid.UUID(i) for i in ids)
        # a third SAE (registered at B, but not named as slave) is refused
        r = await sae_c.post("/api/v1/keys/SAE_A/dec_keys", json={"key_IDs": [{"key_ID": ids[0]}]})
        assert r.status_code == 401 and "message" in r.json()
        # the slave gets identical bytes, once
        r = await sae_b.post("/api/v1/keys/SAE_A/dec_keys", json={"key_IDs": [{"key_ID": i} for i in ids]})
        assert r.status_code == 200, r.text
        assert r.json()["keys"] == keys
        r = await sae_b.get("/api/v1/keys/SAE_A/dec_keys", params={"key_ID": ids[0]})
        assert r.status_code == 400 and r.json()["message"] == NOT_FOUND
        # the master's own KME never hands the key out again either
        r = await sae_a.get("/api/v1/keys/SAE_B/dec_keys", params={"key_ID": ids[0]})
        assert r.status_code == 400
    await sites.agree()


async def test_both_directions_concurrently_never_share_bits(sites, pki):
    async with (
        client(pki, "SAE_A", sites.srv_a, "A") as sae_a,
        client(pki, "SAE_B", sites.srv_b, "B") as sae_b,
    ):

        async def take(c, slave, n):
            out = []
            for _ in range(n):
                r = await c.post(f"/api/v1/keys/{slave}/enc_keys", json={"number": 3})
                assert r.status_code == 200, r.text
                out += r.json()["keys"]
            return out

        got = await asyncio.gather(take(sae_a, "SAE_B", 8), take(sae_b, "SAE_A", 8), take(sae_a, "SAE_B", 8))
        a_keys, b_keys = got[0] + got[2], got[1]
        all_keys = a_keys + b_keys
        assert len({k["key_ID"] for k in all_keys}) == len(all_keys) == 72
        assert len({k["key"] for k in all_keys}) == 72
        fetched_b = await sae_b.post(
            "/api/v1/keys/SAE_A/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in a_keys]}
        )
        assert fetched_b.json()["keys"] == a_keys
        fetched_a = await sae_a.post(
            "/api/v1/keys/SAE_B/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in b_keys]}
        )
        assert fetched_a.json()["keys"] == b_keys
    await sites.agree()


async def test_multiple_slaves(sites, pki):
    async with (
        client(pki, "SAE_A", sites.srv_a, "A") as sae_a,
        client(pki, "SAE_B", sites.srv_b, "B") as sae_b,
        client(pki, "SAE_C", sites.srv_b, "B") as sae_c,
    ):
        r = await sae_a.post("/api/v1/keys/SAE_B/enc_keys", json={"additional_slave_SAE_IDs": ["SAE_C"]})
        key = r.json()["keys"][0]
        for c in (sae_b, sae_c):
            r = await c.get("/api/v1/keys/SAE_A/dec_keys", params={"key_ID": key["key_ID"]})
            assert r.json()["keys"] == [key]
            r = await c.get("/api/v1/keys/SAE_A/dec_keys", params={"key_ID": key["key_ID"]})
            assert r.status_code == 400


@pytest.mark.parametrize("who", [None, "rogue", "expired"])
async def test_tls_refuses_missing_foreign_or_expired_certificates(sites, pki, who):
    async with client(pki, who, sites.srv_a, "A") as c:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, ssl.SSLError)):
            await c.get("/api/v1/keys/SAE_B/status")


async def test_unknown_sae_id_is_unauthorized(sites, pki):
    async with client(pki, "SAE_X", sites.srv_a, "A") as c:
        for r in (
            await c.get("/api/v1/keys/SAE_B/status"),
            await c.get("/api/v1/keys/SAE_B/enc_keys"),
            await c.post("/api/v1/keys/SAE_B/dec_keys", json={"key_IDs": []}),
        ):
            assert r.status_code == 401 and r.json()["message"]


async def test_malformed_requests(sites, pki):
    async with client(pki, "SAE_A", sites.srv_a, "A") as c:
        base = "/api/v1/keys/SAE_B"

        async def check(resp, status, message=None):
            assert resp.status_code == status, resp.text
            body = resp.json()
            assert isinstance(body["message"], str)
            if message:
                assert body["message"] == message
            assert isinstance(body.get("details", []), list)

        await check(await c.get(f"{base}/enc_keys", params={"size": 100}), 400, "size shall be a multiple of 8")
        await check(await c.get(f"{base}/enc_keys", params={"size": 8}), 400)  # below min_key_size
        await check(await c.get(f"{base}/enc_keys", params={"size": 1 << 20}), 400)
        await check(await c.get(f"{base}/enc_keys", params={"size": "abc"}), 400)
        for n in (-1, 0, 10**6, 10**30):
            await check(await c.get(f"{base}/enc_keys", params={"number": n}), 400)
        await check(await c.post(f"{base}/enc_keys", json={"number": -5}), 400)
        await check(await c.post(f"{base}/enc_keys", json={"size": 12}), 400, "size shall be a multiple of 8")
        await check(
            await c.post(f"{base}/enc_keys", content=b"{not json", headers={"content-type": "application/json"}), 400
        )
        await check(await c.post(f"{base}/enc_keys", json=[1, 2]), 400)
        await check(
            await c.post(f"{base}/enc_keys", json={"extension_mandatory": [{"abc_route": "x"}]}),
            400,
            "not all extension_mandatory parameters are supported",
        )
        await check(await c.post(f"{base}/enc_keys", json={"additional_slave_SAE_IDs": ["NOBODY"]}), 400)
        await check(await c.get("/api/v1/keys/NOBODY/enc_keys"), 400)
        await check(await c.get("/api/v1/keys/NOBODY/status"), 400)
        await check(await c.get(f"{base}/dec_keys", params={"key_ID": str(uuid.uuid4())}), 400, NOT_FOUND)
        await check(await c.get(f"{base}/dec_keys", params={"key_ID": "not-a-uuid"}), 400, NOT_FOUND)
        await check(await c.get(f"{base}/dec_keys"), 400)
        await check(await c.post(f"{base}/dec_keys"), 400)
        await check(await c.post(f"{base}/dec_keys", json={"key_IDs": "x"}), 400)
        await check(await c.get("/api/v1/nothing"), 404)
        # an empty POST means the defaults; extension_optional is ignored
        r = await c.post(f"{base}/enc_keys")
        assert r.status_code == 200 and len(r.json()["keys"]) == 1
        r = await c.post(f"{base}/enc_keys", json={"extension_optional": [{"foo": 1}]})
        assert r.status_code == 200
        spec = (await c.get("/openapi.json")).json()
        assert {"/api/v1/keys/{slave_SAE_ID}/status", "/api/v1/keys/{master_SAE_ID}/dec_keys"} <= set(spec["paths"])


async def test_exhaustion_is_503(store_factory, pki):
    s = await Sites(store_factory, blocks=1, block_bytes=32 * 4).start(pki)
    try:
        async with client(pki, "SAE_A", s.srv_a, "A") as c:
            assert (await c.get("/api/v1/keys/SAE_B/enc_keys", params={"number": 2})).status_code == 200
            r = await c.get("/api/v1/keys/SAE_B/enc_keys")
            assert r.status_code == 503 and r.json()["message"]
    finally:
        await s.stop()


async def test_peer_failures_keep_stores_in_agreement(store_factory):
    s = await Sites(store_factory).start()
    try:
        a: KME = s.a
        # link down before the request: peer reserved nothing... but the outcome is unknown to A
        s.link_ab.down = True
        with pytest.raises(Exception, match="did not confirm"):
            await a.enc_keys("SAE_A", "SAE_B", 2)
        await asyncio.sleep(0.05)
        assert len(await a.store.pending(a.config.link_id)) == 2  # discard could not reach the peer
        s.link_ab.down = False
        assert await a.resync() == 2
        await s.agree()
        # the peer reserved, but its answer was lost: B holds a reservation A never delivered
        s.link_ab.lose_replies = True
        with pytest.raises(Exception, match="did not confirm"):
            await a.enc_keys("SAE_A", "SAE_B", 1)
        s.link_ab.lose_replies = False
        for _ in range(100):  # the background discard resolves it
            if not await a.store.pending(a.config.link_id):
                break
            await asyncio.sleep(0.01)
        await s.agree()
        # a refusal (unknown slave at the peer) releases the keys: nothing lost
        before = (await a.store.counts(a.config.link_id)).available
        a.remote_sae_ids = a.remote_sae_ids | {"GHOST"}
        with pytest.raises(Exception, match="not known"):
            await a.enc_keys("SAE_A", "GHOST", 1)
        assert (await a.store.counts(a.config.link_id)).available == before
        await s.agree()
    finally:
        await s.stop()


async def test_site_that_lost_recent_transactions_resynchronises(tmp_path):
    """Site A's database goes back in time (e.g. power loss with synchronous=NORMAL): A would pick chunks
    the peer already used; the peer answers "taken", A erases them and takes fresh ones."""
    import shutil

    from _kms_support import StoreFactory

    factory = StoreFactory("sqlite", tmp_path)
    s = await Sites(factory).start()
    try:
        link = s.a.config.link_id
        s.a.store.close()
        shutil.copy(tmp_path / "a.db", tmp_path / "a.snapshot")
        s.a.store = factory("a", chunk_bits=256)
        first = await s.a.enc_keys("SAE_A", "SAE_B", 2)
        s.a.store.close()
        shutil.copy(tmp_path / "a.snapshot", tmp_path / "a.db")
        s.a.store = factory("a", chunk_bits=256)
        second = await s.a.enc_keys("SAE_A", "SAE_B", 2)  # internal retry after the peer's "taken"
        assert {k["key_ID"] for k in first["keys"]}.isdisjoint(k["key_ID"] for k in second["keys"])
        assert {k["key"] for k in first["keys"]}.isdisjoint(k["key"] for k in second["keys"])
        got = await s.b.dec_keys("SAE_B", "SAE_A", [k["key_ID"] for k in first["keys"] + second["keys"]])
        assert got["keys"] == first["keys"] + second["keys"]
        await s.agree()
        assert (await s.a.store.counts(link)).available == (await s.b.store.counts(link)).available
    finally:
        await s.stop()


async def test_unknown_sae_gets_401_even_for_malformed_requests(sites, pki):
    async with client(pki, "SAE_X", sites.srv_a, "A") as c:
        r = await c.get("/api/v1/keys/SAE_B/enc_keys", params={"number": "many"})
        assert r.status_code == 401 and r.json()["message"]


async def test_tls_1_2_busy_port_and_bad_config(sites, pki):
    from qkdstack.errors import ConfigError
    from qkdstack.kms.etsi014 import serve_etsi014, server_ssl_context
    from qkdstack.kms.kme import KMEConfig

    assert server_ssl_context(pki.tls("A")).minimum_version == ssl.TLSVersion.TLSv1_2
    ctx = pki.client_context("SAE_A", "A")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.2 clients are served (1.3 in the other tests)
    async with httpx.AsyncClient(base_url=sites.srv_a.url, verify=ctx) as c:
        assert (await c.get("/api/v1/keys/SAE_B/status")).status_code == 200
    with pytest.raises(ConfigError):
        async with serve_etsi014(sites.a, "127.0.0.1", sites.srv_a.port, pki.tls("A")):
            pass
    with pytest.raises(ConfigError):
        KMEConfig("KME_A", "KME_A")
    with pytest.raises(ConfigError, match="multiple of 8"):
        KMEConfig("KME_A", "KME_B", key_size=100)


def test_fast_path_takes_only_plain_integer_queries():
    from qkdstack.kms.etsi014 import _enc_keys_query

    assert _enc_keys_query(b"") == {}
    assert _enc_keys_query(b"number=2&size=512") == {"number": 2, "size": 512}
    assert _enc_keys_query(b"number=-1") == {"number": -1}  # the KME refuses it with 400
    for q in (b"number=2&number=3", b"size=abc", b"size=", b"size", b"size=%31", b"other=1", b"number=1" + b"0" * 60):
        assert _enc_keys_query(q) is None  # FastAPI parses and validates these


async def test_fast_path_and_framework_answer_alike(sites, pki):
    """GET enc_keys (fast path) and POST enc_keys (FastAPI) give the same codes and bodies."""
    base = "/api/v1/keys/SAE_B/enc_keys"
    async with client(pki, "SAE_A", sites.srv_a, "A") as c, client(pki, "SAE_X", sites.srv_a, "A") as x:
        for params, body in (({"size": 100}, {"size": 100}), ({"number": 0}, {"number": 0}), ({}, {})):
            fast, slow = await c.get(base, params=params), await c.post(base, json=body)
            assert fast.status_code == slow.status_code
            assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
            if fast.status_code != 200:
                assert fast.json() == slow.json()
            else:
                assert len(fast.json()["keys"]) == len(slow.json()["keys"]) == 1
        fast, slow = await x.get(base), await x.post(base, json={})
        assert fast.status_code == slow.status_code == 401 and fast.json() == slow.json()
        r = await c.get("/api/v1/keys/NOBODY/enc_keys", params={"number": 1})
        assert r.status_code == 400 and r.json()["details"] == [{"slave_SAE_ID": "NOBODY"}]
        r = await c.get(base, params={"size": "abc"})  # not for the fast path: FastAPI's validation, as 400
        assert r.status_code == 400 and r.json()["details"][0]["location"] == "query.size"
    await sites.agree()


def test_gc_tuning_for_serving_freezes_startup_objects():
    import subprocess
    import sys

    code = (
        "import gc; from qkdstack.kms.etsi014 import tune_gc_for_serving; tune_gc_for_serving(); "
        "assert gc.get_freeze_count() > 10_000 and gc.get_threshold()[0] == 50_000, gc.get_threshold()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
