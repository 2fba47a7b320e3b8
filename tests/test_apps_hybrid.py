"""Hybrid key derivation: known answer, independence from every input, handshake scarcity rules."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct

import pytest

from qkdstack.apps import hybrid
from qkdstack.apps.keysource import InMemoryKeySource
from qkdstack.errors import AuthenticationError, KeyStoreError, ProtocolAbort
from qkdstack.protocol.channel import InMemoryChannel, channel_pair

# ---- independent reference (RFC 5869 with hashlib/hmac only) ---------------------------


def ref_hkdf_sha384(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha384).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha384).digest()
        okm += block
        counter += 1
    return okm[:length]


def ref_combiner(qkd, kem, x, key_id, ek, ct, xi, xr, purpose=b"session", length=32):
    label = b"qkdstack hybrid v1"
    ikm = b"".join(struct.pack(">H", len(s)) + s for s in (qkd, kem, x))
    t = b"".join(struct.pack(">I", len(p)) + p for p in (label, key_id.encode(), ek, ct, xi, xr))
    return ref_hkdf_sha384(label, ikm, label + purpose + hashlib.sha384(t).digest(), length)


INPUTS = {
    "qkd": bytes(range(32)),
    "kem": bytes(range(32, 64)),
    "x": bytes(range(64, 96)),
    "key_id": "6f1c2a9e-0000-4000-8000-00000000abcd",
    "ek": bytes([1]) * hybrid.MLKEM768_EK_LEN,
    "ct": bytes([2]) * hybrid.MLKEM768_CT_LEN,
    "xi": bytes([3]) * 32,
    "xr": bytes([4]) * 32,
}
# Pinned output of the reference above for INPUTS (catches silent format changes).
KAT_HEX = "1ccefba0d00a10845d98b513e642f884602a6ba6602468704204e33e0e294d12"


def derive(**kw):
    v = {**INPUTS, **kw}
    t = hybrid.hybrid_transcript(v["key_id"], v["ek"], v["ct"], v["xi"], v["xr"])
    return hybrid.hybrid_kdf(v["qkd"], v["kem"], v["x"], t, b"session", 32)


def test_known_answer_matches_independent_hkdf():
    got = derive()
    assert got == ref_combiner(*INPUTS.values())
    assert got.hex() == KAT_HEX


@pytest.mark.parametrize(
    "name,value",
    [
        ("qkd", bytes(range(1, 33))),
        ("kem", bytes(range(33, 65))),
        ("x", bytes(range(65, 97))),
        ("key_id", "6f1c2a9e-0000-4000-8000-00000000abce"),
        ("ct", bytes([2]) * (hybrid.MLKEM768_CT_LEN - 1) + b"\x03"),
        ("ek", b"\x00" + bytes([1]) * (hybrid.MLKEM768_EK_LEN - 1)),
        ("xi", bytes([3]) * 31 + b"\x00"),
        ("xr", bytes([5]) * 32),
    ],
)
def test_changing_any_one_input_changes_the_key(name, value):
    assert derive(**{name: value}) != derive()


def test_secret_boundaries_are_unambiguous():
    # Moving a byte from one secret to the next must change the key (length prefixes).
    a = derive(qkd=INPUTS["qkd"] + b"\x00", kem=INPUTS["kem"])
    b = derive(qkd=INPUTS["qkd"], kem=b"\x00" + INPUTS["kem"])
    assert a != b


class Tamper(InMemoryChannel):
    """An in-memory channel end that alters one field of one outgoing message kind (an active attacker)."""

    def __init__(self, base: InMemoryChannel, kind: str, fieldname: str) -> None:
        super().__init__(base._inbox, base._outbox, base._timeout)
        self.kind, self.fieldname = kind, fieldname

    async def send(self, kind, disclosed=None, **fields):
        if kind == self.kind:
            v = bytearray(fields[self.fieldname])
            v[len(v) // 2] ^= 0x01
            fields[self.fieldname] = bytes(v)
        await super().send(kind, disclosed, **fields)


async def run_pair(ca, cb, master, slave):
    return await asyncio.gather(hybrid.initiator(ca, master), hybrid.responder(cb, slave), return_exceptions=True)


async def test_handshake_agrees_and_spends_one_key():
    master, slave = InMemoryKeySource.pair(capacity_bits=4096)
    a, b = channel_pair(timeout=5)
    si, sr = await run_pair(a, b, master, slave)
    assert si.i2r_key == sr.i2r_key and si.r2i_key == sr.r2i_key and si.chain == sr.chain
    assert si.i2r_key != si.r2i_key
    assert si.key_id == sr.key_id and si.transcript_hash == sr.transcript_hash
    assert master.delivered_bits == slave.delivered_bits == 256 and master.remaining_bits == 4096 - 256
    assert "key" not in repr(si).lower().replace("key_id", "")
    # Rekeying mixes a fresh key in and agrees at both ends.
    (k,) = await master.get_new_keys(1, 256)
    (k2,) = await slave.get_keys_by_id([k.key_id])
    ni, nr = si.rekey(k), sr.rekey(k2)
    assert ni.i2r_key == nr.i2r_key and ni.epoch == 1 and ni.i2r_key != si.i2r_key


@pytest.mark.parametrize(
    "side,kind,fieldname",
    [
        ("responder", "hybrid.reply", "mlkem_ct"),
        ("responder", "hybrid.reply", "x25519"),
        ("initiator", "hybrid.hello", "mlkem_ek"),
        ("initiator", "hybrid.hello", "x25519"),
        ("responder", "hybrid.reply", "tag"),
    ],
)
async def test_failed_pq_or_classical_part_spends_no_qkd_key(side, kind, fieldname):
    master, slave = InMemoryKeySource.pair(capacity_bits=4096)
    a, b = channel_pair(timeout=5)
    if side == "initiator":
        a = Tamper(a, kind, fieldname)
    else:
        b = Tamper(b, kind, fieldname)
    ri, rr = await run_pair(a, b, master, slave)
    assert isinstance(ri, AuthenticationError | ProtocolAbort), ri
    assert isinstance(rr, ProtocolAbort | AuthenticationError), rr
    assert master.requests == 0 and slave.requests == 0
    assert master.remaining_bits == 4096 and master.delivered_bits == 0


async def test_tampered_final_tag_is_refused():
    master, slave = InMemoryKeySource.pair()
    a, b = channel_pair(timeout=5)
    ri, rr = await run_pair(Tamper(a, "hybrid.key", "tag"), b, master, slave)
    assert isinstance(rr, AuthenticationError) and isinstance(ri, ProtocolAbort)


async def test_missing_key_id_fails_closed():
    master, _ = InMemoryKeySource.pair()
    _, other_slave = InMemoryKeySource.pair()  # a KME that never saw the key
    a, b = channel_pair(timeout=5)
    ri, rr = await run_pair(a, b, master, other_slave)
    assert isinstance(rr, KeyStoreError) and "not found" in str(rr)
    assert isinstance(ri, ProtocolAbort)


async def test_empty_store_fails_closed_at_initiator():
    master, slave = InMemoryKeySource.pair(capacity_bits=128)
    a, b = channel_pair(timeout=5)
    ri, rr = await run_pair(a, b, master, slave)
    assert isinstance(ri, KeyStoreError) and isinstance(rr, ProtocolAbort)
    assert master.remaining_bits == 128


async def test_used_key_id_fails_closed():
    master, slave = InMemoryKeySource.pair()
    (k,) = await master.get_new_keys(1, 256)
    assert (await slave.get_keys_by_id([k.key_id]))[0].key == k.key
    with pytest.raises(KeyStoreError, match="already delivered"):
        await slave.get_keys_by_id([k.key_id])
    assert "key=" not in repr(k) and k.key.hex() not in repr(k)
