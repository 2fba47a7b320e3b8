"""X.509 helpers: extensions, file permissions and a real mutual-TLS handshake on loopback."""

from __future__ import annotations

import datetime
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from qkdstack import certs
from qkdstack.errors import ConfigError


@pytest.fixture(scope="module")
def pki():
    ca, ca_key = certs.make_ca("Test CA")
    skey = certs.generate_key()
    scert = certs.issue_certificate(
        ca,
        ca_key,
        "kme-a",
        skey.public_key(),
        client=False,
        server=True,
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
    )
    ckey = certs.generate_key()
    ccert = certs.issue_certificate(ca, ca_key, "sae-1", ckey.public_key(), client=True, server=False)
    return ca, ca_key, skey, scert, ckey, ccert


def test_extensions(pki):
    ca, _, _, scert, _, ccert = pki
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    bc = scert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert list(scert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert list(ccert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    aki = scert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    san = scert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    scert.verify_directly_issued_by(ca)
    assert certs.common_name(ccert) == "sae-1"


@pytest.mark.parametrize("kind", certs.KEY_KINDS)
def test_every_key_kind_signs_certificates(kind):
    ca, ca_key = certs.make_ca(f"CA {kind}", key_kind=kind)
    leaf_key = certs.generate_key(kind)
    leaf = certs.issue_certificate(ca, ca_key, "node", leaf_key.public_key(), client=False, server=False, signing=True)
    leaf.verify_directly_issued_by(ca)
    assert certs.key_kind(leaf.public_key()) == kind
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.content_commitment


def test_bad_parameters():
    with pytest.raises(ConfigError, match="key_kind"):
        certs.generate_key("rsa-1024")
    ca, ca_key = certs.make_ca("CA")
    k = certs.generate_key()
    with pytest.raises(ConfigError):
        certs.issue_certificate(ca, ca_key, "x", k.public_key(), client=False, server=False)
    now = datetime.datetime.now(datetime.UTC)
    with pytest.raises(ConfigError, match="not_after"):
        certs.issue_certificate(
            ca, ca_key, "x", k.public_key(), client=True, server=False, not_before=now, not_after=now
        )


def test_files_roundtrip_and_permissions(tmp_path, pki):
    ca, ca_key, skey, scert, _, _ = pki
    kp = tmp_path / "sub" / "node.key"
    certs.write_private_key(kp, skey)
    assert stat.S_IMODE(kp.stat().st_mode) == 0o600
    assert certs.load_private_key(kp).private_numbers() == skey.private_numbers()
    # overwrite keeps 0600 and leaves no temporary file behind
    certs.write_private_key(kp, skey)
    assert stat.S_IMODE(kp.stat().st_mode) == 0o600
    assert sorted(p.name for p in kp.parent.iterdir()) == ["node.key"]
    kp.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        certs.load_private_key(kp)
    cp = tmp_path / "chain.pem"
    certs.write_certificate(cp, [scert, ca])
    assert certs.load_certificates(cp) == [scert, ca]
    assert certs.load_certificate(cp) == scert
    crl = certs.make_crl(ca, ca_key, [scert.serial_number])
    certs.write_crl(tmp_path / "ca.crl", crl)
    loaded = certs.load_crl(tmp_path / "ca.crl")
    other_ca, other_key = certs.make_ca("Other CA", key_kind="ml-dsa-65")
    certs.write_crl(tmp_path / "all.crl", [crl, certs.make_crl(other_ca, other_key, [7])])
    both = certs.load_crls(tmp_path / "all.crl")
    assert [c.issuer for c in both] == [ca.subject, other_ca.subject]
    assert both[1].is_signature_valid(other_ca.public_key())
    assert loaded.is_signature_valid(ca.public_key())
    assert loaded.get_revoked_certificate_by_serial_number(scert.serial_number) is not None
    encrypted = tmp_path / "enc.key"
    certs.write_private_key(encrypted, skey, password=b"pw")
    assert certs.load_private_key(encrypted, password=b"pw").private_numbers() == skey.private_numbers()


def _tls_server(tmp_path, pki):
    ca, _, skey, scert, _, _ = pki
    certs.write_certificate(tmp_path / "ca.pem", ca)
    certs.write_certificate(tmp_path / "server.pem", scert)
    certs.write_private_key(tmp_path / "server.key", skey)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    ctx.load_verify_locations(tmp_path / "ca.pem")
    sock = socket.create_server(("127.0.0.1", 0))
    seen: dict = {}

    def serve() -> None:
        sock.settimeout(10)
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    peer = tls.getpeercert()
                    seen["cn"] = dict(x[0] for x in peer["subject"])["commonName"]
                    tls.sendall(b"hello " + seen["cn"].encode())
            except (ssl.SSLError, OSError) as exc:
                seen["error"] = exc

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return sock, seen


def _client_ctx(tmp_path, name, cert, key):
    ctx = ssl.create_default_context(cafile=tmp_path / "ca.pem")
    if cert is not None:
        certs.write_certificate(tmp_path / f"{name}.pem", cert)
        certs.write_private_key(tmp_path / f"{name}.key", key)
        ctx.load_cert_chain(tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
    return ctx


def _connect(ctx, port):
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.recv(100)


def test_mutual_tls_handshake(tmp_path, pki):
    ca, ca_key, _, _, ckey, ccert = pki
    sock, seen = _tls_server(tmp_path, pki)
    port = sock.getsockname()[1]
    try:
        ctx = _client_ctx(tmp_path, "client", ccert, ckey)
        assert _connect(ctx, port) == b"hello sae-1"
        # no client certificate: the server refuses (TLS 1.3 reports it on the first read)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _connect(_client_ctx(tmp_path, "none", None, None), port)
        # a client certificate from another CA is refused too
        other_ca, other_key = certs.make_ca("Other CA")
        k = certs.generate_key()
        foreign = certs.issue_certificate(other_ca, other_key, "sae-x", k.public_key(), client=True, server=False)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _connect(_client_ctx(tmp_path, "foreign", foreign, k), port)
        # an expired client certificate from the right CA is refused
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        expired = certs.issue_certificate(
            ca,
            ca_key,
            "sae-old",
            k.public_key(),
            client=True,
            server=False,
            not_before=past,
            not_after=past + datetime.timedelta(days=1),
        )
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _connect(_client_ctx(tmp_path, "expired", expired, k), port)
    finally:
        sock.close()
    assert seen["cn"] == "sae-1"
