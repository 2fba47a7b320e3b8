"""In-unit delivery: Unix socket with peer credentials, and the in-process Python API."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from _kms_support import BACKENDS, Sites, factory_fixture
from qkdstack.kms.kme import KMEError
from qkdstack.kms.local import LocalConsumer, LocalKeyClient, serve_local


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path):
    yield from factory_fixture(request.param, tmp_path)


@pytest.fixture
async def sites(store_factory):
    s = await Sites(store_factory).start()
    yield s
    await s.stop()


async def test_socket_admits_allowed_uid_and_matches_python_api(sites, tmp_path):
    me = os.getuid()
    path = tmp_path / "run" / "keys.sock"
    async with serve_local(sites.a, path, {me: "SAE_A"}) as _srv, LocalKeyClient(path) as c:
        assert oct(path.stat().st_mode & 0o777) == oct(0o660)
        status, body = await c.status("SAE_B")
        assert status == 200 and body["master_SAE_ID"] == "SAE_A" and body["stored_key_count"] > 0
        status, body = await c.enc_keys("SAE_B", number=2, size=128)
        assert status == 200 and len(body["keys"]) == 2
        assert all(len(base64.b64decode(k["key"])) == 16 for k in body["keys"])
        # the slave at site B uses the in-process API: same bytes, once
        consumer_b = LocalConsumer(sites.b, "SAE_B")
        got = await consumer_b.dec_keys("SAE_A", [k["key_ID"] for k in body["keys"]])
        assert got["keys"] == body["keys"]
        with pytest.raises(KMEError) as err:
            await consumer_b.dec_keys("SAE_A", [body["keys"][0]["key_ID"]])
        assert err.value.status == 400 and err.value.message == "one or more keys specified are not found on KME"
        with pytest.raises(KMEError) as err:
            await LocalConsumer(sites.b, "SAE_NOPE").status("SAE_A")
        assert err.value.status == 401
        # malformed requests get ETSI statuses, the connection stays usable
        assert (await c.enc_keys("SAE_B", size=12))[0] == 400
        assert (await c.request({"op": "nope"}))[0] == 400
        assert (await c.request({"op": "dec_keys", "master_SAE_ID": "SAE_B", "key_IDs": "x"}))[0] == 400
        assert (await c.request({"op": "enc_keys"}))[0] == 400
        assert (await c.enc_keys("SAE_B", extension_mandatory=[{"x": 1}]))[1]["message"] == (
            "not all extension_mandatory parameters are supported"
        )
        assert c._writer is not None
        c._writer.write(b"{bad json\n")
        await c._writer.drain()
        line = await c._reader.readline()
        assert b'"status": 400' in line
        assert (await c.status("SAE_B"))[0] == 200
    assert not path.exists()


async def test_socket_refuses_uid_not_in_allow_list(sites, tmp_path):
    path = tmp_path / "keys.sock"
    others = {os.getuid() + 4242: "SAE_A"}  # the allow-list excludes the test's own uid
    async with serve_local(sites.a, path, others), LocalKeyClient(path) as c:
        status, body = await c.enc_keys("SAE_B")
        assert status == 401 and body["details"] == [{"uid": os.getuid()}]
    counts = await sites.a.store.counts(sites.a.config.link_id)
    assert counts.reserved == 0 and counts.erased == 0  # nothing was handed out


async def test_before_the_peer_connects_requests_get_503(store_factory):
    from qkdstack.kms.kme import KME, KMEConfig

    kme = KME(KMEConfig("KME_A", "KME_B", frozenset({"SAE_A"})), store_factory("a"))
    consumer = LocalConsumer(kme, "SAE_A")
    for call in (consumer.status("SAE_B"), consumer.enc_keys("SAE_B")):
        with pytest.raises(KMEError) as err:
            await call
        assert err.value.status == 503


async def test_resync_leaves_requests_in_flight_alone(sites):
    gate = asyncio.Event()
    inner = sites.link_ab

    class SlowLink:
        async def request(self, message):
            if message.get("type") == "kms.reserve":
                await gate.wait()
            return await inner.request(message)

    sites.a.peer = SlowLink()
    taking = asyncio.ensure_future(sites.a.enc_keys("SAE_A", "SAE_B", 2))
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(await sites.a.store.pending(sites.a.config.link_id)) == 2
    assert await sites.a.resync() == 0  # the two pending keys belong to the request in flight
    gate.set()
    got = await taking
    fetched = await LocalConsumer(sites.b, "SAE_B").dec_keys("SAE_A", [k["key_ID"] for k in got["keys"]])
    assert fetched["keys"] == got["keys"]
    await sites.agree()
