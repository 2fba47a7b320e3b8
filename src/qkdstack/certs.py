"""X.509 helpers shared by the node link (PKI bootstrap) and the key-delivery service (mutual TLS).

Everything is built on ``cryptography`` (its wheel bundles a recent OpenSSL, so ML-DSA works
even though the standard-library ``ssl`` links an older one). The functions make the small,
opinionated set of certificates a two-site QKD deployment needs:

* :func:`make_ca` - a self-signed operator CA (``BasicConstraints(ca=True)``, ``keyCertSign``/``cRLSign``);
* :func:`issue_certificate` - an end-entity certificate for TLS clients and/or servers or for signing
  round transcripts (``client``/``server``/``signing`` select KeyUsage and ExtendedKeyUsage);
* :func:`make_crl` - a certificate revocation list signed by the CA (:func:`revoked_entries` reads one back);
* :func:`renew_certificate` - the same certificate again with a new validity (``qkdstack pki renew``);
* :func:`make_csr` / :func:`sae_id_problem` - an SAE's certificate request and the rules of an SAE ID;
* :func:`write_private_key` / :func:`write_certificate` / loaders - PEM files; private keys are
  created with mode 0600 before any byte is written and moved into place atomically.

Key kinds (:func:`generate_key`): ``"ec-p256"`` (ECDSA P-256, the default: every TLS stack accepts
it), ``"ed25519"`` and ``"ml-dsa-65"`` (FIPS 204; certificates signed with it are for the
application-level PKI bootstrap, not for TLS, which OpenSSL 3.0 cannot negotiate with ML-DSA).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qkdstack.errors import ConfigError

PrivateKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, mldsa.MLDSA65PrivateKey]  # noqa: UP007
PublicKey = Union[ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, mldsa.MLDSA65PublicKey]  # noqa: UP007

KEY_KINDS = ("ec-p256", "ed25519", "ml-dsa-65")


def generate_key(kind: str = "ec-p256") -> PrivateKey:
    """A fresh private key of ``kind`` (one of :data:`KEY_KINDS`) from the OS CSPRNG."""
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ml-dsa-65":
        return mldsa.MLDSA65PrivateKey.generate()
    raise ConfigError(f"key_kind must be one of {', '.join(KEY_KINDS)}, not {kind!r}.")


def key_kind(key: PrivateKey | PublicKey) -> str:
    """The :data:`KEY_KINDS` name of a private or public key."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name != "secp256r1":
            raise ConfigError(f"key must be on P-256, not {key.curve.name}.")
        return "ec-p256"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, mldsa.MLDSA65PrivateKey | mldsa.MLDSA65PublicKey):
        return "ml-dsa-65"
    raise ConfigError(f"unsupported key type {type(key).__name__}.")


def _sign_hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    """The hash argument ``CertificateBuilder.sign`` wants: SHA-256 for ECDSA, None for EdDSA/ML-DSA."""
    return hashes.SHA256() if key_kind(key) == "ec-p256" else None


def _name(common_name: str) -> x509.Name:
    if not common_name:
        raise ConfigError("common_name must be a non-empty string.")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _serial() -> int:
    # RFC 5280 4.1.2.2: positive, at most 20 octets; 159 random bits keep it unpredictable.
    return secrets.randbits(159) | 1


