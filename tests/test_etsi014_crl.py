"""ETSI 014 mutual TLS with a certificate revocation list: a revoked SAE certificate gets no key.

Real TLS on loopback: a site CA made by the test, two SAE certificates (one revoked in the CRL),
the CRL in PEM and in DER (``[kms] crl`` accepts both), and the configuration errors of a bad CRL.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from _kms_support import Sites, StoreFactory
from qkdstack import certs
from qkdstack.errors import ConfigError
from qkdstack.kms.etsi014 import TLSFiles, serve_etsi014, server_ssl_context

REFUSED = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, ssl.SSLError)


class CrlPKI:
    """Site A's CA, the KME's server certificate, SAE_A (to be revoked) and SAE_A2, and a foreign CA."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca, self.ca_key = certs.make_ca("site A CA")
        certs.write_certificate(root / "ca.pem", self.ca)
        self.other_ca, self.other_key = certs.make_ca("another CA")
        self.serials = {}
        for name, server in (("kme", True), ("SAE_A", False), ("SAE_A2", False)):
            key = certs.generate_key("ec-p256")
            cn = "KME_A" if server else name
            cert = certs.issue_certificate(
                self.ca, self.ca_key, cn, key.public_key(), client=not server, server=server,
                ip_addresses=["127.0.0.1"] if server else (),
            )
            certs.write_certificate(root / f"{name}.pem", cert)
            certs.write_private_key(root / f"{name}.key", key)
            self.serials[name] = cert.serial_number

    def crl_file(self, name: str, revoked: list[str], *, der: bool = False, signer=None) -> Path:
        ca, key = signer or (self.ca, self.ca_key)
        crl = certs.make_crl(ca, key, [self.serials[n] for n in revoked])
        path = self.root / name
        if der:
            path.write_bytes(crl.public_bytes(Encoding.DER))
        else:
            certs.write_crl(path, crl)
        return path

    def tls(self, crl: Path | None) -> TLSFiles:
        return TLSFiles(self.root / "kme.pem", self.root / "kme.key", self.root / "ca.pem", crl)

    def client(self, srv, name: str, tls12: bool = False) -> httpx.AsyncClient:
        ctx = ssl.create_default_context(cafile=str(self.root / "ca.pem"))
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.root / f"{name}.pem"), str(self.root / f"{name}.key"))
        return httpx.AsyncClient(base_url=srv.url, verify=ctx, timeout=10)


@pytest.fixture(scope="module")
def crl_pki(tmp_path_factory):
    return CrlPKI(tmp_path_factory.mktemp("crl-pki"))


@pytest.fixture
async def sites(tmp_path):
    factory = StoreFactory("sqlite", tmp_path)
    s = await Sites(factory).start()  # KME_A serves SAE_A and SAE_A2; KME_B serves SAE_B
    yield s
    await s.stop()
    factory.close_all()


@pytest.mark.parametrize(("der", "tls12"), [(False, False), (True, False), (False, True)],
                         ids=["pem", "der", "pem-tls1.2"])
async def test_revoked_sae_gets_no_key_others_do(sites, crl_pki, der, tls12):
    crl = crl_pki.crl_file(f"crl-{der}", ["SAE_A"], der=der)
    async with serve_etsi014(sites.a, "127.0.0.1", 0, crl_pki.tls(crl)) as srv:
        async with crl_pki.client(srv, "SAE_A", tls12) as revoked:
            with pytest.raises(REFUSED):
                await revoked.get("/api/v1/keys/SAE_B/enc_keys")
            with pytest.raises(REFUSED):
                await revoked.post("/api/v1/keys/SAE_B/enc_keys", json={})
        async with crl_pki.client(srv, "SAE_A2", tls12) as good:
            r = await good.get("/api/v1/keys/SAE_B/enc_keys")
            assert r.status_code == 200 and len(r.json()["keys"]) == 1


async def test_without_crl_the_same_certificate_is_served(sites, crl_pki):
    """The control: SAE_A's certificate itself is valid; only the CRL stops it."""
    async with serve_etsi014(sites.a, "127.0.0.1", 0, crl_pki.tls(None)) as srv, crl_pki.client(srv, "SAE_A") as c:
        assert (await c.get("/api/v1/keys/SAE_B/enc_keys")).status_code == 200


def test_bad_crl_files_are_config_errors_naming_the_field(crl_pki, tmp_path):
    garbage = tmp_path / "garbage.crl"
    garbage.write_bytes(b"this is not a CRL\n")
    empty = tmp_path / "empty.crl"
    empty.write_bytes(b"")
    now = datetime.datetime.now(datetime.UTC)
    old = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(crl_pki.ca.subject)
        .last_update(now - datetime.timedelta(days=40))
        .next_update(now - datetime.timedelta(days=10))
        .sign(crl_pki.ca_key, hashes.SHA256())
    )
    expired = tmp_path / "expired.crl"
    certs.write_crl(expired, old)
    cases = {
        tmp_path / "missing.crl": "does not exist",
        tmp_path: "does not exist or is not a file",
        garbage: "holds no certificate revocation list",
        empty: "holds no certificate revocation list",
        crl_pki.crl_file("foreign.crl", [], signer=(crl_pki.other_ca, crl_pki.other_key)): "not signed by a CA",
        expired: "has expired",
    }
    for path, problem in cases.items():
        with pytest.raises(ConfigError, match=r"^\[kms\] crl .*" + problem):
            server_ssl_context(crl_pki.tls(path))


def test_node_configuration_accepts_crl(tmp_path):
    from qkdstack.node.config import parse_config

    site = {"name": "A", "role": "receiver", "peer": "B"}
    auth = {"psk_file": "psk.json"}
    cfg = parse_config({"site": site, "auth": auth, "kms": {"crl": "tls/crl.pem"}},
                       tmp_path / "node.toml")
    assert cfg.kms.crl == "tls/crl.pem"
    assert cfg.resolve(cfg.kms.crl) == tmp_path / "tls" / "crl.pem"
    with pytest.raises(ConfigError, match=r"\[kms\] crl must be a string"):
        parse_config({"site": site, "auth": auth, "kms": {"crl": 3}}, tmp_path / "n.toml")


def test_crl_next_update_in_the_future_is_loaded(crl_pki):
    crl = crl_pki.crl_file("fresh.crl", ["SAE_A"])
    ctx = server_ssl_context(crl_pki.tls(crl))
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert ctx.cert_store_stats()["crl"] == 1
    assert datetime.datetime.now(datetime.UTC) < certs.load_crl(crl).next_update_utc
