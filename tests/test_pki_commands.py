"""``qkdstack pki``: CRLs and certificates renewed on a real deployment, checked by real bootstrap rounds and a real
ETSI 014 server over mutual TLS; SAE certificates from CSRs; bad inputs are one sentence with exit code 2."""

from __future__ import annotations

import asyncio
import base64
import datetime
import secrets
import ssl
import tomllib

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from qkdstack import certs
from qkdstack.auth.bootstrap import begin_bootstrap_round
from qkdstack.auth.pki import PeerRefused
from qkdstack.cli import main
from qkdstack.errors import ConfigError, PeerAbort
from qkdstack.node.config import load_config
from qkdstack.node.credentials import bootstrap_credentials
from qkdstack.node.deployment import write_deployment
from qkdstack.protocol.channel import channel_pair

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture
def deployment(tmp_path):
    out = tmp_path / "dep"
    write_deployment(out, ["A", "B"], bootstrap="pki", pulses_per_frame=10**6)
    return out


def pki(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``qkdstack pki ARGS`` in process; (exit code, stdout, stderr)."""
    rc = main(["pki", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


async def bootstrap(dep) -> tuple[object, object]:
    """One signed bootstrap round between the deployment's sites, with the credentials the node loads."""
    cfg = {s: load_config(dep / s / "site.toml", check_files=False) for s in ("A", "B")}
    ca, cb = channel_pair(10)
    key = secrets.token_bytes(3000)

    async def side(ch, role, config):
        signer, verifier = bootstrap_credentials(config)  # read from the files at each round, as the node does
        boot = await begin_bootstrap_round(ch, role, "A-B", config.site.name)
        if role == "alice":
            await ch.send("x.data", v=b"first round")
        else:
            await ch.recv("x.data")
        return await boot.finish(signer, verifier, key)

    return tuple(await asyncio.gather(side(ca, "alice", cfg["A"]), side(cb, "bob", cfg["B"]),
                                      return_exceptions=True))


def assert_accepted(results) -> None:
    (pa, ka), (pb, kb) = results
    assert ka == kb and pa.lockstep_digest() == pb.lockstep_digest()


def refusal(results) -> str:
    """The reason B refused A's bundle (A learns it too)."""
    ra, rb = results
    assert isinstance(rb, PeerRefused), rb
    assert isinstance(ra, PeerAbort) and rb.reason in str(ra)
    return rb.reason


def root(dep, label):
    folder = dep / "operator" / "pki"
    return certs.load_certificate(folder / f"{label}-root.pem"), certs.load_private_key(folder / f"{label}-root.key")


# ---------------------------------------------------------------------------------------------- CRLs


async def test_crl_reissued_after_expiry_makes_bootstrap_work_again(deployment, capsys):
    assert_accepted(await bootstrap(deployment))  # what init wrote works
    expired = [certs.make_crl(*root(deployment, label), [], last_update=NOW - datetime.timedelta(days=40),
                              next_update=NOW - datetime.timedelta(days=10)) for label in ("classical", "mldsa")]
    for site in ("A", "B"):
        certs.write_crl(deployment / site / "pki" / "crls.pem", expired)
    assert refusal(await bootstrap(deployment)) == "crl-invalid"
    rc, out, _ = pki(capsys, "status", "--deployment", deployment)  # the operator's check says so, and what to run
    assert rc == 1 and "4 of 16 expired" in out
    assert [line for line in out.splitlines() if "EXPIRED" in line and "A/pki/crls.pem" in line
            and "qkdstack pki crl --deployment" in line]

    rc, out, err = pki(capsys, "crl", "--deployment", deployment, "--days", 45)
    assert rc == 0 and not err
    assert "A/pki/crls.pem" in out and "B/pki/crls.pem" in out and "next update due" in out
    crls = certs.load_crls(deployment / "B" / "pki" / "crls.pem")
    assert len(crls) == 2
    for crl in crls:
        left = crl.next_update_utc - datetime.datetime.now(datetime.UTC)
        assert datetime.timedelta(days=44) < left <= datetime.timedelta(days=45)
    assert certs.load_crls(deployment / "operator" / "pki" / "crls.pem")[0] == crls[0]  # the operator's copy
    assert_accepted(await bootstrap(deployment))
    rc, out, _ = pki(capsys, "status", "--deployment", deployment)
    assert rc == 0 and "all 18 valid for more than 7 days" in out  # the operator's copy (2 CRLs) is new


async def test_revoked_node_refused_and_revocation_kept_on_reissue(deployment, capsys):
    classical = deployment / "A" / "pki" / "classical.pem"
    serial = certs.load_certificate(classical).serial_number
    rc, out, _ = pki(capsys, "crl", "--deployment", deployment, "--revoke", classical)
    assert rc == 0 and "classical 1, mldsa 0" in out
    assert refusal(await bootstrap(deployment)) == "revoked"
    first = certs.load_crls(deployment / "B" / "pki" / "crls.pem")[0]
    date = first.get_revoked_certificate_by_serial_number(serial).revocation_date_utc

    # A plain reissue (the monthly one) keeps the entry and its date: A stays refused.
    rc, out, _ = pki(capsys, "crl", "--deployment", deployment)
    assert rc == 0 and "classical 1, mldsa 0" in out
    again = certs.load_crls(deployment / "B" / "pki" / "crls.pem")[0]
    assert again.get_revoked_certificate_by_serial_number(serial).revocation_date_utc == date
    assert again.next_update_utc >= first.next_update_utc
    assert refusal(await bootstrap(deployment)) == "revoked"

    # Renewing a revoked node certificate with its old key would reinstate it: refused, nothing written.
    before = classical.read_bytes()
    rc, _, err = pki(capsys, "renew", "--deployment", deployment, "--site", "A")
    assert rc == 2 and "is revoked" in err and err.count("\n") == 1
    assert classical.read_bytes() == before
    # Fresh keys are certified, and A bootstraps again.
    rc, out, _ = pki(capsys, "renew", "--deployment", deployment, "--site", "A", "--new-keys")
    assert rc == 0 and "new key" in out
    assert_accepted(await bootstrap(deployment))


async def test_revoke_by_serial_goes_on_both_crls(deployment, capsys):
    serial = certs.load_certificate(deployment / "B" / "pki" / "mldsa.pem").serial_number
    rc, out, _ = pki(capsys, "crl", "--deployment", deployment, "--revoke", hex(serial))
    assert rc == 0 and "classical 1, mldsa 1" in out
    ra, _ = await bootstrap(deployment)
    assert isinstance(ra, PeerRefused) and ra.reason == "revoked"  # A refuses B


# ---------------------------------------------------------------------------------------------- renewal


async def test_renew_replaces_expired_node_certificates(deployment, capsys):
    # A's node certificates expired (made so here with the operator roots, as a year would).
    for label, key_name in (("classical", "classical.key"), ("mldsa", "mldsa.key")):
        ca_cert, ca_key = root(deployment, label)
        path = deployment / "A" / "pki" / f"{label}.pem"
        old = certs.load_certificate(path)
        key = certs.load_private_key(deployment / "A" / "pki" / key_name)
        expired = certs.issue_certificate(ca_cert, ca_key, "A", key.public_key(), client=False, server=False,
                                          signing=True, not_before=NOW - datetime.timedelta(days=400),
                                          not_after=NOW - datetime.timedelta(days=35))
        assert old.subject == expired.subject
        certs.write_certificate(path, expired)
    assert refusal(await bootstrap(deployment)) == "expired"

    kme_before = certs.load_certificate(deployment / "A" / "tls" / "kme.pem")
    rc, _, err = pki(capsys, "renew", "--deployment", deployment, "--site", "A", "--days", 500)
    assert rc == 0 and not err
    for label in ("classical", "mldsa"):
        new = certs.load_certificate(deployment / "A" / "pki" / f"{label}.pem")
        assert new.subject.rfc4514_string() == "CN=A"
        assert new.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=499)
        assert new.extensions.get_extension_for_class(x509.KeyUsage).value.content_commitment  # signing cert
    kme = certs.load_certificate(deployment / "A" / "tls" / "kme.pem")
    assert kme.subject == kme_before.subject and kme.serial_number != kme_before.serial_number
    assert kme.public_key() == kme_before.public_key()  # keys kept by default
    assert kme.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
        kme_before.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert kme.not_valid_after_utc > kme_before.not_valid_after_utc
    assert_accepted(await bootstrap(deployment))
    load_config(deployment / "A" / "site.toml")  # the node's own file checks accept the renewed KME files


