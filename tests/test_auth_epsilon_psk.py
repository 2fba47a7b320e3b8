"""Security review findings on authentication (issue 10): the ε of a round includes the key's own ε′,
the PSK is used once, and its public check value says nothing about the key."""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from qkdstack.auth import psk as psk_mod
from qkdstack.auth.pool import AuthKeyPool
from qkdstack.auth.session import authenticate_round, begin_round, round_epsilon
from qkdstack.auth.wegman_carter import poly1305_epsilon
from qkdstack.errors import ConfigError
from qkdstack.protocol.channel import channel_pair

EPS_SEC = 1e-10


async def _round(ca, cb, pa, pb, rid, key, key_epsilon=EPS_SEC):
    async def stages(ch, first):
        if first:
            await ch.send("test.data", v=b"x" * 100)
            await ch.recv("test.data")
        else:
            await ch.recv("test.data")
            await ch.send("test.data", v=b"y")
        return key

    return await asyncio.gather(
        authenticate_round(ca, pa, "alice", rid, lambda: stages(ca, True), key_epsilon),
        authenticate_round(cb, pb, "bob", rid, lambda: stages(cb, False), key_epsilon),
    )


async def test_round_epsilon_includes_the_key_epsilon():
    """Portmann 2014: a round costs messages·ε + ε′; ε′ is the ε_sec of every QKD key its pads came from."""
    seed = secrets.token_bytes(512)
    pa, pb = AuthKeyPool.from_seed("A-B", seed), AuthKeyPool.from_seed("A-B", seed)
    ca, cb = channel_pair(2)
    outcomes = []
    for rid in range(1, 6):
        oa, ob = await _round(ca, cb, pa, pb, rid, secrets.token_bytes(4000))
        assert oa.epsilon == ob.epsilon
        outcomes.append(oa)
    # rounds 1-2 draw on the PSK only (ε′ = 0); once a QKD refill is committed (round 3 on) every round
    # draws on QKD key and pays at least its ε_sec
    assert outcomes[0].epsilon_key == 0.0
    for o in outcomes[2:]:
        assert o.epsilon_key >= EPS_SEC
        assert o.epsilon == pytest.approx(o.epsilon_mac + o.epsilon_key)
        assert o.epsilon >= EPS_SEC > 1e3 * o.epsilon_mac
    rep = pa.report()
    assert rep["epsilon_total"] == pytest.approx(sum(o.epsilon for o in outcomes))
    assert rep["epsilon_key_total"] >= 3 * EPS_SEC
    # the same after a restart: the sources of the pool's bytes are persisted
    again = AuthKeyPool.from_bytes(pa.to_bytes())
    assert again.report()["epsilon_total"] == rep["epsilon_total"]
    keys = again.reserve_round(pb.sync_state(), 6)
    assert keys.meta["key_epsilon"] >= EPS_SEC


async def test_mac_epsilon_uses_the_longer_transcript():
    """The forger picks the length: the bound uses the longer of the two ends' transcripts."""
    seed = secrets.token_bytes(512)
    pa, pb = AuthKeyPool.from_seed("A-B", seed), AuthKeyPool.from_seed("A-B", seed)
    ca, cb = channel_pair(2)
    auth_a, auth_b = await asyncio.gather(begin_round(ca, pa, "alice", 1), begin_round(cb, pb, "bob", 1))
    await ca.send("test.data", v=b"z" * 10_000)
    await cb.recv("test.data")
    # Alice claims a much longer transcript in her tag message (an attacker can change that field)
    orig = ca.send

    async def long_claim(kind, disclosed=None, **fields):
        if kind == "auth.tag":
            fields["length"] = 10**9
        await orig(kind, disclosed, **fields)

    ca.send = long_claim
    oa, ob = await asyncio.gather(auth_a.finish(b"k" * 500), auth_b.finish(b"k" * 500), return_exceptions=True)
    assert ob.epsilon_mac == round_epsilon(10**9) == 2 * poly1305_epsilon(10**9)
    assert oa.epsilon_mac == round_epsilon(auth_a.transcript.byte_length)


