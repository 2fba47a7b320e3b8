"""Two real nodes from `qkdstack init`'s deployment: SKIP beside ETSI 014, TLS-PSK identities, proofs with keys.

The nodes run in this event loop and distil a few rounds over loopback; then the PyPI ``skip-qkd`` client
(mTLS, certificates written by ``init``), a TLS-PSK client (identity file written by ``init``) and ETSI 014
clients ask for keys, and each key's proof (``qkdstack_proof``) is compared with the nodes' round records.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import stat

import httpx
import pytest

from _node_support import deploy, free_base_port, status
from qkdstack.kms.kme import PROOF_FIELDS
from qkdstack.node.config import load_config
from qkdstack.node.service import Node

skip_qkd = pytest.importorskip("skip_qkd.skip_qkd")
sslpsk3 = pytest.importorskip("sslpsk3")


def _base_port() -> int:
    while True:  # the deployment's SKIP listeners are base + 8 and + 9
        base = free_base_port()
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", base + 8))
                b.bind(("127.0.0.1", base + 9))
            except OSError:
                continue
        return base


def _records(site_dir) -> dict[str, dict]:
    out = {}
    for line in (site_dir / "data" / "rounds.jsonl").read_text().splitlines():
        doc = json.loads(line)
        if doc.get("accepted"):
            out[doc["proof"]["block_id"]] = doc["proof"]
    return out


def _check_proofs(proofs: list[dict], records: dict[str, dict]) -> None:
    assert proofs, "no proof returned"
    for proof in proofs:
        record = records[proof["block_id"]]
        assert set(proof) == set(PROOF_FIELDS)
        for name in PROOF_FIELDS:
            assert proof[name] == record[name], name
        # the figures the consumer needs are there
        assert proof["eps_sec"] > 0 and proof["eps_cor"] > 0 and proof["bound"]
        assert 0 <= proof["qber_key"] < 0.11 and sum(proof["leakage_bits"].values()) > 0
        assert proof["provenance"]["authentication"]["method"]
        assert proof["provenance"]["epsilon_composed"] >= proof["eps_sec"] + proof["eps_cor"]


def _psk_get(address: str, identity: str, psk: bytes, target: str) -> tuple[int, dict]:
    host, port = address.split(":")
    ctx = sslpsk3.SSLPSKContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("PSK")
    ctx.set_psk_client_callback(lambda _hint: (identity, psk))
    with socket.create_connection((host, int(port)), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(f"GET {target} HTTP/1.1\r\nHost: {identity}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_skip_psk_and_proofs_on_a_fresh_deployment(tmp_path):
    out = tmp_path / "dep"
    layouts = deploy(out, "psk", rounds=3, base_port=_base_port())
    a, b = layouts["A"], layouts["B"]
    # init wrote each consumer's PSK identity (0600) and the site's list of them
    for layout in (a, b):
        sae = layout.sae_ids[0]
        line = layout.sae_psk(sae).read_text().strip()
        assert line.startswith(f"{sae}:") and len(bytes.fromhex(line.split(":")[1])) == 32
        for path in (layout.sae_psk(sae), layout.config.parent / "tls" / "skip.psk"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
    nodes = [Node(load_config(layout.config)) for layout in (a, b)]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while not all(n.finished for n in nodes):
            for t in tasks:
                if t.done():
                    t.result()
            assert loop.time() < deadline, "the nodes did not finish their rounds"
            await asyncio.sleep(0.2)
        sa, sb = a.sae_ids[0], b.sae_ids[0]
        skip_a, skip_b = status(out / "A")["skip_url"], status(out / "B")["skip_url"]
        assert skip_a == a.skip_address and skip_b == b.skip_address

        def client(layout, sae, method, *args):
            cert, key = layout.sae_cert(sae)
            mtls = skip_qkd.MTLSConfig(str(layout.ca), str(cert), str(key))
            address = layout.skip_address
            return getattr(skip_qkd.SkipQKDClient(address, sae, mtls_config=mtls), method)(*args)

        caps = await asyncio.to_thread(client, a, sa, "capabilities")
        assert caps["localSystemID"] == sa and caps["remoteSystemID"] == [sb]
        got = await asyncio.to_thread(client, a, sa, "request_key", sb)
        same = await asyncio.to_thread(client, b, sb, "fetch_key_by_id", got["keyId"], sa)
        assert same == got
        ent = await asyncio.to_thread(client, b, sb, "entropy", 512)
        assert len(bytes.fromhex(ent["randomStr"])) == 64

        # TLS-PSK with the identity file init wrote
        identity, hexkey = a.sae_psk(sa).read_text().strip().split(":")
        code, caps = await asyncio.to_thread(_psk_get, skip_a, identity, bytes.fromhex(hexkey), "/capabilities")
        assert code == 200 and caps["localSystemID"] == sa

        # proofs: SKIP flag at A and at B, equal to each site's round records
        rec_a, rec_b = _records(out / "A"), _records(out / "B")
        code, key = await asyncio.to_thread(_psk_get, skip_a, identity, bytes.fromhex(hexkey),
                                            f"/key?remoteSystemID={sb}&size=2048&qkdstack_proof=true")
        assert code == 200
        _check_proofs(key["key_extension"]["qkdstack_proof"], rec_a)
        cert, keyfile = b.sae_cert(sb)
        ctx_b = ssl.create_default_context(cafile=str(b.ca))
        ctx_b.load_cert_chain(str(cert), str(keyfile))
        # ETSI 014 at B: key_IDs_extension asks for the proof of the key SKIP handed out at A
        async with httpx.AsyncClient(verify=ctx_b) as http:
            r = await http.post(f"{b.etsi_url}/api/v1/keys/{sa}/dec_keys",
                                json={"key_IDs": [{"key_ID": key["keyId"]}],
                                      "key_IDs_extension": {"qkdstack_proof": True}})
        assert r.status_code == 200, r.text
        entry = r.json()["keys"][0]
        assert base64.b64decode(entry["key"]).hex() == key["key"]
        _check_proofs(entry["key_extension"]["qkdstack_proof"], rec_b)
        assert [p["block_id"] for p in entry["key_extension"]["qkdstack_proof"]] == \
            [p["block_id"] for p in key["key_extension"]["qkdstack_proof"]]

        # ETSI 014 at A: extension_optional; without it, no key_extension
        cert, keyfile = a.sae_cert(sa)
        ctx_a = ssl.create_default_context(cafile=str(a.ca))
        ctx_a.load_cert_chain(str(cert), str(keyfile))
        async with httpx.AsyncClient(verify=ctx_a) as http:
            r = await http.post(f"{a.etsi_url}/api/v1/keys/{sb}/enc_keys",
                                json={"number": 2, "extension_optional": [{"qkdstack_proof": True}]})
            plain = await http.post(f"{a.etsi_url}/api/v1/keys/{sb}/enc_keys", json={"number": 1})
        assert r.status_code == 200, r.text
        for entry in r.json()["keys"]:
            _check_proofs(entry["key_extension"]["qkdstack_proof"], rec_a)
        assert plain.status_code == 200 and not plain.json()["keys"][0].get("key_extension")
        # the proof is fetched with SKIP at B too
        identity_b, hexkey_b = b.sae_psk(sb).read_text().strip().split(":")
        code, same = await asyncio.to_thread(
            _psk_get, skip_b, identity_b, bytes.fromhex(hexkey_b),
            f"/key/{r.json()['keys'][0]['key_ID']}?remoteSystemID={sa}&qkdstack_proof=true",
        )
        assert code == 200
        _check_proofs(same["key_extension"]["qkdstack_proof"], rec_b)

        # every SKIP request shows in the site's Prometheus metrics (issue 15: the other delivery interfaces)
        from prometheus_client.parser import text_string_to_metric_families

        async with httpx.AsyncClient() as http:
            text_a = (await http.get(status(out / "A")["metrics_url"])).text
            text_b = (await http.get(status(out / "B")["metrics_url"])).text

        def samples(text: str, name: str) -> dict[tuple[str, ...], float]:
            return {tuple(sorted(s.labels.items())): s.value for fam in text_string_to_metric_families(text)
                    for s in fam.samples if s.name == name}

        req_a, req_b = samples(text_a, "qkdstack_skip_requests_total"), samples(text_b, "qkdstack_skip_requests_total")
        assert req_a[(("code", "200"), ("endpoint", "capabilities"), ("site", "A"))] == 2
        assert req_a[(("code", "200"), ("endpoint", "key"), ("site", "A"))] == 2
        assert req_b[(("code", "200"), ("endpoint", "key_by_id"), ("site", "B"))] == 2
        assert req_b[(("code", "200"), ("endpoint", "entropy"), ("site", "B"))] == 1
        assert samples(text_a, "qkdstack_skip_keys_delivered_total")[(("endpoint", "key"), ("site", "A"))] == 2
        assert key["key"] not in text_a + text_b  # no key bytes in metrics
    finally:
        for n in nodes:
            n.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
