"""Trusted-node key relay between SiteKMEs over real mutual-TLS HTTPS (in process).

Each test builds a network (tests/_network_support.py): per site one SQLite key store, one KME per
link joined to its neighbour's in process, the same random key blocks at both ends of each link, a
relay store, a SiteKME and its KME-to-KME server on 127.0.0.1 with certificates of a test network CA.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from _relay_support import LINE, RING, Network, topology
from qkdstack.kms.kme import KMEError
from qkdstack.network.relay import RELAY_FIELD, RELAY_SAE, relay_part
from qkdstack.network.site_kme import PATH_EXTENSION

HOPS = [("A", "R1"), ("R1", "R2"), ("R2", "B")]


def _key(answer):
    [entry] = answer["keys"]
    return entry["key_ID"], base64.b64decode(entry["key"])


async def _available(net, hops=HOPS):
    """For each hop: (chunks available at the sender's end in its pool, and all chunks not erased, both ends)."""
    out = {}
    for a, b in hops:
        ca, cb = await net.counts(a, b)
        out[(a, b)] = (ca.available, cb.available, ca.erased, cb.erased)
    return out


async def test_line_relay_delivers_identical_key_and_spends_each_hops_keys_at_both_ends(tmp_path):
    async with Network(LINE, tmp_path).run() as net:
        before = await _available(net)
        answer = await net.sites["A"].enc_keys("SAE_A", "SAE_B")
        key_id, key = _key(answer)
        assert len(key) == 32
        after = await _available(net)
        for hop in HOPS:
            a_before, b_before = before[hop][0], before[hop][1]
            a_after, b_after, erased_a, erased_b = after[hop]
            # one pad (1 chunk) + one MAC key (1 chunk) per hop, gone (erased) at BOTH ends of that hop
            assert sum(a_before) - sum(a_after) == 2 and sum(b_before) - sum(b_after) == 2, hop
            assert erased_a == erased_b == 2, hop
            ca, cb = await net.counts(*hop)
            assert ca.reserved == cb.reserved == 0, hop
        got = await net.sites["B"].dec_keys("SAE_B", "SAE_A", [key_id])
        assert _key(got) == (key_id, key)
        # delivered once: the relay store erased it
        with pytest.raises(KMEError) as info:
            await net.sites["B"].dec_keys("SAE_B", "SAE_A", [key_id])
        assert info.value.status == 400
        assert await net.relay_stores["B"].count() == 0
        for site in ("R1", "R2"):  # trusted nodes forward, never store
            assert await net.relay_stores[site].count() == 0
        assert net.sites["R1"].counters["forwarded"] == net.sites["R2"].counters["forwarded"] == 1
        # several keys of another size in one request
        answer = await net.sites["A"].enc_keys("SAE_A", "SAE_B", number=3, size=512)
        ids = [e["key_ID"] for e in answer["keys"]]
        got = await net.sites["B"].dec_keys("SAE_B", "SAE_A", ids)
        assert got["keys"] == answer["keys"]


async def test_stock_etsi014_clients_get_a_relayed_key_over_mtls(tmp_path):
    """serve_etsi014 takes a SiteKME in place of a KME; the SAEs use the ETSI 014 client (mutual TLS)."""
    from _kms_support import PKI
    from qkdstack.apps.keysource import Etsi014Client
    from qkdstack.kms.etsi014 import serve_etsi014

    (tmp_path / "etsi014").mkdir()
    pki = PKI(tmp_path / "etsi014")
    async with (
        Network(LINE, tmp_path).run() as net, serve_etsi014(net.sites["A"], "127.0.0.1", 0, pki.tls("A")) as srv_a,
        serve_etsi014(net.sites["B"], "127.0.0.1", 0, pki.tls("B")) as srv_b,
    ):
        cert, key, _ = pki.files["SAE_A"]
        async with Etsi014Client(srv_a.url, "SAE_B", cert, key, str(tmp_path / "etsi014" / "ca_A.pem")) as master:
            [k_a] = await master.get_new_keys(1, 256)
            status = await master.status()
            assert status["target_KME_ID"] == "B"
        cert, key, _ = pki.files["SAE_B"]
        async with Etsi014Client(srv_b.url, "SAE_A", cert, key, str(tmp_path / "etsi014" / "ca_B.pem")) as slave:
            [k_b] = await slave.get_keys_by_id([k_a.key_id])
        assert k_a.key_id == k_b.key_id and k_a.key == k_b.key


class _Tamper:
    """Wraps a site's KME-to-KME client: flips one byte of the ciphertext or tag of hop messages it sends."""

    def __init__(self, client, where: str):
        self.client = client
        self.where = where
        self.tampered = 0

    async def post(self, base_url, path, body, timeout_s=None):
        if path.endswith("/ext_keys") and relay_part(body) is not None:
            body = json.loads(json.dumps(body))
            if self.where == "key":
                raw = bytearray(base64.b64decode(body["keys"][0]["key"]))
            else:
                raw = bytearray(base64.b64decode(relay_part(body)["tag"]))
            raw[0] ^= 0x01
            text = base64.b64encode(bytes(raw)).decode()
            if self.where == "key":
                body["keys"][0]["key"] = text
            else:
                relay_part(body)["tag"] = text
            self.tampered += 1
        return await self.client.post(base_url, path, body, timeout_s)

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.mark.parametrize("where", ["key", "tag"])
async def test_tampered_hop_aborts_the_relay_and_its_keys_are_not_reused(tmp_path, where):
    async with Network(LINE, tmp_path).run() as net:
        tamper = _Tamper(net.sites["R1"].client, where)
        net.sites["R1"].client = tamper  # the hop R1 -> R2 is tampered with in transit
        before = await net.kme("R1", "R2").store.chunk_states(net.kme("R1", "R2").config.link_id)
        with pytest.raises(KMEError) as info:
            await net.sites["A"].enc_keys("SAE_A", "SAE_B")
        assert tamper.tampered == 1
        assert info.value.status == 503
        assert "failed authentication on hop R1->R2" in info.value.message
        assert info.value.details[0]["failed_hop"] == ["R1", "R2"]
        assert await net.relay_stores["B"].count() == 0
        assert net.sites["R2"].counters["auth_failures"] == 1
        # the tampered hop's pad and MAC key are erased at both ends: never used again
        link = net.kme("R1", "R2").config.link_id
        at_r1 = await net.kme("R1", "R2").store.chunk_states(link)
        at_r2 = await net.kme("R2", "R1").store.chunk_states(link)
        spent = [c for c, (state, _) in at_r1.items() if state != before[c][0]]
        assert len(spent) == 2
        for c in spent:
            assert at_r1[c][0] == at_r2[c][0] == 2  # ERASED at both ends
        # the next relay (no tampering) takes other link keys and succeeds
        net.sites["R1"].client = tamper.client
        key_id, key = _key(await net.sites["A"].enc_keys("SAE_A", "SAE_B"))
        assert _key(await net.sites["B"].dec_keys("SAE_B", "SAE_A", [key_id])) == (key_id, key)
        at_r1_after = await net.kme("R1", "R2").store.chunk_states(link)
        assert all(at_r1_after[c][0] == 2 for c in spent)


async def test_multicast_to_slaves_at_two_sites_gets_the_same_key(tmp_path):
    topo = topology({"A": ["SAE_A"], "R1": ["SAE_R1"], "R2": [], "B": ["SAE_B"]},
                    [("A", "R1"), ("R1", "R2"), ("R2", "B")])
    async with Network(topo, tmp_path).run() as net:
        answer = await net.sites["A"].enc_keys("SAE_A", "SAE_B", additional_slave_SAE_IDs=["SAE_R1"])
        key_id, key = _key(answer)
        at_b = await net.sites["B"].dec_keys("SAE_B", "SAE_A", [key_id])
        at_r1 = await net.sites["R1"].dec_keys("SAE_R1", "SAE_A", [key_id])
        assert _key(at_b) == _key(at_r1) == (key_id, key)


async def test_routing_avoids_a_down_link_and_says_when_no_path_exists(tmp_path):
    async with Network(RING, tmp_path).run() as net:
        ext = [{PATH_EXTENSION: True}]
        answer = await net.sites["A"].enc_keys("SAE_A", "SAE_B", extension_optional=ext)
        assert answer["keys"][0]["key_extension"][PATH_EXTENSION] == ["A", "R3", "B"]
        # the link R3-B goes down (both KMEs lose their peer): A learns it from link-state pulls
        net.kme("R3", "B").detach_peer()
        net.kme("B", "R3").detach_peer()
        await net.refresh()
        answer = await net.sites["A"].enc_keys("SAE_A", "SAE_B", extension_optional=ext)
        key_id, key = _key(answer)
        assert answer["keys"][0]["key_extension"][PATH_EXTENSION] == ["A", "R1", "R2", "B"]
        got = await net.sites["B"].dec_keys("SAE_B", "SAE_A", [key_id], extension_optional=ext)
        assert _key(got) == (key_id, key)
        assert got["keys"][0]["key_extension"][PATH_EXTENSION] == ["A", "R1", "R2", "B"]
        # and R1-R2 too: no path is left
        net.kme("R1", "R2").detach_peer()
        net.kme("R2", "R1").detach_peer()
        await net.refresh()
        before = await _available(net, [("A", "R1"), ("A", "R3")])
        with pytest.raises(KMEError) as info:
            await net.sites["A"].enc_keys("SAE_A", "SAE_B")
        assert info.value.status == 503
        assert "no path from A to B" in info.value.message
        assert await _available(net, [("A", "R1"), ("A", "R3")]) == before  # nothing was spent


async def test_routing_avoids_a_link_without_key(tmp_path):
    async with Network(RING, tmp_path, blocks=1, block_bytes=32 * 4).run() as net:
        # A-R3 holds 4 chunks, 2 per pool; drain A's pool with direct keys to R3's SAE
        await net.sites["A"].enc_keys("SAE_A", "SAE_R3", number=2)
        await net.refresh()
        answer = await net.sites["A"].enc_keys("SAE_A", "SAE_B", extension_optional=[{PATH_EXTENSION: True}])
        assert answer["keys"][0]["key_extension"][PATH_EXTENSION] == ["A", "R1", "R2", "B"]


async def test_relay_failing_half_way_leaves_no_key_and_the_master_gets_503(tmp_path):
    async with Network(LINE, tmp_path, hop_timeout_s=3.0).run() as net:
        await net.stop_server("R2")  # the next hop of R1 is down
        with pytest.raises(KMEError) as info:
            await net.sites["A"].enc_keys("SAE_A", "SAE_B")
        assert info.value.status == 503
        assert "cannot be reached" in info.value.message and "R2" in info.value.message
        assert info.value.details[0]["failed_hop"] == ["R1", "R2"]
        assert await net.relay_stores["B"].count() == 0
        assert net.sites["A"].counters["relays_failed"] == 1
        # keys taken on the first hop are spent at both ends (never reused)
        ca, cr = await net.counts("A", "R1")
        assert ca.erased == cr.erased == 2 and ca.reserved == cr.reserved == 0
        # on the failed hop they are erased at R1 and wait at R2, reserved for a message that never came
        c1, c2 = await net.counts("R1", "R2")
        assert c1.erased == 2 and c2.reserved == 2 and c2.erased == 0
        # the server comes back: R1 asks it to drop them at its next link-state pull
        await net.start_server("R2")
        await net.sites["R1"].refresh_link_state()
        c1, c2 = await net.counts("R1", "R2")
        assert c1.erased == c2.erased == 2 and c2.reserved == 0
        # relays work again (once the hop is no longer held as unreachable)
        await asyncio.sleep(0.6)
        key_id, key = _key(await net.sites["A"].enc_keys("SAE_A", "SAE_B"))
        assert _key(await net.sites["B"].dec_keys("SAE_B", "SAE_A", [key_id])) == (key_id, key)


async def test_failed_second_destination_voids_the_first(tmp_path):
    topo = topology({"A": ["SAE_A"], "R1": ["SAE_R1"], "R2": [], "B": ["SAE_B"]},
                    [("A", "R1"), ("R1", "R2"), ("R2", "B")])
    async with Network(topo, tmp_path, hop_timeout_s=3.0).run() as net:
        await net.stop_server("B")
        with pytest.raises(KMEError) as info:
            await net.sites["A"].enc_keys("SAE_A", "SAE_R1", additional_slave_SAE_IDs=["SAE_B"])
        assert info.value.status == 503
        assert await net.relay_stores["R1"].count() == 0  # R1 had it: voided
        assert net.sites["R1"].counters["voided"] == 1


async def test_key_extension_lists_the_relay_path_only_when_asked(tmp_path):
    async with Network(LINE, tmp_path).run() as net:
        plain = await net.sites["A"].enc_keys("SAE_A", "SAE_B")
        assert "key_extension" not in plain["keys"][0]
        asked = await net.sites["A"].enc_keys("SAE_A", "SAE_B", extension_optional=[{PATH_EXTENSION: True}])
        assert asked["keys"][0]["key_extension"] == {PATH_EXTENSION: ["A", "R1", "R2", "B"]}
        got = await net.sites["B"].dec_keys("SAE_B", "SAE_A", [asked["keys"][0]["key_ID"]],
                                            extension_optional=[{PATH_EXTENSION: True}])
        assert got["keys"][0]["key_extension"] == {PATH_EXTENSION: ["A", "R1", "R2", "B"]}


async def test_relay_sae_is_refused_from_consumers(tmp_path):
    async with Network(LINE, tmp_path).run() as net:
        a = net.sites["A"]
        for call in (
            a.enc_keys(RELAY_SAE, "SAE_B"),
            a.status(RELAY_SAE, "SAE_B"),
            net.sites["B"].dec_keys(RELAY_SAE, "SAE_A", ["00000000-0000-0000-0000-000000000000"]),
        ):
            with pytest.raises(KMEError) as info:
                await call
            assert info.value.status == 401 and "reserved" in info.value.message
        for call in (
            a.enc_keys("SAE_A", RELAY_SAE),
            a.enc_keys("SAE_A", "SAE_B", additional_slave_SAE_IDs=[RELAY_SAE]),
        ):
            with pytest.raises(KMEError) as info:
                await call
            assert info.value.status == 400 and "reserved" in info.value.message
        assert RELAY_SAE not in a.config.sae_ids and RELAY_SAE not in a.remote_sae_ids


async def test_direct_neighbour_uses_the_link_kme(tmp_path):
    async with Network(RING, tmp_path).run() as net:
        ca_before, _ = await net.counts("A", "R1")
        answer = await net.sites["A"].enc_keys("SAE_A", "SAE_R1")
        key_id, key = _key(answer)
        ca_after, _ = await net.counts("A", "R1")
        assert ca_after.erased - ca_before.erased == 1  # one chunk: no pad, no MAC key
        got = await net.sites["R1"].dec_keys("SAE_R1", "SAE_A", [key_id])
        assert _key(got) == (key_id, key)
        status = await net.sites["A"].status("SAE_A", "SAE_B")
        assert status["target_KME_ID"] == "B" and status["stored_key_count"] >= 0


async def test_kme_api_requires_a_network_certificate_of_a_known_site(tmp_path):
    """Mutual TLS: another CA fails the handshake; a network certificate naming no site gets 401; a hop
    message from a site that is not the hop's sender is refused (400), and spends nothing."""
    import ssl

    import httpx

    from qkdstack.certs import (
        generate_key,
        issue_certificate,
        load_certificate,
        load_private_key,
        make_ca,
        write_certificate,
        write_private_key,
    )
    from qkdstack.kms.etsi014 import TLSFiles
    from qkdstack.network.kme_api import EXT_KEYS, VERSIONS, KMEClient

    async with Network(LINE, tmp_path).run() as net:
        url = net.topo.sites["B"].kme_url
        # a certificate of another CA: the TLS handshake fails
        rogue_ca, rogue_key = make_ca("rogue CA")
        key = generate_key("ec-p256")
        cert = issue_certificate(rogue_ca, rogue_key, "KME_A", key.public_key(), client=True, server=False)
        write_certificate(tmp_path / "rogue.pem", cert)
        write_private_key(tmp_path / "rogue.key", key)
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        ctx.load_cert_chain(str(tmp_path / "rogue.pem"), str(tmp_path / "rogue.key"))
        async with httpx.AsyncClient(verify=ctx) as client:
            with pytest.raises(httpx.HTTPError):
                await client.get(url + VERSIONS)
        # the network CA, but a name that is no site: 401
        ca_cert = load_certificate(tmp_path / "ca.pem")
        ca_key = load_private_key(tmp_path / "ca.key")
        key = generate_key("ec-p256")
        cert = issue_certificate(ca_cert, ca_key, "KME_X", key.public_key(), client=True, server=False)
        write_certificate(tmp_path / "x.pem", cert)
        write_private_key(tmp_path / "x.key", key)
        nobody = KMEClient(TLSFiles(tmp_path / "x.pem", tmp_path / "x.key", tmp_path / "ca.pem"))
        try:
            status, body = await nobody.get(url, VERSIONS)
            assert status == 401
        finally:
            await nobody.aclose()
        stranger = KMEClient(TLSFiles(tmp_path / "kme_A.pem", tmp_path / "kme_A.key", tmp_path / "ca.pem"))
        try:
            status, body = await stranger.get(url, VERSIONS)
            assert status == 200 and body["versions"][0]["version"] == "v1"
            # A is not B's neighbour: a hop message claiming R2 -> B sent by A is refused before any key is taken
            before = await net.counts("R2", "B")
            ct = base64.b64encode(b"c" * 32).decode()
            msg = {"keys": [{"key_ID": "00000000-0000-0000-0000-000000000001", "key": ct}],
                   "initiator_sae_id": "SAE_A",
                   "target_sae_ids": ["SAE_B"], "extension_mandatory": [{RELAY_FIELD: {
                       "version": 1, "relay_ID": "00000000-0000-0000-0000-000000000002", "size": 256,
                       "path": ["A", "R1", "R2", "B"], "hop": 2, "link_ID": "B|R2",
                       "pad_key_IDs": ["00000000-0000-0000-0000-000000000003"],
                       "mac_key_ID": "00000000-0000-0000-0000-000000000004",
                       "tag": base64.b64encode(b"x" * 16).decode()}}]}
            status, body = await stranger.post(url, EXT_KEYS, msg)
            assert status == 400 and "came from A" in body["message"]
            assert await net.counts("R2", "B") == before
        finally:
            await stranger.aclose()


async def test_an_unreachable_relay_node_is_routed_around_at_once(tmp_path):
    """Ring: R3 (on the shortest path A-R3-B) stops answering; the relay fails on hop A->R3 and is retried
    over A-R1-R2-B in the same enc_keys call; later relays avoid R3 while it stays unreachable."""
    async with Network(RING, tmp_path, hop_timeout_s=3.0, unreachable_hold_s=60.0).run() as net:
        await net.stop_server("R3")
        ext = [{PATH_EXTENSION: True}]
        answer = await net.sites["A"].enc_keys("SAE_A", "SAE_B", extension_optional=ext)
        key_id, key = _key(answer)
        assert answer["keys"][0]["key_extension"][PATH_EXTENSION] == ["A", "R1", "R2", "B"]
        assert _key(await net.sites["B"].dec_keys("SAE_B", "SAE_A", [key_id])) == (key_id, key)
        # the failed first attempt spent its keys on A-R3: erased at A, reserved for the relay at R3 (whose
        # message never came: never available again), and stored nothing anywhere
        ca, cr = await net.counts("A", "R3")
        assert ca.erased == 2 and ca.reserved == 0 and cr.reserved == 2 and cr.available == ca.available
        assert await net.relay_stores["R3"].count() == 0 and await net.relay_stores["B"].count() == 0
        answer = await net.sites["A"].enc_keys("SAE_A", "SAE_B", extension_optional=ext)
        assert answer["keys"][0]["key_extension"][PATH_EXTENSION] == ["A", "R1", "R2", "B"]
        assert (await net.counts("A", "R3"))[0].erased == 2  # not tried again


async def test_concurrent_requests_share_relays_and_each_gets_its_own_keys(tmp_path):
    """Group relay: requests waiting while a relay is on its way go together in the next one."""
    async with Network(LINE, tmp_path).run() as net:
        answers = await asyncio.gather(*(net.sites["A"].enc_keys("SAE_A", "SAE_B", number=1 + i % 2)
                                         for i in range(20)))
        entries = [e for a in answers for e in a["keys"]]
        assert len(entries) == 30 and len({e["key_ID"] for e in entries}) == 30
        assert len({e["key"] for e in entries}) == 30
        assert net.sites["R1"].counters["forwarded"] <= 10  # far fewer hop messages than requests
        for answer in answers:
            ids = [e["key_ID"] for e in answer["keys"]]
            assert (await net.sites["B"].dec_keys("SAE_B", "SAE_A", ids))["keys"] == answer["keys"]
        assert await net.relay_stores["B"].count() == 0


async def test_destination_refuses_a_relay_whose_master_is_not_at_its_source(tmp_path):
    import os
    import uuid

    from qkdstack.network.kme_api import EXT_KEYS
    from qkdstack.network.relay import build_hop_message

    async with Network(LINE, tmp_path).run() as net:
        r2 = net.sites["R2"]
        pads, mac = await r2._take_link_keys("B", 1, 256)
        for master, expect in (("SAE_B", 400), ("SAE_A", 200)):
            if master == "SAE_A":
                pads, mac = await r2._take_link_keys("B", 1, 256)
            message = build_hop_message(
                relay_id=str(uuid.uuid4()), key_ids=[str(uuid.uuid4())], keys=[os.urandom(32)],
                pads=[base64.b64decode(pads[0]["key"])], pad_ids=[pads[0]["key_ID"]],
                mac_key=base64.b64decode(mac["key"]), mac_id=mac["key_ID"], size=256, master=master,
                slaves=["SAE_B"], path=["A", "R1", "R2", "B"], hop=2, link_id="B|R2",
            )
            status, body = await r2.client.post(net.topo.sites["B"].kme_url, EXT_KEYS, message)
            assert status == expect, body
            if expect == 400:
                assert "initiator SAE" in body["message"]
        assert await net.relay_stores["B"].count() == 1