# ---------------------------------------------------------------------------------------------- SAEs


def _csr_file(path, cn, key=None):
    key = key or certs.generate_key("ec-p256")
    path.write_bytes(certs.make_csr(key, cn).public_bytes(serialization.Encoding.PEM))
    return key


async def test_sae_signed_by_sign_sae_fetches_keys_over_etsi014(deployment, tmp_path, capsys):
    from qkdstack.kms.etsi014 import TLSFiles, serve_etsi014
    from qkdstack.kms.kme import KME, KMEConfig, link_pair
    from qkdstack.kms.store import open_store

    # The SAE makes its key and request; the operator signs it with the site CA and registers the SAE.
    sae_key = _csr_file(tmp_path / "new.csr", "SAE_NEW")
    certs.write_private_key(tmp_path / "new.key", sae_key)
    rc, out, err = pki(capsys, "sign-sae", "--site-dir", deployment / "A", "--csr", tmp_path / "new.csr",
                       "--out", tmp_path / "new.pem", "--register")
    assert rc == 0 and not err and "added SAE_NEW" in out
    cert = certs.load_certificate(tmp_path / "new.pem")
    assert certs.common_name(cert) == "SAE_NEW" and cert.public_key() == sae_key.public_key()
    # The KME server certificate is renewed too: the server below serves the renewed one.
    assert pki(capsys, "renew", "--deployment", deployment, "--site", "A")[0] == 0

    cfg = {s: load_config(deployment / s / "site.toml") for s in ("A", "B")}
    assert "SAE_NEW" in cfg["A"].kms.sae_ids
    stores, kmes = [], {}
    for s, peer in (("A", "B"), ("B", "A")):
        stores.append(open_store(str(tmp_path / f"{s}.db"), chunk_bits=256))
        kmes[s] = KME(KMEConfig(f"KME_{s}", f"KME_{peer}", frozenset(cfg[s].kms.sae_ids)), stores[-1])
    ab, ba = link_pair(kmes["A"], kmes["B"])
    await kmes["A"].attach_peer(ab)
    await kmes["B"].attach_peer(ba)
    block = secrets.token_bytes(32 * 64)
    for kme in kmes.values():
        await kme.add_block("round-1", block)

    def tls(s):
        c = cfg[s]
        return TLSFiles(c.resolve(c.kms.tls_cert), c.resolve(c.kms.tls_key), c.resolve(c.kms.ca_cert))

    def client(srv, s, cert_file, key_file):
        ctx = ssl.create_default_context(cafile=str(deployment / s / "tls" / "ca.pem"))
        ctx.load_cert_chain(str(cert_file), str(key_file))
        return httpx.AsyncClient(base_url=srv.url, verify=ctx, timeout=10)

    sae_b_files = deployment / "B" / "sae" / "SAE_B.pem", deployment / "B" / "sae" / "SAE_B.key"
    try:
        async with (
            serve_etsi014(kmes["A"], "127.0.0.1", 0, tls("A")) as srv_a,
            serve_etsi014(kmes["B"], "127.0.0.1", 0, tls("B")) as srv_b,
            client(srv_a, "A", tmp_path / "new.pem", tmp_path / "new.key") as sae_new,
            client(srv_b, "B", *sae_b_files) as sae_b,
        ):
            r = await sae_new.get("/api/v1/keys/SAE_B/enc_keys", params={"number": 1, "size": 256})
            assert r.status_code == 200, r.text
            key = r.json()["keys"][0]
            assert len(base64.b64decode(key["key"])) == 32
            r = await sae_b.get("/api/v1/keys/SAE_NEW/dec_keys", params={"key_ID": key["key_ID"]})
            assert r.status_code == 200 and r.json()["keys"] == [key]
    finally:
        for kme in kmes.values():
            await kme.close()
        for store in stores:
            store.close()


