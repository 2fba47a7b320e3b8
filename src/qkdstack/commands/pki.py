"""``qkdstack pki``: keep a deployment's certificates and revocation lists valid, and certify new SAEs.

``qkdstack init --bootstrap pki`` makes the operator's two roots (classical Ed25519 and ML-DSA-65,
``DIR/operator/pki/``), each site's node certificates (``DIR/SITE/pki/``), the CRLs the sites read
(``[auth] crls``), and per site a site CA with the KME's server certificate and the SAEs' client
certificates (``DIR/SITE/tls/``, ``DIR/SITE/sae/``). All of them expire (docs/authentication.md,
"Lifetimes and renewal"); these actions renew them without a new deployment:

``pki crl --deployment DIR [--revoke SERIAL|CERT ...]``
    reissue both operator CRLs with a new validity window, keeping every revoked entry (with its
    date) and adding the ``--revoke`` ones; write them to ``DIR/operator/pki/crls.pem`` and to every
    pki site's ``[auth] crls``. A node reads its CRLs at every bootstrap round: no restart needed.
``pki renew --deployment DIR --site SITE [--new-keys]``
    reissue the site's node certificates (both chains), its KME server certificate (``[kms] tls_cert``,
    from the site CA), its KME-to-KME certificate in a network deployment (``[network] tls_cert``, from
    ``DIR/network-ca``) and the SAE certificates in ``SITE/sae/`` that the site CA issued: same subject
    and extensions, new serial and validity. Keys are kept unless ``--new-keys`` (node and KME keys only:
    an SAE's key is the SAE's).
``pki sign-sae --site-dir DIR/SITE --csr FILE --out FILE [--register]``
    sign an SAE's PKCS#10 request with the site CA: a TLS client certificate whose subject CN, the SAE
    ID, is taken from the request (only the CN and the key are used; requested extensions are not).
``pki new-sae --site-dir DIR/SITE --sae ID [--register]``
    make the SAE's key, request and certificate in ``SITE/sae/`` (``ID.key`` 0600, ``ID.csr``, ``ID.pem``).

``pki status --deployment DIR``
    list every certificate and CRL with the end of its validity; exit code 1 if one has expired or ends
    within ``--warn-days`` (a check for a timer).

``--register`` adds the SAE ID to ``[kms] sae_ids`` of ``site.toml``; the edit is checked by parsing the
new file, which must equal the old one with the one ID added, else nothing is written. Every bad input is
one sentence naming the flag (exit code 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qkdstack.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

    from qkdstack.certs import PrivateKey
    from qkdstack.node.site_config import SiteConfig

CRL_DAYS = 30
"""Default validity of a CRL (days to its next update): what ``init`` writes and ``pki crl`` reissues."""
LEAF_DAYS = 365
"""Default validity of a renewed node, KME or SAE certificate (the same as ``init``'s)."""
MAX_DAYS = 3650
"""Longest validity the actions accept (the CAs themselves last 3650 days; a leaf never outlives its CA)."""

WARN_DAYS = 7
"""``pki status`` flags what ends within this many days."""

ROOT_LABELS = ("classical", "mldsa")
"""The operator roots in ``DIR/operator/pki/``: ``LABEL-root.pem`` and ``LABEL-root.key``."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pki",
        help="reissue CRLs and certificates of a deployment, sign SAE certificate requests",
        description="Keep the certificates and revocation lists of a deployment written by `qkdstack init` valid "
        "(docs/authentication.md, 'Lifetimes and renewal'), and certify new key consumers (docs/kms.md).",
    )
    parser.set_defaults(func=lambda _args: _usage(parser))
    sub = parser.add_subparsers(dest="pki_command", metavar="ACTION")

    crl = sub.add_parser(
        "crl", help="reissue the operator CAs' CRLs (new validity, revoked entries kept) and install them at the sites",
        description="Reissue the CRLs of both operator roots (classical and ML-DSA-65) with a new next-update "
        "time, keeping every revoked serial and adding the --revoke ones, and write them to DIR/operator/pki/"
        "crls.pem and to the [auth] crls file of every site with bootstrap = \"pki\". Nodes read the file at "
        "each bootstrap round.",
    )
    crl.add_argument("--deployment", required=True, metavar="DIR", help="the deployment folder written by init")
    crl.add_argument("--revoke", action="append", default=[], metavar="SERIAL|CERT",
                     help="revoke a certificate: its serial number (decimal or 0x-hex; goes on both CRLs) or a PEM "
                     "file of it (on the CRL of the root that issued it); repeatable")
    crl.add_argument("--days", type=int, default=CRL_DAYS,
                     help=f"days until the CRLs' next update (default {CRL_DAYS}; reissue before then)")
    crl.set_defaults(func=run_crl)

    renew = sub.add_parser(
        "renew", help="reissue a site's node, KME and SAE certificates with a new validity",
        description="Reissue the site's node certificates (classical and ML-DSA-65, from the operator roots), "
        "its KME server certificate (from the site CA), its KME-to-KME certificate (network deployments, from "
        "DIR/network-ca) and the SAE certificates in SITE/sae/ issued by the site CA: same subject and "
        "extensions, new serial and validity. Restart the node to serve the new KME certificate.",
    )
    renew.add_argument("--deployment", required=True, metavar="DIR", help="the deployment folder written by init")
    renew.add_argument("--site", required=True, help="the site (a folder DIR/SITE with site.toml)")
    renew.add_argument("--days", type=int, default=LEAF_DAYS,
                       help=f"validity of the new certificates in days (default {LEAF_DAYS}; never past the CA's)")
    renew.add_argument("--new-keys", action="store_true",
                       help="also make new node and KME keys (default: keep them; SAE keys are always kept)")
    renew.set_defaults(func=run_renew)

    sign = sub.add_parser(
        "sign-sae", help="sign an SAE's certificate request with the site CA",
        description="Issue a TLS client certificate for an SAE from its PKCS#10 request (PEM or DER), signed by "
        "the site CA ([kms] ca_cert and the .key beside it). The SAE ID is the request's subject CN; only the "
        "CN and the public key (ECDSA P-256 or Ed25519) are taken from the request.",
    )
    sign.add_argument("--site-dir", required=True, metavar="DIR", help="the site's folder (with site.toml)")
    sign.add_argument("--csr", required=True, metavar="FILE", help="the SAE's certificate signing request")
    sign.add_argument("--out", required=True, metavar="FILE", help="where to write the certificate (PEM)")
    sign.add_argument("--days", type=int, default=LEAF_DAYS,
                      help=f"validity in days (default {LEAF_DAYS}; never past the site CA's)")
    sign.add_argument("--register", action="store_true", help="add the SAE ID to [kms] sae_ids of site.toml")
    sign.set_defaults(func=run_sign_sae)

    new = sub.add_parser(
        "new-sae", help="make an SAE's key, request and certificate at a site",
        description="Make an ECDSA P-256 key (0600), a certificate request and a client certificate from the site "
        "CA for a new SAE: OUT_DIR/ID.key, ID.csr, ID.pem (OUT_DIR defaults to the site's sae/ folder).",
    )
    new.add_argument("--site-dir", required=True, metavar="DIR", help="the site's folder (with site.toml)")
    new.add_argument("--sae", required=True, metavar="ID", help="the SAE ID (the certificate's subject CN)")
    new.add_argument("--out-dir", metavar="DIR", help="where to write the files (default: DIR/sae)")
    new.add_argument("--days", type=int, default=LEAF_DAYS,
                     help=f"validity in days (default {LEAF_DAYS}; never past the site CA's)")
    new.add_argument("--register", action="store_true", help="add the SAE ID to [kms] sae_ids of site.toml")
    new.set_defaults(func=run_new_sae)

    status = sub.add_parser(
        "status", help="list every certificate and CRL of a deployment with the end of its validity",
        description="List the operator roots, CRLs, node, KME, SAE and network certificates of a deployment with "
        "the end of their validity (a CRL's next update) and the command that renews each. Exit code 1 when one "
        "has expired or ends within --warn-days.",
    )
    status.add_argument("--deployment", required=True, metavar="DIR", help="the deployment folder written by init")
    status.add_argument("--warn-days", type=int, default=WARN_DAYS,
                        help=f"flag what ends within this many days (default {WARN_DAYS})")
    status.set_defaults(func=run_status)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


# ---------------------------------------------------------------------------------------------- inputs


def _days(value: int) -> int:
    if not 1 <= value <= MAX_DAYS:
        raise ConfigError(f"--days must lie in 1..{MAX_DAYS}, got {value}")
    return value


def _folder(flag: str, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{flag} {value} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{flag} {value} is not a folder")
    return path


def _site_config(flag: str, site_dir: Path) -> SiteConfig:
    """The site's configuration (either format), read without checking the files it names."""
    from qkdstack.node.site_config import load_site_config

    path = site_dir / "site.toml"
    if not path.is_file():
        raise ConfigError(f"{flag} {site_dir} holds no site.toml (a site folder written by qkdstack init)")
    try:
        return load_site_config(path, check_files=False)
    except ConfigError as exc:
        raise ConfigError(f"{flag} {site_dir}: {exc}") from None


def _read_pem_certs(flag: str, path: Path) -> list[x509.Certificate]:
    from qkdstack import certs

    try:
        return certs.load_certificates(path)
    except FileNotFoundError:
        raise ConfigError(f"{flag}: {path} does not exist") from None
    except (ValueError, IsADirectoryError):
        raise ConfigError(f"{flag}: {path} holds no PEM certificate") from None


def _read_key(flag: str, path: Path) -> PrivateKey:
    from qkdstack import certs

    try:
        return certs.load_private_key(path)
    except FileNotFoundError:
        raise ConfigError(f"{flag}: the key {path} does not exist") from None
    except ConfigError as exc:  # group/world-readable, unsupported kind
        raise ConfigError(f"{flag}: {exc}") from None
    except (ValueError, TypeError, IsADirectoryError):  # never echo the bytes
        raise ConfigError(f"{flag}: {path} holds no unencrypted PEM private key") from None


@dataclass(frozen=True)
class _CA:
    """A CA certificate with its key, and where they came from (for messages)."""

    cert: x509.Certificate
    key: PrivateKey
    path: Path


def _ca(flag: str, cert_path: Path, key_path: Path) -> _CA:
    cert = _read_pem_certs(flag, cert_path)[0]
    key = _read_key(flag, key_path)
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{flag}: the key {key_path} is not the key of the CA certificate {cert_path}")
    return _CA(cert, key, cert_path)


def _operator_roots(deployment: Path) -> dict[str, _CA]:
    folder = deployment / "operator" / "pki"
    if not folder.is_dir():
        raise ConfigError(f"--deployment {deployment} has no operator/pki/ folder (the operator CAs that "
                          "`qkdstack init --bootstrap pki` writes)")
    return {label: _ca("--deployment", folder / f"{label}-root.pem", folder / f"{label}-root.key")
            for label in ROOT_LABELS}


def _site_ca(flag: str, site: SiteConfig) -> _CA:
    """The site CA of the ETSI 014 / SKIP server: ``[kms] ca_cert`` and the ``.key`` beside it."""
    kms = site.first.kms
    if not kms.ca_cert:
        raise ConfigError(f"{flag} {site.path.parent}: site.toml has no [kms] ca_cert (the site CA)")
    cert_path = site.first.resolve(kms.ca_cert)
    key_path = cert_path.with_suffix(".key")
    if not key_path.exists():
        raise ConfigError(f"{flag} {site.path.parent}: the site CA's key {key_path} is not there (run this where "
                          "the site CA's key is kept)")
    return _ca(flag, cert_path, key_path)


def _sites(deployment: Path) -> list[SiteConfig]:
    """The sites of the deployment (``DIR/*/site.toml``), in name order."""
    return [_site_config("--deployment", path.parent) for path in sorted(deployment.glob("*/site.toml"))]


def _pki_paths(site: SiteConfig, field: str) -> list[Path]:
    """The distinct files ``[auth] FIELD`` names across the site's links with ``bootstrap = "pki"``."""
    out: list[Path] = []
    for link in site.links:
        if link.auth.bootstrap == "pki":
            path = link.resolve(getattr(link.auth, field))
            if path not in out:
                out.append(path)
    return out


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _date(when: datetime.datetime) -> str:
    return f"{when:%Y-%m-%d %H:%M} UTC"


# ---------------------------------------------------------------------------------------------- pki crl


_SERIAL = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)")