def make_ca(common_name: str, key_kind: str = "ec-p256", valid_days: int = 3650) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed CA certificate and its key.

    The CA may sign certificates and CRLs only (``keyCertSign``, ``cRLSign``); ``path_length=0``
    forbids intermediate CAs below it, which a two-site deployment does not need.
    """
    if valid_days <= 0:
        raise ConfigError("valid_days must be positive.")
    key = generate_key(key_kind)
    name = _name(common_name)
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(key, _sign_hash(key)), key


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    common_name: str,
    public_key: PublicKey,
    *,
    client: bool,
    server: bool,
    signing: bool = False,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    valid_days: int = 365,
) -> x509.Certificate:
    """An end-entity certificate for ``public_key`` signed by the CA.

    ``client``/``server`` add the TLS ExtendedKeyUsages (``clientAuth``/``serverAuth``) and the
    KeyUsage TLS needs (``digitalSignature``, plus ``keyAgreement`` for ECDSA keys);
    ``signing`` marks a certificate for signing round transcripts (``digitalSignature`` +
    ``nonRepudiation`` with no TLS usages when ``client``/``server`` are both False).
    At least one of the three must be set. ``dns_names``/``ip_addresses`` go into the
    SubjectAlternativeName (TLS hostname checks use the SAN, not the CN). The validity defaults
    to now-5 min .. now+``valid_days``; give ``not_before``/``not_after`` (aware datetimes) to
    make, for instance, an expired certificate for a test.
    """
    if not (client or server or signing):
        raise ConfigError("issue_certificate needs at least one of client, server or signing.")
    now = _now()
    nb = not_before if not_before is not None else now - datetime.timedelta(minutes=5)
    na = not_after if not_after is not None else now + datetime.timedelta(days=valid_days)
    if na <= nb:
        raise ConfigError("not_after must be later than not_before.")
    eku = []
    if client:
        eku.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if server:
        eku.append(ExtendedKeyUsageOID.SERVER_AUTH)
    is_ec = key_kind(public_key) == "ec-p256"
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=signing,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=is_ec and (client or server),
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, _sign_hash(ca_key))


def make_crl(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    revoked_serials: Iterable[int] | Mapping[int, datetime.datetime],
    *,
    next_update_days: int = 30,
    last_update: datetime.datetime | None = None,
    next_update: datetime.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL signed by the CA that revokes ``revoked_serials``.

    A plain iterable of serials is revoked as of now; a mapping ``{serial: revocation date}`` keeps each
    entry's original date (a reissued CRL, :func:`revoked_entries`). The CRL is valid from
    ``last_update`` (default now-5 min) to ``next_update`` (default ``next_update_days`` after now);
    give both to make, for instance, an expired CRL for a test. A relying party refuses a CRL past its
    next update (``crl-invalid``), so it must be reissued before then (``qkdstack pki crl``).
    """
    now = _now()
    lu = last_update if last_update is not None else now - datetime.timedelta(minutes=5)
    nu = next_update if next_update is not None else now + datetime.timedelta(days=next_update_days)
    if nu <= lu:
        raise ConfigError("next_update must be later than last_update.")
    dates = revoked_serials if isinstance(revoked_serials, Mapping) else dict.fromkeys(revoked_serials, now)
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(lu).next_update(nu)
    for serial, when in sorted(dates.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca_key, _sign_hash(ca_key))


def revoked_entries(
    crls: Iterable[x509.CertificateRevocationList], ca_cert: x509.Certificate
) -> dict[int, datetime.datetime]:
    """``{serial: revocation date}`` of every CRL in ``crls`` that ``ca_cert`` issued and signed.

    Expired CRLs count (a revocation does not lapse with its list); a CRL with the CA's name but a
    bad signature is ignored, so nobody can slip a serial into, or out of, the next CRL with a forged one.
    """
    out: dict[int, datetime.datetime] = {}
    for crl in crls:
        if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
            continue
        for entry in crl:
            out.setdefault(entry.serial_number, entry.revocation_date_utc)
    return out


def is_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``ca_cert`` signed ``cert`` (names and signature; any key kind, ML-DSA-65 included)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def renew_certificate(
    old: x509.Certificate,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    *,
    public_key: PublicKey | None = None,
    valid_days: int = 365,
) -> x509.Certificate:
    """A new certificate like ``old``: same subject and extensions (usages, SAN), new serial and validity.

    The validity runs from now-5 min for ``valid_days`` days, but never past the CA's own end of
    validity (a chain is only as valid as its CA). ``public_key`` re-keys (default: ``old``'s key).
    The key identifiers are recomputed from the key and the CA. Raises :class:`ConfigError` if
    ``ca_cert`` did not issue ``old`` or is no longer valid.
    """
    if valid_days <= 0:
        raise ConfigError("valid_days must be positive.")
    if not is_issued_by(old, ca_cert):
        raise ConfigError(f"{ca_cert.subject.rfc4514_string()} did not issue {old.subject.rfc4514_string()}.")
    now = _now()
    if ca_cert.not_valid_after_utc <= now:
        raise ConfigError(f"the CA {ca_cert.subject.rfc4514_string()} expired on "
                          f"{ca_cert.not_valid_after_utc:%Y-%m-%d}; a new CA is needed.")
    key = public_key if public_key is not None else old.public_key()
    key_kind(key)  # type: ignore[arg-type]  # refuses unsupported key types
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca_cert.subject)
        .public_key(key)  # type: ignore[arg-type]
        .serial_number(_serial())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=valid_days), ca_cert.not_valid_after_utc))
    )
    for ext in old.extensions:
        if isinstance(ext.value, x509.SubjectKeyIdentifier | x509.AuthorityKeyIdentifier):
            continue
        builder = builder.add_extension(ext.value, critical=ext.critical)
    ski = x509.SubjectKeyIdentifier.from_public_key(key)  # type: ignore[arg-type]
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    builder = builder.add_extension(ski, critical=False).add_extension(aki, critical=False)
    return builder.sign(ca_key, _sign_hash(ca_key))


