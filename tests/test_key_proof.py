"""A proof with every key (kms/kme.py, store.py): stored per key block, returned only when asked, with every block.

Real KMEs on SQLite (and PostgreSQL when configured) stores, linked in process, and the ETSI 014 servers
over mutual TLS. The end-to-end comparison with a node's round records is in tests/test_skip_node.py.
"""

from __future__ import annotations

import base64
import secrets
import sqlite3

import httpx
import pytest

from _kms_support import BACKENDS, PKI, Sites, factory_fixture
from qkdstack.kms.kme import PROOF_FIELDS, key_proof
from qkdstack.kms.store import open_store


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path):
    yield from factory_fixture(request.param, tmp_path)


def _proof(block_id: str, qber: float) -> dict:
    return {"block_id": block_id, "length_bits": 512, "eps_sec": 1e-10, "eps_cor": 1e-15, "bound": "lim2014",
            "qber_key": qber, "qber_test": qber, "leakage_bits": {"cascade": 100, "verification": 64},
            "finite_key": {"phase_error": 0.05},
            "provenance": {"authentication": {"method": "wegman-carter", "epsilon": 1e-12},
                           "epsilon_composed": 1e-10 + 1e-15 + 1e-12}}


async def _sites_with_proofs(store_factory, pki=None, n_blocks=3, chunks=6) -> tuple[Sites, dict[str, dict]]:
    s = await Sites(store_factory, blocks=0).start(pki)
    proofs = {}
    for i in range(n_blocks):
        block_id = f"round-{i}"
        proofs[block_id] = _proof(block_id, 0.01 * (i + 1))
        key = secrets.token_bytes(32 * chunks)
        await s.a.add_block(block_id, key, proof=proofs[block_id])
        await s.b.add_block(block_id, key, proof=proofs[block_id])
    return s, proofs


async def test_proof_with_each_key_only_when_asked(store_factory):
    s, proofs = await _sites_with_proofs(store_factory)
    try:
        plain = await s.a.enc_keys("SAE_A", "SAE_B")
        assert "key_extension" not in plain["keys"][0]
        other = await s.a.enc_keys("SAE_A", "SAE_B", extension_optional=[{"another_vendor": 1}])
        assert "key_extension" not in other["keys"][0]
        # 512-bit keys of 256-bit chunks: a key can span two blocks, and carries both proofs in order
        got = await s.a.enc_keys("SAE_A", "SAE_B", number=2, size=512,
                                 extension_optional=[{"qkdstack_proof": True}])
        for entry in got["keys"]:
            blocks = entry["key_extension"]["qkdstack_proof"]
            assert blocks and all(p == proofs[p["block_id"]] for p in blocks)
        # the first 512-bit key takes the last pool-0 chunk of round-0 and the first of round-1
        assert [p["block_id"] for p in got["keys"][0]["key_extension"]["qkdstack_proof"]] == ["round-0", "round-1"]
        ids = [k["key_ID"] for k in got["keys"]]
        back = await s.b.dec_keys("SAE_B", "SAE_A", ids, extension_optional=[{"qkdstack_proof": True}])
        assert [k["key"] for k in back["keys"]] == [k["key"] for k in got["keys"]]
        assert [k["key_extension"] for k in back["keys"]] == [k["key_extension"] for k in got["keys"]]
        # a mandatory extension is still refused, the proof one included (it is optional by nature)
        with pytest.raises(Exception, match="extension_mandatory"):
            await s.a.enc_keys("SAE_A", "SAE_B", extension_mandatory=[{"qkdstack_proof": True}])
        await s.agree()
    finally:
        await s.stop()


async def test_block_without_proof_gives_its_id(store_factory):
    s = await Sites(store_factory, blocks=1).start()  # Sites.add_block stores no proof
    try:
        got = await s.a.enc_keys("SAE_A", "SAE_B", extension_optional=["qkdstack_proof"])
        assert got["keys"][0]["key_extension"] == {"qkdstack_proof": [{"block_id": "round-0"}]}
    finally:
        await s.stop()


async def test_retried_add_block_keeps_or_completes_the_proof(store_factory):
    s = await Sites(store_factory, blocks=0).start()
    try:
        key = secrets.token_bytes(64)
        for kme in (s.a, s.b):
            await kme.add_block("r", key)  # first call without the proof (e.g. before a restart)
            assert await kme.add_block("r", key, proof=_proof("r", 0.02)) == 2  # the retry brings it
            assert await kme.add_block("r", key, proof=_proof("r", 0.5)) == 2  # a later one changes nothing
        got = await s.a.enc_keys("SAE_A", "SAE_B", extension_optional=[{"qkdstack_proof": True}])
        assert got["keys"][0]["key_extension"]["qkdstack_proof"] == [_proof("r", 0.02)]
    finally:
        await s.stop()


async def test_etsi014_rest_proof_extension(store_factory, pki):
    s, proofs = await _sites_with_proofs(store_factory, pki)
    try:
        a_ctx, b_ctx = pki.client_context("SAE_A", "A"), pki.client_context("SAE_B", "B")
        async with httpx.AsyncClient(verify=a_ctx) as http:
            r = await http.post(f"{s.srv_a.url}/api/v1/keys/SAE_B/enc_keys",
                                json={"number": 1, "extension_optional": [{"qkdstack_proof": True}]})
            bad = await http.post(f"{s.srv_a.url}/api/v1/keys/SAE_B/enc_keys",
                                  json={"extension_mandatory": [{"qkdstack_proof": True}]})
        assert r.status_code == 200 and bad.status_code == 400
        entry = r.json()["keys"][0]
        assert entry["key_extension"]["qkdstack_proof"] == [proofs["round-0"]]
        async with httpx.AsyncClient(verify=b_ctx) as http:
            r = await http.post(f"{s.srv_b.url}/api/v1/keys/SAE_A/dec_keys",
                                json={"key_IDs": [{"key_ID": entry["key_ID"]}],
                                      "key_IDs_extension": {"qkdstack_proof": True}})
        assert r.status_code == 200
        assert base64.b64decode(r.json()["keys"][0]["key"]) == base64.b64decode(entry["key"])
        assert r.json()["keys"][0]["key_extension"] == entry["key_extension"]
    finally:
        await s.stop()


async def test_store_made_before_the_proof_column_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    store = open_store(path)
    await store.add_block("L", "b0", secrets.token_bytes(64))
    store.close()
    with sqlite3.connect(path) as con:  # the schema of a store made by an older qkdstack
        con.execute("ALTER TABLE qkd_blocks DROP COLUMN proof")
    store = open_store(path)
    try:
        await store.add_block("L", "b1", secrets.token_bytes(64), proof={"qber_key": 0.01})
        reservations = await store.reserve("L", 0, 2, 256, "SAE_A", ["SAE_B"])
        ids = [r.key_id for r in reservations]
        assert await store.proofs(ids) == {ids[0]: [{"block_id": "b0"}], ids[1]: [{"block_id": "b1", "qber_key": 0.01}]}
    finally:
        store.close()


def test_key_proof_keeps_the_listed_fields_as_json():
    meta = {name: 1 for name in PROOF_FIELDS} | {"counts": {"big": [1] * 100}, "stats": {}, "stage_seconds": {},
                                                 "leakage_accounting": {}}
    meta["bound"] = ("a", "tuple")  # JSON values only, as data/rounds.jsonl has them
    proof = key_proof(meta)
    assert set(proof) == set(PROOF_FIELDS) and proof["bound"] == ["a", "tuple"]