def _revocations(item: str, roots: dict[str, _CA]) -> dict[str, list[int]]:
    """``--revoke`` ``item`` as serials per root label."""
    from qkdstack import certs

    if _SERIAL.fullmatch(item):
        serial = int(item, 0) if item.lower().startswith("0x") else int(item)
        if not 0 < serial < 2**160:
            raise ConfigError(f"--revoke {item}: a serial number is positive and at most 20 octets (RFC 5280)")
        return {label: [serial] for label in roots}
    path = Path(item).expanduser()
    if not path.is_file():
        raise ConfigError(f"--revoke {item} is neither a serial number nor an existing certificate file")
    try:
        found = certs.load_certificates(path)
    except ValueError:
        raise ConfigError(f"--revoke {item} holds no PEM certificate") from None
    out: dict[str, list[int]] = {label: [] for label in roots}
    for cert in found:
        if any(cert == ca.cert for ca in roots.values()):
            continue  # a chain file that includes the root: the root itself is not revoked
        issuers = [label for label, ca in roots.items() if certs.is_issued_by(cert, ca.cert)]
        if not issuers:
            raise ConfigError(f"--revoke {item}: the certificate of {cert.subject.rfc4514_string()} was not issued by "
                              "an operator root of this deployment")
        out[issuers[0]].append(cert.serial_number)
    if not any(out.values()):
        raise ConfigError(f"--revoke {item} holds only operator roots; name a node certificate")
    return out


