"""PKI bootstrap: dual classical + ML-DSA-65 signatures on the first round's transcript.

Each node holds two certificates issued by the operator's CAs for the same subject common name
(the node name): a *classical* one (Ed25519 or ECDSA P-256 key, chaining to a classical root) and a
*post-quantum* one (ML-DSA-65 key, chaining to an ML-DSA-65 root, so that the whole chain is
post-quantum). The first round's transcript digest (:meth:`~qkdstack.auth.wegman_carter.TranscriptMac.digest`)
is signed with both keys; the peer accepts only if *both* signatures and *both* chains verify, so the
bootstrap stays secure as long as either signature scheme is unbroken at bootstrap time. After the
bootstrap the link is authenticated by Wegman–Carter with QKD key only, so a signing key or a
signature scheme broken later cannot touch later rounds.

Checks (:func:`verify_transcript`), each failure a :class:`PeerRefused` with one reason code:

* ``malformed`` - the bundle cannot be parsed;
* ``unknown-ca`` - a chain does not lead to a configured root (or a link is not signed by its issuer,
  or an issuer is not a CA);
* ``expired`` / ``not-yet-valid`` - a certificate of a chain is outside its validity period at ``now``;
* ``revoked`` - a certificate's serial is on its issuer's CRL (``no-crl`` when a CRL is required and missing,
  ``crl-invalid`` when it is badly signed or out of date);
* ``key-usage`` - a leaf lacks ``digitalSignature``, is a CA, or has the wrong key type;
* ``wrong-name`` - a leaf's common name is not the expected peer name;
* ``bad-signature`` - a transcript signature does not verify.

ML-DSA: ``cryptography`` 50 signs and verifies ML-DSA-65 certificates (``CertificateBuilder.sign(key, None)``,
``Certificate.verify_directly_issued_by``); chain links are checked with that call and the transcript
signatures with the public keys' ``verify``. ``x509.verification`` (the RFC 5280 path builder) is not
used: it serves TLS server/client profiles and not this signing profile.
"""

from __future__ import annotations

import datetime
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa

from qkdstack import certs
from qkdstack.errors import AuthenticationError, ConfigError

_LABEL = b"qkdstack/pki-transcript/v1"
_MLDSA_CONTEXT = b"qkdstack"


