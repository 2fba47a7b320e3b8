"""Units of the key relay: hop message cryptography, the relay store, link state and routing."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import uuid

import pytest

from qkdstack.errors import KeyStoreError
from qkdstack.kms.store import KeyNotAuthorized, KeyNotFound
from qkdstack.network.relay import (
    RelayAuthError,
    RelayError,
    build_hop_message,
    parse_hop_message,
    relay_part,
    xor,
)
from qkdstack.network.relay_store import RelayedKey, open_relay_store
from qkdstack.network.routing import DirectionState, LinkStateTable, SiteReport, shortest_path


def _message(keys=True, hop=1):
    ks = [os.urandom(32), os.urandom(32)]
    pads = [os.urandom(32), os.urandom(32)]
    mac = os.urandom(32)
    msg = build_hop_message(
        relay_id=str(uuid.uuid4()), key_ids=[str(uuid.uuid4()), str(uuid.uuid4())], keys=ks if keys else None,
        pads=pads, pad_ids=[str(uuid.uuid4()), str(uuid.uuid4())], mac_key=mac, mac_id=str(uuid.uuid4()),
        size=256, master="SAE_A", slaves=["SAE_B"], path=["A", "R1", "R2", "B"], hop=hop, link_id="R1|R2",
    )
    return msg, ks, pads, mac


def test_hop_message_round_trip_and_one_time_pad():
    msg, ks, pads, mac = _message()
    parsed = parse_hop_message(msg)
    assert parsed.sender == "R1" and parsed.receiver == "R2" and not parsed.last
    assert parsed.open(pads, mac) == ks
    # the wire carries K xor pad, never K
    for entry, k in zip(msg["keys"], ks, strict=True):
        assert base64.b64decode(entry["key"]) != k
    assert msg["keys"][0]["key"] not in repr(parsed) and repr(ks[0]) not in repr(parsed)


def test_first_hop_key_is_the_pad_and_no_key_bytes_cross():
    msg, _ks, pads, mac = _message(keys=False, hop=0)
    assert all("key" not in e for e in msg["keys"])
    assert parse_hop_message(msg).open(pads, mac) == pads


@pytest.mark.parametrize("where", ["ciphertext", "tag", "path", "slave"])
def test_tampered_message_fails_authentication(where):
    msg, _ks, pads, mac = _message()
    if where == "ciphertext":
        raw = bytearray(base64.b64decode(msg["keys"][0]["key"]))
        raw[3] ^= 0x01
        msg["keys"][0]["key"] = base64.b64encode(bytes(raw)).decode()
    elif where == "tag":
        raw = bytearray(base64.b64decode(relay_part(msg)["tag"]))
        raw[0] ^= 0x80
        relay_part(msg)["tag"] = base64.b64encode(bytes(raw)).decode()
    elif where == "path":
        relay_part(msg)["path"] = ["A", "R1", "R2", "X"]
    else:
        msg["target_sae_ids"] = ["SAE_X"]
    with pytest.raises(RelayAuthError, match="failed authentication on hop R1->R2"):
        parse_hop_message(msg).open(pads, mac)


def test_wrong_mac_key_fails():
    msg, _ks, pads, _mac = _message()
    with pytest.raises(RelayAuthError):
        parse_hop_message(msg).open(pads, os.urandom(32))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.pop("extension_mandatory"),
        lambda m: m["extension_mandatory"].append({"other": True}),
        lambda m: m["extension_mandatory"][0].update(other=True),
        lambda m: relay_part(m).update(version=9),
        lambda m: relay_part(m).update(hop=3),
        lambda m: relay_part(m).update(path=["A", "A"]),
        lambda m: m["keys"][0].update(key="***"),
        lambda m: m["keys"][1].pop("key"),
        lambda m: relay_part(m).update(pad_key_IDs=["x"]),
    ],
)
def test_malformed_messages_are_400(mutate):
    msg, *_ = _message()
    mutate(msg)
    with pytest.raises(RelayError) as info:
        parse_hop_message(msg)
    assert info.value.status == 400


def test_xor_lengths():
    assert xor(b"\x0f", b"\xf0") == b"\xff"
    with pytest.raises(ValueError):
        xor(b"a", b"ab")


def test_relay_store_file_mode_and_delivery(tmp_path):
    async def main():
        store = open_relay_store(tmp_path / "relay.db")
        try:
            assert stat.S_IMODE(os.stat(tmp_path / "relay.db").st_mode) == 0o600
            ids = [str(uuid.uuid4()) for _ in range(2)]
            keys = [RelayedKey(i, os.urandom(32), ("A", "R1", "B")) for i in ids]
            await store.put(keys, "SAE_A", ["SAE_B", "SAE_C"], "A")
            with pytest.raises(KeyStoreError):
                await store.put(keys[:1], "SAE_A", ["SAE_B"], "A")
            assert await store.count() == 2
            for name in ("relay.db-wal", "relay.db-shm"):
                if (tmp_path / name).exists():
                    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
            with pytest.raises(KeyNotFound):
                await store.take(ids, "SAE_B", "SAE_OTHER")
            with pytest.raises(KeyNotAuthorized):
                await store.take(ids, "SAE_X", "SAE_A")
            got = await store.take(ids, "SAE_B", "SAE_A")
            assert [g.key for g in got] == [k.key for k in keys] and got[0].path == ("A", "R1", "B")
            with pytest.raises(KeyNotFound):  # once per slave
                await store.take(ids[:1], "SAE_B", "SAE_A")
            assert await store.count() == 2  # SAE_C has not fetched yet
            await store.take(ids, "SAE_C", "SAE_A")
            assert await store.count() == 0  # erased once delivered to every slave
            await store.put(keys, "SAE_A", ["SAE_B"], "A")
            assert await store.void(ids, "R9") == 0  # only the source may void
            assert await store.void(ids, "A") == 2
            assert await store.count() == 0
        finally:
            store.close()
        # secure_delete: the key bytes are not left in the database file
        data = (tmp_path / "relay.db").read_bytes()
        assert all(k.key not in data for k in keys)

    asyncio.run(main())


RING = ["A", "R1", "R2", "B", "R3"]
RING_EDGES = [("A", "R1"), ("R1", "R2"), ("R2", "B"), ("B", "R3"), ("R3", "A")]


def test_shortest_path_prefers_fewer_hops_and_avoids_down_or_empty_links():
    assert shortest_path(RING, RING_EDGES, "A", "B", {}, 2) == ["A", "R3", "B"]
    down = {("R3", "B"): DirectionState("R3", "B", False, 100)}
    assert shortest_path(RING, RING_EDGES, "A", "B", down, 2) == ["A", "R1", "R2", "B"]
    down_far_end = {("B", "R3"): DirectionState("B", "R3", False, 100)}
    assert shortest_path(RING, RING_EDGES, "A", "B", down_far_end, 2) == ["A", "R1", "R2", "B"]
    short = {("A", "R3"): DirectionState("A", "R3", True, 1)}
    assert shortest_path(RING, RING_EDGES, "A", "B", short, 2) == ["A", "R1", "R2", "B"]
    both = {**down, ("R1", "R2"): DirectionState("R1", "R2", False, 100)}
    assert shortest_path(RING, RING_EDGES, "A", "B", both, 2) is None
    assert shortest_path(RING, RING_EDGES, "A", "B", {}, 2, excluded=[frozenset(("A", "R3"))]) == [
        "A", "R1", "R2", "B"]


def test_link_state_table_keeps_newest_and_forgets_stale():
    table = LinkStateTable(max_age_s=0.05)
    assert table.merge(SiteReport("R1", 2, {"R2": (False, 5)}))
    assert not table.merge(SiteReport("R1", 1, {"R2": (True, 5)}))
    assert table.directions()[("R1", "R2")].up is False
    wire = SiteReport("R1", 3, {"R2": (True, 9)}).to_wire()
    assert table.merge(SiteReport.from_wire(wire))
    assert table.directions()[("R1", "R2")].available == 9
    assert SiteReport.from_wire({"site": "X", "seq": "1", "links": []}) is None
    import time

    time.sleep(0.06)
    assert table.directions() == {}