def _existing_crls(flag: str, paths: list[Path]) -> list[x509.CertificateRevocationList]:
    from qkdstack import certs

    out = []
    for path in paths:
        if not path.exists():
            continue
        try:
            out += certs.load_crls(path)
        except (ValueError, OSError):
            # Overwriting a CRL file we cannot read could drop revocations recorded only there.
            raise ConfigError(f"{flag}: {path} exists but holds no readable PEM CRL; repair or remove it, then run "
                              "again") from None
    return out


def run_crl(args: argparse.Namespace) -> int:
    from qkdstack import certs

    days = _days(args.days)
    deployment = _folder("--deployment", args.deployment).resolve()
    roots = _operator_roots(deployment)
    sites = _sites(deployment)
    targets = [(site.name, path) for site in sites for path in _pki_paths(site, "crls")]
    operator_copy = deployment / "operator" / "pki" / "crls.pem"
    additions = [_revocations(item, roots) for item in args.revoke]
    previous = _existing_crls("--deployment", [operator_copy, *(path for _, path in targets)])
    crls = []
    for label, ca in roots.items():
        entries = certs.revoked_entries(previous, ca.cert)
        now = datetime.datetime.now(datetime.UTC)
        for addition in additions:
            for serial in addition[label]:
                entries.setdefault(serial, now)
        crls.append(certs.make_crl(ca.cert, ca.key, entries, next_update_days=days))
    certs.write_crl(operator_copy, crls)
    for _, path in targets:
        certs.write_crl(path, crls)
    next_update = min(c.next_update_utc for c in crls if c.next_update_utc is not None)
    counts = ", ".join(f"{label} {len(list(crl))}" for label, crl in zip(roots, crls, strict=True))
    print(f"reissued the operator CRLs (revoked: {counts}); next update due {_date(next_update)}")
    print(f"  {_rel(operator_copy, deployment)} (operator copy)")
    for name, path in targets:
        print(f"  {_rel(path, deployment)} (site {name}, [auth] crls)")
    if not targets:
        print("  no site of this deployment uses bootstrap = \"pki\"; copy the operator copy where sites read CRLs")
    print(f"run `qkdstack pki crl --deployment {args.deployment}` again before {_date(next_update)}: an expired CRL "
          "makes every PKI bootstrap fail (crl-invalid)")
    return 0


