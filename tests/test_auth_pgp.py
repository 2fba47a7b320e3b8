"""OpenPGP web-of-trust bootstrap with GnuPG: trust computation and transcript signatures."""

from __future__ import annotations

import asyncio
import datetime
import secrets
import shutil

import pytest

from qkdstack.auth.bootstrap import begin_bootstrap_round
from qkdstack.auth.pgp import GpgKeyring, pgp_signer, pgp_verifier
from qkdstack.auth.pki import PeerRefused
from qkdstack.protocol.channel import channel_pair

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="GnuPG (gpg) is not installed")


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A node's keyring and a small web: own key O; introducers F (full), M1..M3 (marginal); peers."""
    base = tmp_path_factory.mktemp("wot")
    world = GpgKeyring(base / "world")
    node = GpgKeyring(base / "node")
    rings = [world, node]
    fprs = {}
    for name in ["F", "F2", "M1", "M2", "M3", "P_full", "P_two", "P_three", "P_none", "P_rev", "P_exp", "P_deep"]:
        expire = "1d" if name == "P_exp" else "2y"
        fprs[name] = world.generate_key(f"{name} <{name.lower()}@qkd.test>", expire=expire)
    world.certify(fprs["F"], fprs["P_full"])
    world.certify(fprs["F"], fprs["F2"])  # F2 is valid only through F (depth 2) ...
    world.certify(fprs["F2"], fprs["P_deep"])  # ... and introduces P_deep (depth 3)
    world.certify(fprs["F"], fprs["P_rev"])
    world.certify(fprs["F"], fprs["P_exp"])
    for m in ("M1", "M2"):
        world.certify(fprs[m], fprs["P_two"])
    for m in ("M1", "M2", "M3"):
        world.certify(fprs[m], fprs["P_three"])
    world.import_keys(world.revocation_certificate(fprs["P_rev"]))
    fprs["O"] = node.generate_key("Node A <a@qkd.test>")
    for name in fprs:
        if name != "O":
            node.import_keys(world.export_public(fprs[name]))
    for name, level in (("F", "full"), ("M1", "marginal"), ("M2", "marginal"), ("M3", "marginal")):
        node.certify(fprs["O"], fprs[name])  # the node vouches for its introducers' keys
        node.set_owner_trust(fprs[name], level)
    node.set_owner_trust(fprs["F2"], "full")
    yield world, node, fprs
    for r in rings:
        r.close()


def test_own_key_ultimate_and_introducers_valid(web):
    _, node, f = web
    assert node.validity(f["O"]) == "u"
    node.accept_peer(f["F"])
    node.accept_peer(f["M1"])


@pytest.mark.parametrize(
    ("peer", "reason"),
    [("P_full", None), ("P_three", None), ("P_two", "untrusted"), ("P_none", "untrusted"), ("P_rev", "revoked")],
)
def test_web_of_trust_decisions(web, peer, reason):
    _, node, f = web
    if reason is None:
        node.accept_peer(f[peer])
    else:
        with pytest.raises(PeerRefused) as ei:
            node.accept_peer(f[peer])
        assert ei.value.reason == reason


def test_expired_peer_refused(web):
    _, node, f = web
    node.accept_peer(f["P_exp"])  # valid today (1-day key certified by F)
    later = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)).strftime("%Y%m%dT%H%M%S")
    future = GpgKeyring(node.homedir, faked_time=later)
    with pytest.raises(PeerRefused) as ei:
        future.accept_peer(f["P_exp"])
    assert ei.value.reason == "expired"


def test_certification_depth(web):
    _, node, f = web
    node.accept_peer(f["F2"])
    node.accept_peer(f["P_deep"])  # O -> F -> F2 -> P_deep
    shallow = GpgKeyring(node.homedir, max_cert_depth=2)  # O certifies F (1), F certifies P_full and F2 (2)
    try:
        with pytest.raises(PeerRefused):
            shallow.accept_peer(f["P_deep"])
        shallow.accept_peer(f["P_full"])
    finally:
        GpgKeyring(node.homedir).validity(f["O"])


def test_unknown_key_refused(web):
    _, node, _ = web
    with pytest.raises(PeerRefused) as ei:
        node.accept_peer("0" * 40)
    assert ei.value.reason == "unknown-key"


def test_stricter_marginals_needed(web):
    _, node, f = web
    strict = GpgKeyring(node.homedir, marginals_needed=4)
    try:
        with pytest.raises(PeerRefused):
            strict.accept_peer(f["P_three"])
    finally:
        GpgKeyring(node.homedir).validity(f["O"])  # recompute the trustdb with the default options


def test_transcript_signature(web):
    world, node, f = web
    digest = secrets.token_bytes(32)
    sig = world.sign(f["P_full"], digest)
    node.verify(f["P_full"], digest, sig)
    with pytest.raises(PeerRefused) as ei:
        node.verify(f["P_full"], secrets.token_bytes(32), sig)
    assert ei.value.reason == "bad-signature"
    # a valid signature by another accepted key is not the expected peer's
    with pytest.raises(PeerRefused) as ei:
        node.verify(f["P_three"], digest, sig)
    assert ei.value.reason in ("bad-signature", "wrong-name")
    # a good signature from an untrusted key is refused before the signature matters
    sig_two = world.sign(f["P_two"], digest)
    with pytest.raises(PeerRefused) as ei:
        node.verify(f["P_two"], digest, sig_two)
    assert ei.value.reason == "untrusted"


async def test_pgp_bootstrap_round(web):
    """Node A (own key O) and peer P_full bootstrap: A accepts P_full via F; P_full's side trusts O directly."""
    world, node, f = web
    world.import_keys(node.export_public(f["O"]))
    world.certify(f["P_full"], f["O"])  # the peer's own key vouches for A (its ultimate key... see next line)
    world.set_owner_trust(f["P_full"], "ultimate")
    ca, cb = channel_pair(30)
    key = secrets.token_bytes(4096)

    async def side(ch, role, ring, own, peer):
        boot = await begin_bootstrap_round(ch, role, "A-B", own)
        await (ch.send("x.data", v=b"round one") if role == "alice" else ch.recv("x.data"))
        return await boot.finish(pgp_signer(ring, own), pgp_verifier(ring, peer), key)

    (pa, ka), (pb, kb) = await asyncio.gather(
        side(ca, "alice", node, f["O"], f["P_full"]), side(cb, "bob", world, f["P_full"], f["O"])
    )
    assert ka == kb and pa.fingerprint() == pb.fingerprint()
    # an untrusted peer key is refused and both sides learn why
    ca, cb = channel_pair(30)
    results = await asyncio.gather(
        side(ca, "alice", node, f["O"], f["P_two"]),
        side(cb, "bob", world, f["P_two"], f["O"]),
        return_exceptions=True,
    )
    assert isinstance(results[0], PeerRefused) and results[0].reason == "untrusted"
    assert "untrusted" in str(results[1])