def test_new_sae_makes_key_csr_and_certificate(deployment, capsys):
    rc, out, _ = pki(capsys, "new-sae", "--site-dir", deployment / "B", "--sae", "SAE_B2")
    assert rc == 0
    folder = deployment / "B" / "sae"
    assert (folder / "SAE_B2.key").stat().st_mode & 0o777 == 0o600
    key = certs.load_private_key(folder / "SAE_B2.key")
    cert = certs.load_certificate(folder / "SAE_B2.pem")
    assert cert.public_key() == key.public_key() and certs.common_name(cert) == "SAE_B2"
    assert certs.is_issued_by(cert, certs.load_certificate(deployment / "B" / "tls" / "ca.pem"))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # not registered without --register: the line to add is printed, the file is unchanged
    assert 'sae_ids = ["SAE_B", "SAE_B2"]' in out
    assert tomllib.loads((deployment / "B" / "site.toml").read_text())["kms"]["sae_ids"] == ["SAE_B"]
    # its request signed again renews the certificate in place (same key and CN, new serial)
    rc, _, _ = pki(capsys, "sign-sae", "--site-dir", deployment / "B", "--csr", folder / "SAE_B2.csr",
                   "--out", folder / "SAE_B2.pem")
    renewed = certs.load_certificate(folder / "SAE_B2.pem")
    assert rc == 0 and renewed.serial_number != cert.serial_number and renewed.public_key() == key.public_key()
    # the same ID again would overwrite a key: refused
    rc, _, err = pki(capsys, "new-sae", "--site-dir", deployment / "B", "--sae", "SAE_B2")
    assert rc == 2 and "already exists" in err