# ---------------------------------------------------------------------------------------------- pki renew


def _renew_file(flag: str, cert_path: Path, key_path: Path | None, ca: _CA, days: int, new_key: bool,
                base: Path, what: str) -> str:
    """Renew the first certificate of ``cert_path`` (the rest of the chain is kept); a line for the report."""
    from qkdstack import certs

    chain = _read_pem_certs(flag, cert_path)
    leaf = chain[0]
    if not certs.is_issued_by(leaf, ca.cert):
        raise ConfigError(f"{flag}: {cert_path} was not issued by {_rel(ca.path, base)} "
                          f"({ca.cert.subject.rfc4514_string()})")
    if key_path is not None and not new_key:
        key = _read_key(flag, key_path)
        if key.public_key() != leaf.public_key():
            raise ConfigError(f"{flag}: the key {key_path} does not match the certificate {cert_path}")
    fresh = certs.generate_key(certs.key_kind(leaf.public_key())) if new_key and key_path is not None else None
    try:
        cert = certs.renew_certificate(leaf, ca.cert, ca.key, valid_days=days,
                                       public_key=None if fresh is None else fresh.public_key())
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    if fresh is not None and key_path is not None:
        certs.write_private_key(key_path, fresh)
    certs.write_certificate(cert_path, [cert, *chain[1:]])
    return (f"  {_rel(cert_path, base)} ({what}, CN {certs.common_name(cert)}{', new key' if fresh else ''}) "
            f"valid until {_date(cert.not_valid_after_utc)}")