def test_psk_check_value_is_independent_of_the_key(tmp_path):
    """The check is a one-time-padded universal hash under bytes used for nothing else.

    Shown directly: for one fixed key, the check values over fresh check bytes are uniform (no value
    repeats in 2000 draws of 64 bits), and changing the check bytes alone changes the check.
    """
    key = secrets.token_bytes(256)
    checks = {psk_mod._check("A-B", key, secrets.token_bytes(psk_mod.CHECK_BYTES)) for _ in range(2000)}
    assert len(checks) == 2000
    p = tmp_path / "link.psk"
    check = psk_mod.generate_psk_file(p, 256)
    loaded = psk_mod.load_psk(p)
    assert loaded.check == check == psk_mod.psk_check(p)
    # the authentication key handed to the pool excludes the check bytes
    material = base64.b64decode("".join(p.read_text().split("key:\n")[1].split()))
    assert loaded.key == material[:256] and len(material) == 256 + psk_mod.CHECK_BYTES
    pool = psk_mod.pool_from_psk(p)
    assert pool.seed_check == check


def test_psk_is_consumed_and_cannot_seed_twice(tmp_path):
    p = tmp_path / "link.psk"
    check = psk_mod.generate_psk_file(p, 256)
    key = psk_mod.load_psk(p).key
    psk_mod.pool_from_psk(p)
    psk_mod.consume_psk(p)
    raw = p.read_bytes()
    assert key not in raw and base64.b64encode(key)[:40] not in raw
    assert psk_mod.psk_check(p) == check  # the header (check value) stays for the operator's records
    with pytest.raises(ConfigError, match=r"consumed .* make a new one with `qkdstack psk`"):
        psk_mod.pool_from_psk(p)
    psk_mod.consume_psk(p)  # idempotent


def test_old_psk_format_refused(tmp_path):
    p = tmp_path / "old.psk"
    p.write_text("qkdstack-psk v1\nlink: A-B\nbytes: 128\ncheck: 00\nkey:\nAAAA\n")
    p.chmod(0o600)
    with pytest.raises(ConfigError, match="old qkdstack-psk v1 format"):
        psk_mod.load_psk(p)


def test_psk_command(tmp_path: Path):
    out = tmp_path / "new.psk"
    run = subprocess.run([sys.executable, "-m", "qkdstack.cli", "psk", "--link", "A-B", "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert psk_mod.psk_check(out) in run.stdout
    again = subprocess.run([sys.executable, "-m", "qkdstack.cli", "psk", "--link", "A-B", "--out", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


async def test_rounds_that_abort_before_any_tag_give_their_keys_back():
    """A run of aborted rounds (too small a frame, high QBER) must not exhaust the pool (issue 11): keys that
    entered no tag at an end are given back there; a round whose tags were exchanged keeps its burns."""
    seed = secrets.token_bytes(512)
    pa, pb = AuthKeyPool.from_seed("A-B", seed), AuthKeyPool.from_seed("A-B", seed)
    ca, cb = channel_pair(2)
    await _round(ca, cb, pa, pb, 1, secrets.token_bytes(4000))
    balance = pa.report()["balance_bits"], pb.report()["balance_bits"]
    for rid in range(2, 200):  # far more rounds than the pool has pads
        auth_a, auth_b = await asyncio.gather(begin_round(ca, pa, "alice", rid), begin_round(cb, pb, "bob", rid))
        auth_a.abandon()
        auth_b.abandon()
    assert (pa.report()["balance_bits"], pb.report()["balance_bits"]) == balance
    oa, ob = await _round(ca, cb, pa, pb, 200, secrets.token_bytes(4000))
    assert oa.key_for_store == ob.key_for_store and pa.fingerprint() == pb.fingerprint()
    assert oa.consumed_bits in (256, 512)  # that round did pay for its tags