def test_register_refuses_an_edit_it_cannot_check(deployment, capsys):
    path = deployment / "A" / "site.toml"
    text = path.read_text().replace('sae_ids = ["SAE_A"]', 'sae_ids = [\n  "SAE_A",\n]')
    path.write_text(text)
    rc, _, err = pki(capsys, "new-sae", "--site-dir", deployment / "A", "--sae", "SAE_A3", "--register")
    assert rc == 2 and "--register" in err and "cannot be edited safely" in err
    assert path.read_text() == text


# ---------------------------------------------------------------------------------------------- bad input


def _tampered_csr(path):
    der = bytearray(certs.make_csr(certs.generate_key("ec-p256"), "SAE_T").public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature: the request still parses
    path.write_bytes(bytes(der))


def _bad_inputs(dep, tmp):
    (tmp / "garbage.csr").write_bytes(b"not a request\n")
    _csr_file(tmp / "slash.csr", "SAE/x")
    _csr_file(tmp / "mldsa.csr", "SAE_Q", certs.generate_key("ml-dsa-65"))
    rsa_csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "SAE_R")])
    ).sign(rsa.generate_private_key(65537, 2048), hashes.SHA256())
    (tmp / "rsa.csr").write_bytes(rsa_csr.public_bytes(serialization.Encoding.PEM))
    _tampered_csr(tmp / "tampered.csr")
    _csr_file(tmp / "good.csr", "SAE_G")
    psk = tmp / "psk"
    write_deployment(psk, ["A", "B"], bootstrap="psk", pulses_per_frame=10**6)
    site = dep / "A"
    return [
        (["crl", "--deployment", tmp / "nope"], "--deployment"),
        (["crl", "--deployment", tmp / "garbage.csr"], "--deployment"),
        (["crl", "--deployment", psk], "--deployment"),
        (["crl", "--deployment", dep, "--days", "0"], "--days"),
        (["crl", "--deployment", dep, "--revoke", "not-a-file"], "--revoke"),
        (["crl", "--deployment", dep, "--revoke", tmp / "garbage.csr"], "--revoke"),
        (["crl", "--deployment", dep, "--revoke", psk / "A" / "tls" / "kme.pem"], "--revoke"),
        (["crl", "--deployment", dep, "--days", "x"], "--days"),
        (["renew", "--deployment", dep, "--site", "C"], "--site"),
        (["renew", "--deployment", dep, "--site", "../A"], "--site"),
        (["renew", "--deployment", tmp / "nope", "--site", "A"], "--deployment"),
        (["sign-sae", "--site-dir", tmp / "nope", "--csr", tmp / "good.csr", "--out", tmp / "o.pem"], "--site-dir"),
        (["sign-sae", "--site-dir", dep, "--csr", tmp / "good.csr", "--out", tmp / "o.pem"], "--site-dir"),
        (["sign-sae", "--site-dir", site, "--csr", tmp / "missing.csr", "--out", tmp / "o.pem"], "--csr"),
        (["sign-sae", "--site-dir", site, "--csr", tmp, "--out", tmp / "o.pem"], "--csr"),
        (["sign-sae", "--site-dir", site, "--csr", tmp / "garbage.csr", "--out", tmp / "o.pem"], "--csr"),
        (["sign-sae", "--site-dir", site, "--csr", site / "tls" / "ca.pem", "--out", tmp / "o.pem"], "--csr"),
        (["sign-sae", "--site-dir", site, "--csr", tmp / "tampered.csr", "--out", tmp / "o.pem"], "--csr"),
        (["sign-sae", "--site-dir", site, "--csr", tmp / "slash.csr", "--out", tmp / "o.pem"], "--csr"),
        (["sign-sae", "--site-dir", site, "--csr", tmp / "mldsa.csr", "--out", tmp / "o.pem"], "--csr"),
        (["sign-sae", "--site-dir", site, "--csr", tmp / "rsa.csr", "--out", tmp / "o.pem"], "--csr"),
        (["sign-sae", "--site-dir", site, "--csr", tmp / "good.csr", "--out", tmp], "--out"),
        (["sign-sae", "--site-dir", site, "--csr", tmp / "good.csr", "--out", tmp / "no" / "o.pem"], "--out"),
        (["sign-sae", "--site-dir", site, "--csr", tmp / "good.csr", "--out", site / "tls" / "ca.pem"], "--out"),
        (["sign-sae", "--site-dir", site, "--csr", tmp / "good.csr", "--out", site / "sae" / "SAE_A.pem"], "--out"),
        (["new-sae", "--site-dir", site, "--sae", " SAE"], "--sae"),
        (["new-sae", "--site-dir", site, "--sae", "S" * 65], "--sae"),
        (["new-sae", "--site-dir", site, "--sae", "SAE_N", "--out-dir", tmp / "garbage.csr"], "--out-dir"),
        (["renew"], "--deployment"),
        (["status", "--deployment", tmp / "nope"], "--deployment"),
        (["status", "--deployment", tmp], "--deployment"),
        (["status", "--deployment", dep, "--warn-days", "-1"], "--warn-days"),
    ]