def run_renew(args: argparse.Namespace) -> int:
    from qkdstack import certs

    days = _days(args.days)
    deployment = _folder("--deployment", args.deployment).resolve()
    if not args.site or Path(args.site).name != args.site:
        raise ConfigError(f"--site must be a site name (a folder of --deployment), got {args.site!r}")
    site_dir = deployment / args.site
    if not (site_dir / "site.toml").is_file():
        names = ", ".join(p.parent.name for p in sorted(deployment.glob("*/site.toml"))) or "none"
        raise ConfigError(f"--site {args.site}: {deployment} has no site {args.site} with a site.toml "
                          f"(sites: {names})")
    site = _site_config("--site", site_dir)
    lines: list[str] = []
    # Node certificates, from the operator roots: the root that issued each decides which one renews it.
    pki_links = [link for link in site.links if link.auth.bootstrap == "pki"]
    if pki_links:
        roots = _operator_roots(deployment)
        crl_files = [deployment / "operator" / "pki" / "crls.pem", *_pki_paths(site, "crls")]
        revoked = {serial for ca in roots.values()
                   for serial in certs.revoked_entries(_existing_crls("--site", crl_files), ca.cert)}
        done: set[Path] = set()
        for link in pki_links:
            for cert_field, key_field in (("classical_cert", "classical_key"), ("pq_cert", "pq_key")):
                cert_path = link.resolve(getattr(link.auth, cert_field))
                if cert_path in done:
                    continue
                done.add(cert_path)
                leaf = _read_pem_certs("--site", cert_path)[0]
                issuers = [ca for ca in roots.values() if certs.is_issued_by(leaf, ca.cert)]
                if not issuers:
                    raise ConfigError(f"--site {args.site}: {cert_path} ([auth] {cert_field}) was not issued by an "
                                      "operator root of this deployment")
                if leaf.serial_number in revoked and not args.new_keys:
                    # Renewing gives a new serial: without new keys it would quietly reinstate a revoked key.
                    raise ConfigError(f"--site {args.site}: {cert_path} ([auth] {cert_field}) is revoked; a revoked "
                                      "node key is not renewed (add --new-keys to certify fresh keys instead)")
                lines.append(_renew_file("--site", cert_path, link.resolve(getattr(link.auth, key_field)), issuers[0],
                                         days, args.new_keys, deployment, f"node, [auth] {cert_field}"))
    # The KME's server certificate and the SAE certificates, from the site CA.
    kms = site.first.kms
    if kms.tls_cert:
        site_ca = _site_ca("--site", site)
        lines.append(_renew_file("--site", site.first.resolve(kms.tls_cert), site.first.resolve(kms.tls_key), site_ca,
                                 days, args.new_keys, deployment, "KME server, [kms] tls_cert"))
        sae_dir = site_dir / "sae"
        for pem in sorted(sae_dir.glob("*.pem")) if sae_dir.is_dir() else []:
            leaf = _read_pem_certs("--site", pem)[0]
            if certs.is_issued_by(leaf, site_ca.cert):
                lines.append(_renew_file("--site", pem, None, site_ca, days, False, deployment, "SAE client"))
    # The KME-to-KME certificate of a network deployment, from the network CA.
    if site.network is not None:
        ca_dir = deployment / "network-ca"
        if (ca_dir / "ca.key").exists():
            network_ca = _ca("--deployment", ca_dir / "ca.pem", ca_dir / "ca.key")
            lines.append(_renew_file("--site", site.resolve(site.network.tls_cert),
                                     site.resolve(site.network.tls_key), network_ca, days, args.new_keys, deployment,
                                     "KME-to-KME, [network] tls_cert"))
        else:
            lines.append(f"  {_rel(site.resolve(site.network.tls_cert), deployment)} not renewed: the network CA's key "
                         f"({_rel(ca_dir / 'ca.key', deployment)}) is not in this deployment")
    if not lines:
        raise ConfigError(f"--site {args.site}: the site has neither PKI bootstrap certificates nor a KME certificate "
                          "to renew")
    print(f"renewed the certificates of site {site.name}:")
    print("\n".join(lines))
    print("the node reads its bootstrap certificates at each bootstrap round; restart it to serve the renewed KME "
          "certificates")
    return 0