class PeerRefused(AuthenticationError):
    """The peer's identity was refused; ``reason`` is a short code (see the module docstring)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"peer refused ({reason}): {detail}")
        self.reason = reason


@dataclass(frozen=True)
class PkiIdentity:
    """A node's two signing keys and certificate chains (leaf first); keys hidden from ``repr``."""

    name: str
    classical_key: certs.PrivateKey = field(repr=False)
    classical_chain: tuple[x509.Certificate, ...] = field(repr=False)
    pq_key: mldsa.MLDSA65PrivateKey = field(repr=False)
    pq_chain: tuple[x509.Certificate, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if certs.key_kind(self.classical_key) not in ("ed25519", "ec-p256"):
            raise ConfigError("classical_key must be an Ed25519 or ECDSA P-256 key.")
        if certs.key_kind(self.pq_key) != "ml-dsa-65":
            raise ConfigError("pq_key must be an ML-DSA-65 key.")
        for label, key, chain in (
            ("classical", self.classical_key, self.classical_chain),
            ("pq", self.pq_key, self.pq_chain),
        ):
            if not chain:
                raise ConfigError(f"{label}_chain must hold at least the node's certificate.")
            if chain[0].public_key() != key.public_key():
                raise ConfigError(f"{label}_chain[0] does not certify {label}_key.")

    @classmethod
    def load(
        cls,
        name: str,
        classical_key_path: str | os.PathLike[str],
        classical_chain_path: str | os.PathLike[str],
        pq_key_path: str | os.PathLike[str],
        pq_chain_path: str | os.PathLike[str],
    ) -> PkiIdentity:
        """Load an identity from PEM files written by :mod:`qkdstack.certs` (keys must be 0600)."""
        return cls(
            name,
            certs.load_private_key(classical_key_path),
            tuple(certs.load_certificates(classical_chain_path)),
            certs.load_private_key(pq_key_path),  # type: ignore[arg-type]
            tuple(certs.load_certificates(pq_chain_path)),
        )


@dataclass(frozen=True)
class TrustAnchors:
    """Roots the peer's chains must lead to, and the CRLs of every issuer (required by default)."""

    classical_roots: tuple[x509.Certificate, ...]
    pq_roots: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    require_crl: bool = True

    def __post_init__(self) -> None:
        for r in self.pq_roots:
            if certs.key_kind(r.public_key()) != "ml-dsa-65":  # type: ignore[arg-type]
                raise ConfigError("pq_roots must hold ML-DSA-65 CA certificates.")


@dataclass(frozen=True)
class SignatureBundle:
    """What a node sends to prove its identity over a transcript: both chains and both signatures."""

    signer: str
    classical_chain: tuple[bytes, ...]
    classical_signature: bytes
    pq_chain: tuple[bytes, ...]
    pq_signature: bytes

    def to_fields(self) -> dict[str, Any]:
        """Channel message fields (bytes and lists of bytes)."""
        return {
            "signer": self.signer,
            "classical_chain": list(self.classical_chain),
            "classical_signature": self.classical_signature,
            "pq_chain": list(self.pq_chain),
            "pq_signature": self.pq_signature,
        }

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> SignatureBundle:
        try:
            b = cls(
                str(f["signer"]),
                tuple(bytes(c) for c in f["classical_chain"]),
                bytes(f["classical_signature"]),
                tuple(bytes(c) for c in f["pq_chain"]),
                bytes(f["pq_signature"]),
            )
        except (KeyError, TypeError, ValueError):
            raise PeerRefused("malformed", "the signature bundle lacks a field or has a wrong type") from None
        return b


def _signed_message(signer: str, transcript_digest: bytes) -> bytes:
    n = signer.encode()
    return _LABEL + struct.pack(">H", len(n)) + n + struct.pack(">H", len(transcript_digest)) + transcript_digest


def sign_transcript(identity: PkiIdentity, transcript_digest: bytes) -> SignatureBundle:
    """Sign ``transcript_digest`` (e.g. SHA-256 of the first round's transcript) with both keys."""
    msg = _signed_message(identity.name, transcript_digest)
    ck = identity.classical_key
    csig = ck.sign(msg, ec.ECDSA(hashes.SHA256())) if isinstance(ck, ec.EllipticCurvePrivateKey) else ck.sign(msg)
    return SignatureBundle(
        identity.name,
        tuple(c.public_bytes(serialization.Encoding.DER) for c in identity.classical_chain),
        csig,
        tuple(c.public_bytes(serialization.Encoding.DER) for c in identity.pq_chain),
        identity.pq_key.sign(msg, _MLDSA_CONTEXT),
    )


def _verify_signature(pub: Any, sig: bytes, msg: bytes) -> bool:
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
        elif isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(sig, msg)
        elif isinstance(pub, mldsa.MLDSA65PublicKey):
            pub.verify(sig, msg, _MLDSA_CONTEXT)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return False


def _check_validity(cert: x509.Certificate, now: datetime.datetime, what: str) -> None:
    if now > cert.not_valid_after_utc:
        raise PeerRefused("expired", f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < cert.not_valid_before_utc:
        raise PeerRefused("not-yet-valid", f"{what} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def _check_revocation(
    cert: x509.Certificate, issuer: x509.Certificate, trust: TrustAnchors, now: datetime.datetime, what: str
) -> None:
    crls = [c for c in trust.crls if c.issuer == issuer.subject]
    valid = [c for c in crls if c.is_signature_valid(issuer.public_key())]  # type: ignore[arg-type]
    if crls and not valid:
        raise PeerRefused("crl-invalid", f"the CRL of {issuer.subject.rfc4514_string()} is not signed by its issuer")
    current = [c for c in valid if c.next_update_utc is None or c.next_update_utc >= now]
    if valid and not current:
        raise PeerRefused("crl-invalid", f"the CRL of {issuer.subject.rfc4514_string()} is out of date")
    if not current:
        if trust.require_crl:
            raise PeerRefused("no-crl", f"no CRL for {issuer.subject.rfc4514_string()} is configured")
        return
    for crl in current:
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise PeerRefused("revoked", f"{what} (serial {cert.serial_number:x}) is revoked")


def _verify_chain(
    label: str,
    chain_der: Sequence[bytes],
    roots: Sequence[x509.Certificate],
    trust: TrustAnchors,
    expected_name: str,
    kinds: tuple[str, ...],
    now: datetime.datetime,
) -> x509.Certificate:
    """Check one chain (leaf first) up to a root; returns the leaf."""
    try:
        chain = [x509.load_der_x509_certificate(c) for c in chain_der]
    except ValueError:
        raise PeerRefused("malformed", f"the {label} certificate chain cannot be parsed") from None
    if not chain:
        raise PeerRefused("malformed", f"the {label} certificate chain is empty")
    leaf = chain[0]
    root_by_subject = {r.subject: r for r in roots}
    path = [leaf]
    pool = [c for c in chain[1:] if c not in roots]
    while path[-1].issuer not in root_by_subject:
        nxt = next((c for c in pool if c.subject == path[-1].issuer and c not in path), None)
        if nxt is None or len(path) > 8:
            raise PeerRefused(
                "unknown-ca",
                f"the {label} certificate is issued by {path[-1].issuer.rfc4514_string()}, not a trusted CA",
            )
        path.append(nxt)
    path.append(root_by_subject[path[-1].issuer])
    for i, cert in enumerate(path):
        what = f"the {label} certificate" if i == 0 else f"the {label} CA certificate {cert.subject.rfc4514_string()}"
        _check_validity(cert, now, what)
        if i + 1 < len(path):
            issuer = path[i + 1]
            if not _is_ca(issuer):
                raise PeerRefused("unknown-ca", f"{issuer.subject.rfc4514_string()} is not a CA")
            try:
                cert.verify_directly_issued_by(issuer)
            except (InvalidSignature, ValueError, TypeError):
                raise PeerRefused(
                    "unknown-ca", f"{what} is not validly signed by {issuer.subject.rfc4514_string()}"
                ) from None
            _check_revocation(cert, issuer, trust, now, what)
    # the leaf's own profile
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        usage_ok = ku.digital_signature
    except x509.ExtensionNotFound:
        usage_ok = False
    if not usage_ok or _is_ca(leaf):
        raise PeerRefused("key-usage", f"the {label} certificate is not allowed to sign (KeyUsage digitalSignature)")
    try:
        kind = certs.key_kind(leaf.public_key())  # type: ignore[arg-type]
    except ConfigError:
        kind = "other"
    if kind not in kinds:
        raise PeerRefused("key-usage", f"the {label} certificate holds a {kind} key, expected {' or '.join(kinds)}")
    cn = certs.common_name(leaf)
    if cn != expected_name:
        raise PeerRefused("wrong-name", f"the {label} certificate names {cn!r}, expected {expected_name!r}")
    return leaf


def verify_transcript(
    bundle: SignatureBundle,
    transcript_digest: bytes,
    trust: TrustAnchors,
    expected_peer_name: str,
    now: datetime.datetime | None = None,
) -> None:
    """Accept the peer's bundle over ``transcript_digest`` or raise :class:`PeerRefused` with the reason.

    Both chains (classical and ML-DSA-65) are checked completely - roots, signatures, validity at
    ``now`` (default: the current time), revocation, key usage and the expected name - and then
    both transcript signatures. The peer's certificate chains travel inside the bundle.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    if bundle.signer != expected_peer_name:
        raise PeerRefused("wrong-name", f"the peer calls itself {bundle.signer!r}, expected {expected_peer_name!r}")
    c_leaf = _verify_chain(
        "classical",
        bundle.classical_chain,
        trust.classical_roots,
        trust,
        expected_peer_name,
        ("ed25519", "ec-p256"),
        now,
    )
    q_leaf = _verify_chain("ML-DSA", bundle.pq_chain, trust.pq_roots, trust, expected_peer_name, ("ml-dsa-65",), now)
    msg = _signed_message(bundle.signer, transcript_digest)
    if not _verify_signature(c_leaf.public_key(), bundle.classical_signature, msg):
        raise PeerRefused("bad-signature", "the classical transcript signature does not verify")
    if not _verify_signature(q_leaf.public_key(), bundle.pq_signature, msg):
        raise PeerRefused("bad-signature", "the ML-DSA-65 transcript signature does not verify")