def test_bad_inputs_are_one_sentence_naming_the_flag(deployment, tmp_path, capsys):
    before = {p: p.read_bytes() for p in deployment.rglob("*") if p.is_file()}
    for args, flag in _bad_inputs(deployment, tmp_path):
        try:
            rc, out, err = pki(capsys, *args)
        except SystemExit as exc:  # argparse's own refusals
            rc, (out, err) = exc.code, capsys.readouterr()
        assert rc == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 or lines[0].startswith("usage:"), (args, err)
        assert flag in lines[-1] and "Traceback" not in err, (args, err)
    assert not (tmp_path / "o.pem").exists()
    assert {p: p.read_bytes() for p in deployment.rglob("*") if p.is_file()} == before  # nothing written


# ---------------------------------------------------------------------------------------------- helpers


def test_reissue_ignores_forged_crls_and_leaves_never_outlive_their_ca(tmp_path):
    ca, ca_key = certs.make_ca("CA", key_kind="ed25519", valid_days=100)
    rogue, rogue_key = certs.make_ca("CA", key_kind="ed25519")  # same name, other key
    real = certs.make_crl(ca, ca_key, {7: NOW - datetime.timedelta(days=3)},
                          last_update=NOW - datetime.timedelta(days=40), next_update=NOW - datetime.timedelta(days=10))
    forged = certs.make_crl(rogue, rogue_key, [8])
    assert certs.revoked_entries([real, forged], ca) == {7: (NOW - datetime.timedelta(days=3)).replace(microsecond=0)}

    key = certs.generate_key("ed25519")
    leaf = certs.issue_certificate(ca, ca_key, "n", key.public_key(), client=False, server=False, signing=True)
    renewed = certs.renew_certificate(leaf, ca, ca_key, valid_days=3000)
    assert renewed.not_valid_after_utc == ca.not_valid_after_utc  # clamped to the CA's end
    with pytest.raises(ConfigError, match="did not issue"):
        certs.renew_certificate(leaf, rogue, rogue_key)