# ---------------------------------------------------------------------------------------------- SAEs


def _load_csr(flag: str, value: str) -> x509.CertificateSigningRequest:
    from cryptography import x509

    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{flag} {value} does not exist")
    if not path.is_file():
        raise ConfigError(f"{flag} {value} is not a file")
    data = path.read_bytes()
    try:
        if b"-----BEGIN CERTIFICATE REQUEST-----" in data or b"-----BEGIN NEW CERTIFICATE REQUEST-----" in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        raise ConfigError(f"{flag} {value} holds no certificate signing request (PKCS#10, PEM or DER)") from None


def _sae_of_csr(flag: str, value: str, csr: x509.CertificateSigningRequest) -> str:
    """The SAE ID of a request, after checking its signature, its CN and its key."""
    from cryptography.x509.oid import NameOID

    from qkdstack import certs

    try:
        signed = csr.is_signature_valid
    except Exception:  # an algorithm cryptography cannot verify: not a request we can trust
        signed = False
    if not signed:
        raise ConfigError(f"{flag} {value}: the request's signature does not verify (altered, or not signed by its "
                          "key)")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ConfigError(f"{flag} {value}: the request's subject must hold exactly one common name (the SAE ID), "
                          f"it holds {len(names)}")
    cn = names[0].value if isinstance(names[0].value, str) else names[0].value.decode(errors="replace")
    problem = certs.sae_id_problem(cn)
    if problem:
        raise ConfigError(f"{flag} {value}: the subject CN {cn!r} is not a valid SAE ID ({problem})")
    try:
        kind = certs.key_kind(csr.public_key())  # type: ignore[arg-type]
    except (ConfigError, TypeError):
        pub = csr.public_key()
        curve = getattr(pub, "curve", None)
        kind = f"ECDSA {curve.name}" if curve is not None else type(pub).__name__.removesuffix("PublicKey")
    if kind not in ("ec-p256", "ed25519"):
        raise ConfigError(f"{flag} {value}: the request's key is {kind}; an SAE's TLS key must be ECDSA P-256 or "
                          "Ed25519")
    return cn


def _out_file(flag: str, value: str, sae_id: str) -> Path:
    """Where to write SAE ``sae_id``'s certificate: a new file, or one that holds a certificate of that SAE."""
    from cryptography import x509

    from qkdstack import certs

    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {value} is a folder; name the certificate file to write")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {value}: the folder {path.parent} does not exist")
    if path.exists():  # a renewal replaces the SAE's old certificate, and nothing else (a CA, a key)
        try:
            old = x509.load_pem_x509_certificates(path.read_bytes())
            same = len(old) == 1 and certs.common_name(old[0]) == sae_id
        except (ValueError, ConfigError, OSError):
            same = False
        if not same:
            raise ConfigError(f"{flag} {value} exists and is not a certificate of SAE {sae_id}; choose a new file")
    return path


def _toml_strings(values: list[str]) -> str:
    # A JSON string is a TOML basic string (same escapes); _register re-parses what it writes anyway.
    return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in values) + "]"


