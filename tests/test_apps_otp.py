"""One-time-pad mode and the key-source reference semantics."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdstack.apps.keysource import InMemoryKeySource, plan_request
from qkdstack.apps.otp import OtpMessage, PadStream, key_bytes_needed, otp_decrypt, otp_encrypt, xor_bytes
from qkdstack.errors import AuthenticationError, ConfigError, KeyStoreError


async def test_round_trip_and_exact_consumption():
    master, slave = InMemoryKeySource.pair(capacity_bits=8 * 10_000)
    msg = b"attack at dawn" * 100
    ct = await otp_encrypt(master, msg)
    assert ct.ciphertext != msg and len(ct.ciphertext) == len(msg)
    wire = ct.to_bytes()
    assert await otp_decrypt(slave, OtpMessage.from_bytes(wire)) == msg
    assert master.delivered_bits == 8 * key_bytes_needed(len(msg)) == slave.delivered_bits
    # The keys are gone: decrypting again fails closed.
    with pytest.raises(KeyStoreError):
        await otp_decrypt(slave, ct)


async def test_long_message_spans_several_keys():
    master, slave = InMemoryKeySource.pair(max_key_bits=1024)
    msg = hashlib.shake_256(b"m").digest(5000)
    ct = await otp_encrypt(master, msg)
    assert len(ct.key_ids) == -(-(5000 + 32) // 128)
    assert await otp_decrypt(slave, ct) == msg


@pytest.mark.parametrize("part", ["ciphertext", "tag", "key_ids"])
async def test_tampering_is_detected(part):
    master, slave = InMemoryKeySource.pair(max_key_bits=256)
    ct = await otp_encrypt(master, b"x" * 100)
    if part == "ciphertext":
        bad = OtpMessage(ct.key_ids, bytes([ct.ciphertext[0] ^ 1]) + ct.ciphertext[1:], ct.tag)
    elif part == "tag":
        bad = OtpMessage(ct.key_ids, ct.ciphertext, bytes([ct.tag[0] ^ 1]) + ct.tag[1:])
    else:  # same keys, different order: a different pad
        bad = OtpMessage(tuple(reversed(ct.key_ids)), ct.ciphertext, ct.tag)
    with pytest.raises(AuthenticationError):
        await otp_decrypt(slave, bad)


async def test_refuses_without_partial_use_when_key_is_short():
    master, slave = InMemoryKeySource.pair(capacity_bits=8 * 1000)
    with pytest.raises(KeyStoreError, match="not enough key"):
        await otp_encrypt(master, bytes(1000))  # needs 1032 bytes
    assert master.remaining_bits == 8000 and master.delivered_bits == 0 and master.awaiting_slave == 0
    ct = await otp_encrypt(master, bytes(968))  # exactly fits
    assert master.remaining_bits == 0
    assert await otp_decrypt(slave, ct) == bytes(968)


async def test_refuses_beyond_one_request():
    master, _ = InMemoryKeySource.pair(max_key_bits=256, max_keys_per_request=2)
    with pytest.raises(KeyStoreError, match="exceed one request"):
        await otp_encrypt(master, bytes(100))
    assert master.delivered_bits == 0


def test_plan_request_and_validation():
    assert plan_request(100, 8192, 10) == (1, 800)
    assert plan_request(2049, 8192, 10) == (3, 8 * 683)
    with pytest.raises(ConfigError):
        plan_request(0, 8192, 1)


async def test_key_source_validation():
    master, slave = InMemoryKeySource.pair()
    with pytest.raises(ConfigError, match="multiple of 8"):
        await master.get_new_keys(1, 12)
    with pytest.raises(ConfigError, match="number"):
        await master.get_new_keys(0, 256)
    with pytest.raises(KeyStoreError):
        await slave.get_new_keys(1, 256)
    with pytest.raises(KeyStoreError):
        await master.get_keys_by_id(["x"])
    keys = await master.get_new_keys(2, 256)
    with pytest.raises(KeyStoreError, match="twice"):
        await slave.get_keys_by_id([keys[0].key_id, keys[0].key_id])
    # All or none: one unknown ID spends nothing.
    with pytest.raises(KeyStoreError, match="not found"):
        await slave.get_keys_by_id([keys[0].key_id, "00000000-0000-4000-8000-000000000000"])
    assert [k.key for k in await slave.get_keys_by_id([k.key_id for k in keys])] == [k.key for k in keys]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=20), st.lists(st.integers(0, 200), min_size=1, max_size=20))
def test_pad_stream_matches_concatenation(key_lens, takes):
    from qkdstack.apps.keysource import QKDKey

    keys = [QKDKey(str(i), hashlib.sha256(bytes([i])).digest() * 10) for i in range(len(key_lens))]
    keys = [QKDKey(k.key_id, k.key[:n]) for k, n in zip(keys, key_lens, strict=True)]
    stream = b"".join(k.key for k in keys)
    pad = PadStream()
    pad.append(keys)
    pos = 0
    for n in takes:
        if pos + n > len(stream):
            with pytest.raises(KeyStoreError):
                pad.take(n)
            assert pad.available == len(stream) - pos
            continue
        assert pad.take(n) == stream[pos : pos + n]
        pos += n
    assert pad.discard() == len(stream) - pos and pad.available == 0


def test_xor_bytes():
    a, b = bytes(range(256)), bytes(reversed(range(256)))
    assert xor_bytes(a, b) == bytes(x ^ y for x, y in zip(a, b, strict=True))
    assert xor_bytes(b"", b"") == b""


def test_one_time_mac_is_poly1305_keyed_r_then_s():
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    from qkdstack.apps.otp import ONE_TIME_MAC

    key = hashlib.sha256(b"k").digest()
    assert ONE_TIME_MAC.key_bytes == 32
    assert ONE_TIME_MAC.tag(key, b"message") == Poly1305.generate_tag(key, b"message")
