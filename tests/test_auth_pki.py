"""PKI bootstrap: dual classical + ML-DSA-65 signatures, chains, expiry, revocation, names, key usage."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import secrets

import pytest
from cryptography import x509

from qkdstack import certs
from qkdstack.auth.bootstrap import begin_bootstrap_round, pki_signer, pki_verifier
from qkdstack.auth.pki import (
    PeerRefused,
    PkiIdentity,
    SignatureBundle,
    TrustAnchors,
    sign_transcript,
    verify_transcript,
)
from qkdstack.auth.pool import AuthKeyPool
from qkdstack.auth.session import begin_round
from qkdstack.errors import AuthenticationError, ConfigError, PeerAbort
from qkdstack.protocol.channel import channel_pair

NOW = datetime.datetime.now(datetime.UTC)


def _identity(name, cca, ccak, qca, qcak, *, classical_kind="ed25519", **kw):
    ck = certs.generate_key(classical_kind)
    qk = certs.generate_key("ml-dsa-65")
    cc = certs.issue_certificate(cca, ccak, name, ck.public_key(), client=False, server=False, signing=True, **kw)
    qc = certs.issue_certificate(qca, qcak, name, qk.public_key(), client=False, server=False, signing=True, **kw)
    return PkiIdentity(name, ck, (cc,), qk, (qc,))


@pytest.fixture(scope="module")
def pki():
    cca, ccak = certs.make_ca("Operator classical CA", key_kind="ec-p256")
    qca, qcak = certs.make_ca("Operator ML-DSA CA", key_kind="ml-dsa-65")
    a = _identity("node-a", cca, ccak, qca, qcak)
    b = _identity("node-b", cca, ccak, qca, qcak, classical_kind="ec-p256")
    revoked = _identity("node-r", cca, ccak, qca, qcak)
    crls = (
        certs.make_crl(cca, ccak, [revoked.classical_chain[0].serial_number]),
        certs.make_crl(qca, qcak, []),
    )
    trust = TrustAnchors((cca,), (qca,), crls)
    return {"cca": cca, "ccak": ccak, "qca": qca, "qcak": qcak, "a": a, "b": b, "revoked": revoked, "trust": trust}


def _refused(bundle, digest, trust, name, now=None):
    with pytest.raises(PeerRefused) as ei:
        verify_transcript(bundle, digest, trust, name, now)
    return ei.value.reason


def test_good_chain_passes(pki):
    d = secrets.token_bytes(32)
    verify_transcript(sign_transcript(pki["a"], d), d, pki["trust"], "node-a")
    verify_transcript(sign_transcript(pki["b"], d), d, pki["trust"], "node-b")
    # the bundle survives the channel encoding
    f = sign_transcript(pki["a"], d).to_fields()
    verify_transcript(SignatureBundle.from_fields(f), d, pki["trust"], "node-a")


def test_expired_and_not_yet_valid(pki):
    d = secrets.token_bytes(32)
    past = _identity(
        "node-a", pki["cca"], pki["ccak"], pki["qca"], pki["qcak"],
        not_before=NOW - datetime.timedelta(days=30), not_after=NOW - datetime.timedelta(days=1),
    )  # fmt: skip
    assert _refused(sign_transcript(past, d), d, pki["trust"], "node-a") == "expired"
    good = sign_transcript(pki["a"], d)
    assert _refused(good, d, pki["trust"], "node-a", NOW + datetime.timedelta(days=400)) == "expired"
    assert _refused(good, d, pki["trust"], "node-a", NOW - datetime.timedelta(days=1)) == "not-yet-valid"


def test_unknown_ca(pki):
    d = secrets.token_bytes(32)
    cca, ccak = certs.make_ca("Rogue CA", key_kind="ed25519")
    qca, qcak = certs.make_ca("Rogue ML-DSA CA", key_kind="ml-dsa-65")
    rogue = _identity("node-a", cca, ccak, qca, qcak)
    assert _refused(sign_transcript(rogue, d), d, pki["trust"], "node-a") == "unknown-ca"
    # a rogue CA with the operator CA's *name* is caught by the signature check on the chain link
    fake_ca, fake_key = certs.make_ca("Operator classical CA", key_kind="ec-p256")
    spoof = _identity("node-a", fake_ca, fake_key, pki["qca"], pki["qcak"])
    assert _refused(sign_transcript(spoof, d), d, pki["trust"], "node-a") == "unknown-ca"


def test_revoked(pki):
    d = secrets.token_bytes(32)
    assert _refused(sign_transcript(pki["revoked"], d), d, pki["trust"], "node-r") == "revoked"
    no_crl = dataclasses.replace(pki["trust"], crls=())
    assert _refused(sign_transcript(pki["a"], d), d, no_crl, "node-a") == "no-crl"
    verify_transcript(sign_transcript(pki["a"], d), d, dataclasses.replace(no_crl, require_crl=False), "node-a")


def test_wrong_name(pki):
    d = secrets.token_bytes(32)
    assert _refused(sign_transcript(pki["a"], d), d, pki["trust"], "node-b") == "wrong-name"
    # claiming the right name in the bundle does not help: the certificates name node-a
    forged = dataclasses.replace(sign_transcript(pki["a"], d), signer="node-b")
    assert _refused(forged, d, pki["trust"], "node-b") == "wrong-name"


def test_wrong_key_usage(pki):
    d = secrets.token_bytes(32)
    # a TLS-only certificate without digitalSignature, built by hand
    ck = certs.generate_key("ed25519")
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "node-a")]))
        .issuer_name(pki["cca"].subject)
        .public_key(ck.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, True, False, False, False, False, False, False), critical=True
        )  # keyEncipherment only
    )
    cert = builder.sign(pki["ccak"], certs._sign_hash(pki["ccak"]))
    ident = dataclasses.replace(pki["a"], classical_key=ck, classical_chain=(cert,))
    assert _refused(sign_transcript(ident, d), d, pki["trust"], "node-a") == "key-usage"
    # an ML-DSA certificate presented as the classical one: wrong key type
    swapped = SignatureBundle(
        "node-a", sign_transcript(pki["a"], d).pq_chain, b"x", sign_transcript(pki["a"], d).pq_chain, b"y"
    )
    assert _refused(swapped, d, pki["trust"], "node-a") in ("unknown-ca", "key-usage")


def test_bad_signatures_and_both_required(pki):
    d = secrets.token_bytes(32)
    good = sign_transcript(pki["a"], d)
    assert _refused(good, secrets.token_bytes(32), pki["trust"], "node-a") == "bad-signature"
    other = sign_transcript(pki["a"], secrets.token_bytes(32))
    # a valid classical signature but an ML-DSA signature over something else: refused, and vice versa
    assert (
        _refused(dataclasses.replace(good, pq_signature=other.pq_signature), d, pki["trust"], "node-a")
        == "bad-signature"
    )
    assert (
        _refused(dataclasses.replace(good, classical_signature=other.classical_signature), d, pki["trust"], "node-a")
        == "bad-signature"
    )
    # either chain missing: refused
    assert _refused(dataclasses.replace(good, pq_chain=()), d, pki["trust"], "node-a") == "malformed"
    assert _refused(dataclasses.replace(good, classical_chain=()), d, pki["trust"], "node-a") == "malformed"
    # a post-quantum root must be ML-DSA
    with pytest.raises(ConfigError):
        TrustAnchors((pki["cca"],), (pki["cca"],))
    with pytest.raises(PeerRefused, match="malformed"):
        SignatureBundle.from_fields({"signer": "node-a"})


def test_keys_hidden_and_identity_checked(pki):
    a = pki["a"]
    assert "PRIVATE" not in repr(a) and "Key" not in repr(a).replace("PkiIdentity", "")
    with pytest.raises(ConfigError, match="does not certify"):
        dataclasses.replace(a, classical_key=certs.generate_key("ed25519"))


def test_identity_files(tmp_path, pki):
    a = pki["a"]
    certs.write_private_key(tmp_path / "c.key", a.classical_key)
    certs.write_private_key(tmp_path / "q.key", a.pq_key)
    certs.write_certificate(tmp_path / "c.pem", [*a.classical_chain, pki["cca"]])
    certs.write_certificate(tmp_path / "q.pem", [*a.pq_chain, pki["qca"]])
    loaded = PkiIdentity.load("node-a", tmp_path / "c.key", tmp_path / "c.pem", tmp_path / "q.key", tmp_path / "q.pem")
    d = secrets.token_bytes(32)
    verify_transcript(sign_transcript(loaded, d), d, pki["trust"], "node-a")  # chain with the root included


async def _bootstrap(pki, a_ident, b_ident, expect_a="node-b", expect_b="node-a"):
    ca, cb = channel_pair(10)
    key = secrets.token_bytes(3000)

    async def side(ch, role, ident, peer):
        boot = await begin_bootstrap_round(ch, role, "A-B", ident.name)
        if role == "alice":
            await ch.send("x.data", v=b"first round")
        else:
            await ch.recv("x.data")
        return await boot.finish(pki_signer(ident), pki_verifier(pki["trust"], peer), key)

    return await asyncio.gather(
        side(ca, "alice", a_ident, expect_a), side(cb, "bob", b_ident, expect_b), return_exceptions=True
    )


async def test_bootstrap_round_and_refusal_in_both_logs(pki):
    (pa, ka), (pb, kb) = await _bootstrap(pki, pki["a"], pki["b"])
    assert ka == kb and pa.lockstep_digest() == pb.lockstep_digest()
    ra, rb = await _bootstrap(pki, pki["revoked"], pki["b"], expect_b="node-r")
    assert isinstance(rb, PeerRefused) and rb.reason == "revoked"
    assert isinstance(ra, PeerAbort) and "revoked" in str(ra)  # Alice learns the reason too


async def test_leaked_signing_key_cannot_forge_later_rounds(pki):
    """After the bootstrap, Alice's PKI identity in Mallory's hands is useless: rounds use WC keys from QKD."""
    (pa, _), (pb, _) = await _bootstrap(pki, pki["a"], pki["b"])
    # Mallory holds node-a's signing keys and certificates, but not the bootstrap round's key;
    # her best guess for the pool is one seeded from key material she makes up.
    mallory = AuthKeyPool.from_seed("A-B", secrets.token_bytes(1024))
    cm, cb = channel_pair(5)

    async def m_side():
        auth = await begin_round(cm, mallory, "alice", 1)
        sign_transcript(pki["a"], auth.transcript.digest())  # she can sign; nobody asks for it any more
        await cm.send("x.data", v=b"forged")
        return await auth.finish(secrets.token_bytes(2000))

    async def b_side():
        auth = await begin_round(cb, pb, "bob", 1)
        await cb.recv("x.data")
        return await auth.finish(secrets.token_bytes(2000))

    rm, rb = await asyncio.gather(m_side(), b_side(), return_exceptions=True)
    assert isinstance(rb, AuthenticationError) and not isinstance(rb, PeerRefused)
    assert isinstance(rm, PeerAbort)  # Bob told Mallory the tag failed
    # while the honest Alice still authenticates the next round with Bob
    ca, cb = channel_pair(5)
    key = secrets.token_bytes(2000)

    async def honest(ch, pool, role):
        auth = await begin_round(ch, pool, role, 2)
        if role == "alice":
            await ch.send("x.data", v=b"real")
        else:
            await ch.recv("x.data")
        return await auth.finish(key)

    oa, ob = await asyncio.gather(honest(ca, pa, "alice"), honest(cb, pb, "bob"))
    assert oa.key_for_store == ob.key_for_store