def _register(config_path: Path, sae_id: str) -> None:
    """Add ``sae_id`` to ``[kms] sae_ids`` of ``config_path``, or raise without writing anything.

    Only the ``sae_ids`` line of ``[kms]`` changes (or one is added under the header); the new text is
    parsed and must equal the old configuration with the one ID appended.
    """
    from qkdstack import certs

    text = config_path.read_text()
    before = tomllib.loads(text)
    kms = before.get("kms")
    if not isinstance(kms, dict):
        raise ConfigError(f"--register: {config_path} has no [kms] section; add the SAE by hand")
    ids = list(kms.get("sae_ids", []))
    lines = text.splitlines(keepends=True)
    header = next((i for i, line in enumerate(lines) if line.strip() == "[kms]"), None)
    if header is None:
        raise ConfigError(f"--register: {config_path} has no [kms] header line; add the SAE by hand")
    end = next((i for i in range(header + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    found = [i for i in range(header + 1, end) if re.match(r"\s*sae_ids\s*=", lines[i])]
    new_line = f"sae_ids = {_toml_strings([*ids, sae_id])}\n"
    if len(found) > 1:
        raise ConfigError(f"--register: {config_path} sets [kms] sae_ids more than once; add the SAE by hand")
    if found:
        lines[found[0]] = new_line
    else:
        lines.insert(header + 1, new_line)
    new_text = "".join(lines)
    expected = {**before, "kms": {**kms, "sae_ids": [*ids, sae_id]}}
    try:
        after = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        after = None
    if after != expected:  # e.g. a sae_ids list spread over several lines
        raise ConfigError(f"--register: {config_path} cannot be edited safely (is [kms] sae_ids on one line?); "
                          f"add the SAE by hand: {new_line.strip()}")
    certs.atomic_write(config_path, new_text.encode(), config_path.stat().st_mode & 0o777)


def _sign(site_dir: Path, site: SiteConfig, csr: x509.CertificateSigningRequest, sae_id: str, out: Path,
          days: int, register: bool) -> None:
    from qkdstack import certs

    ca = _site_ca("--site-dir", site)
    try:
        cert = certs.issue_certificate(ca.cert, ca.key, sae_id, csr.public_key(),  # type: ignore[arg-type]
                                       client=True, server=False,
                                       not_after=min(datetime.datetime.now(datetime.UTC)
                                                     + datetime.timedelta(days=days), ca.cert.not_valid_after_utc))
    except ConfigError as exc:  # the site CA has expired
        raise ConfigError(f"--site-dir {site_dir}: {exc}") from None
    certs.write_certificate(out, cert)
    print(f"wrote {out}: client certificate for SAE {sae_id} from the CA of site {site.name} "
          f"({ca.cert.subject.rfc4514_string()}), valid until {_date(cert.not_valid_after_utc)}")
    kms = site.first.kms
    config_path = site.path
    if sae_id in kms.sae_ids:
        print(f"{sae_id} is already in [kms] sae_ids of {config_path}")
    elif register:
        _register(config_path, sae_id)
        print(f"added {sae_id} to [kms] sae_ids of {config_path}; restart the node to admit it")
    else:
        print(f"to admit it, set in [kms] of {config_path} (then restart the node), or run again with --register:")
        print(f"sae_ids = {_toml_strings([*kms.sae_ids, sae_id])}")
    if site.multi_link:
        print(f"this site is in a network: also list {sae_id} in the site's `sae` of network.toml at every site "
              "(docs/network.md)")


def run_sign_sae(args: argparse.Namespace) -> int:
    days = _days(args.days)
    site_dir = _folder("--site-dir", args.site_dir)
    site = _site_config("--site-dir", site_dir)
    csr = _load_csr("--csr", args.csr)
    sae_id = _sae_of_csr("--csr", args.csr, csr)
    out = _out_file("--out", args.out, sae_id)
    _sign(site_dir, site, csr, sae_id, out, days, args.register)
    return 0


def run_new_sae(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from qkdstack import certs

    days = _days(args.days)
    site_dir = _folder("--site-dir", args.site_dir)
    problem = certs.sae_id_problem(args.sae)
    if problem:
        raise ConfigError(f"--sae {args.sae!r} is not a valid SAE ID ({problem})")
    site = _site_config("--site-dir", site_dir)
    _site_ca("--site-dir", site)  # before any file is written
    if args.out_dir:
        out_dir = Path(args.out_dir).expanduser()
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--out-dir {args.out_dir} is not a folder")
    else:
        out_dir = site_dir / "sae"
    key_path, csr_path, cert_path = (out_dir / f"{args.sae}{ext}" for ext in (".key", ".csr", ".pem"))
    if key_path.exists() or cert_path.exists():
        raise ConfigError(f"--sae {args.sae}: {key_path if key_path.exists() else cert_path} already exists; choose "
                          "another ID, or renew its certificate with `qkdstack pki sign-sae`")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = certs.generate_key("ec-p256")
    certs.write_private_key(key_path, key)
    csr = certs.make_csr(key, args.sae)
    certs.atomic_write(csr_path, csr.public_bytes(serialization.Encoding.PEM), 0o644)
    print(f"wrote {key_path} (0600) and {csr_path}")
    _sign(site_dir, site, csr, args.sae, cert_path, days, args.register)
    return 0


# ---------------------------------------------------------------------------------------------- pki status


def _status_rows(deployment: Path) -> list[tuple[datetime.datetime, Path, str, str]]:
    """(end of validity, file, what, renewal command) of every certificate and CRL of the deployment."""
    from cryptography import x509

    from qkdstack import certs

    rows: list[tuple[datetime.datetime, Path, str, str]] = []

    def add(path: Path, what: str, how: str) -> None:
        if not path.is_file():
            return
        data = path.read_bytes()
        if b"-----BEGIN X509 CRL-----" in data:
            for crl in certs.load_crls(path):
                if crl.next_update_utc is not None:
                    rows.append((crl.next_update_utc, path, f"{what}, {crl.issuer.rfc4514_string()}", how))
            return
        try:
            cert = x509.load_pem_x509_certificates(data)[0]
        except (ValueError, IndexError):
            rows.append((datetime.datetime.min.replace(tzinfo=datetime.UTC), path, f"{what}: no PEM certificate", how))
            return
        rows.append((cert.not_valid_after_utc, path, f"{what}, {cert.subject.rfc4514_string()}", how))

    d = f"--deployment {deployment}"
    operator = deployment / "operator" / "pki"
    for label in ROOT_LABELS:
        add(operator / f"{label}-root.pem", f"operator {label} root", "a new deployment")
    add(operator / "crls.pem", "operator CRL (copy)", f"qkdstack pki crl {d}")
    add(deployment / "network-ca" / "ca.pem", "network CA", "a new deployment")
    for site in _sites(deployment):
        renew = f"qkdstack pki renew {d} --site {site.path.parent.name}"
        for path in _pki_paths(site, "crls"):
            add(path, f"site {site.name} CRL", f"qkdstack pki crl {d}")
        for field in ("classical_cert", "pq_cert"):
            for path in _pki_paths(site, field):
                add(path, f"site {site.name} node", renew)
        kms = site.first.kms
        if kms.ca_cert:
            add(site.first.resolve(kms.ca_cert), f"site {site.name} CA", "a new site CA (not automated)")
        if kms.tls_cert:
            add(site.first.resolve(kms.tls_cert), f"site {site.name} KME server", renew)
        for pem in sorted((site.path.parent / "sae").glob("*.pem")):
            add(pem, f"site {site.name} SAE", renew)
        if site.network is not None:
            add(site.resolve(site.network.tls_cert), f"site {site.name} KME-to-KME", renew)
    return rows


def run_status(args: argparse.Namespace) -> int:
    if not 0 <= args.warn_days <= MAX_DAYS:
        raise ConfigError(f"--warn-days must lie in 0..{MAX_DAYS}, got {args.warn_days}")
    deployment = _folder("--deployment", args.deployment).resolve()
    rows = _status_rows(deployment)
    if not rows:
        raise ConfigError(f"--deployment {args.deployment} holds no certificate or CRL of a qkdstack deployment")
    now = datetime.datetime.now(datetime.UTC)
    soon = now + datetime.timedelta(days=args.warn_days)
    flagged = 0
    width = max(len(_rel(path, deployment)) for _, path, _, _ in rows)
    for end, path, what, how in sorted(rows, key=lambda r: (r[0], str(r[1]))):
        mark = "EXPIRED" if end <= now else "ends soon" if end <= soon else ""
        flagged += bool(mark)
        days = (end - now).days if end > now else 0
        print(f"{_date(end)} {days:>5} d  {_rel(path, deployment):<{width}}  {what}"
              + (f"  [{mark}: {how}]" if mark else ""))
    if flagged:
        print(f"{flagged} of {len(rows)} expired or end within {args.warn_days} days")
        return 1
    print(f"all {len(rows)} valid for more than {args.warn_days} days")
    return 0