MAX_SAE_ID_LENGTH = 64
"""Longest SAE ID: a certificate's common name has at most 64 characters (RFC 5280, ub-common-name)."""


def sae_id_problem(sae_id: str) -> str | None:
    """Why ``sae_id`` cannot be an SAE ID, or None if it can.

    An SAE ID is a certificate's subject CN (at most 64 characters), a path segment of ETSI 014
    (no ``/``), a list entry of ``network.toml`` (no ``,``) and the identity of a SKIP TLS-PSK line
    ``SAE_ID:HEXKEY`` (no ``:``); printable, with no space at either end.
    """
    if not sae_id:
        return "it is empty"
    if len(sae_id) > MAX_SAE_ID_LENGTH:
        return f"it is longer than {MAX_SAE_ID_LENGTH} characters"
    if not sae_id.isprintable() or sae_id.strip() != sae_id or any(c in sae_id for c in ":/,"):
        return "an SAE ID is printable, has no space at either end and no ':', '/' or ','"
    return None


def make_csr(key: PrivateKey, common_name: str) -> x509.CertificateSigningRequest:
    """A PKCS#10 certificate signing request for ``key`` with subject CN ``common_name``."""
    return x509.CertificateSigningRequestBuilder().subject_name(_name(common_name)).sign(key, _sign_hash(key))


# ---------------------------------------------------------------------------------------------- files


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically; the file has ``mode`` before any byte is written.

    ``tempfile.mkstemp`` creates the temporary file 0600 with ``O_EXCL``; it is chmod-ed to ``mode``
    (still before the content), fsync-ed and renamed over ``path``, so a reader never sees a
    partial file and a secret never sits in a world-readable file, not even for a moment.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_private_key(path: str | os.PathLike[str], key: PrivateKey, password: bytes | None = None) -> None:
    """Write ``key`` as PKCS#8 PEM to ``path`` with mode 0600 (optionally encrypted with ``password``)."""
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    atomic_write(path, pem, 0o600)


def write_certificate(path: str | os.PathLike[str], cert: x509.Certificate | Sequence[x509.Certificate]) -> None:
    """Write one certificate or a chain (leaf first) as PEM to ``path`` (mode 0644)."""
    certs = [cert] if isinstance(cert, x509.Certificate) else list(cert)
    atomic_write(path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs), 0o644)


def write_crl(
    path: str | os.PathLike[str], crl: x509.CertificateRevocationList | Sequence[x509.CertificateRevocationList]
) -> None:
    """Write one CRL or several (e.g. the classical and the ML-DSA CA's) as PEM to ``path`` (mode 0644)."""
    crls = [crl] if isinstance(crl, x509.CertificateRevocationList) else list(crl)
    atomic_write(path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls), 0o644)


def load_private_key(path: str | os.PathLike[str], password: bytes | None = None) -> PrivateKey:
    """Load a PEM private key; refuses a key file readable by group or others."""
    p = Path(path)
    if p.stat().st_mode & 0o077:
        raise ConfigError(f"private key file {p} must not be readable by group or others (chmod 600).")
    key = serialization.load_pem_private_key(p.read_bytes(), password)
    key_kind(key)  # type: ignore[arg-type]  # rejects unsupported key types
    return key  # type: ignore[return-value]


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Load the first PEM certificate in ``path``."""
    return load_certificates(path)[0]


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Load every PEM certificate in ``path`` (a chain, leaf first)."""
    certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    if not certs:
        raise ConfigError(f"{path} holds no PEM certificate.")
    return certs


def load_crl(path: str | os.PathLike[str]) -> x509.CertificateRevocationList:
    """Load the first PEM CRL in ``path``."""
    return load_crls(path)[0]


def load_crls(path: str | os.PathLike[str]) -> list[x509.CertificateRevocationList]:
    """Load every PEM CRL in ``path`` (a bundle written by :func:`write_crl`)."""
    text = Path(path).read_bytes()
    marker = b"-----BEGIN X509 CRL-----"
    crls = [x509.load_pem_x509_crl(marker + part) for part in text.split(marker)[1:]]
    if not crls:
        raise ConfigError(f"{path} holds no PEM CRL.")
    return crls


def common_name(cert: x509.Certificate) -> str:
    """The subject common name of ``cert`` (the identity the stack uses: node name or SAE ID)."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise ConfigError("certificate has no subject common name.")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()
