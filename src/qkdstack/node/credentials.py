"""Build the bootstrap signer and verifier of a node from its ``[auth]`` configuration."""

from __future__ import annotations

from qkdstack import certs
from qkdstack.auth.bootstrap import Signer, Verifier, pki_signer, pki_verifier
from qkdstack.auth.pgp import GpgKeyring, pgp_signer, pgp_verifier
from qkdstack.auth.pki import PkiIdentity, TrustAnchors
from qkdstack.errors import ConfigError
from qkdstack.node.config import NodeConfig


def _trust_anchors(config: NodeConfig) -> TrustAnchors:
    auth = config.auth
    roots = certs.load_certificates(config.resolve(auth.ca_certs))
    classical = tuple(r for r in roots if certs.key_kind(r.public_key()) != "ml-dsa-65")
    pq = tuple(r for r in roots if certs.key_kind(r.public_key()) == "ml-dsa-65")
    if not classical or not pq:
        raise ConfigError("[auth] ca_certs must hold a classical root and an ML-DSA-65 root certificate")
    crls = tuple(certs.load_crls(config.resolve(auth.crls))) if auth.crls else ()
    return TrustAnchors(classical, pq, crls)


def bootstrap_credentials(config: NodeConfig) -> tuple[Signer, Verifier]:
    """(signer, verifier) for the signature-authenticated first round (``pki`` or ``pgp``)."""
    auth = config.auth
    if auth.bootstrap == "pki":
        identity = PkiIdentity.load(
            config.site.name,
            config.resolve(auth.classical_key),
            config.resolve(auth.classical_cert),
            config.resolve(auth.pq_key),
            config.resolve(auth.pq_cert),
        )
        return pki_signer(identity), pki_verifier(_trust_anchors(config), config.site.peer)
    if auth.bootstrap == "pgp":
        ring = GpgKeyring(config.resolve(auth.gpg_home))
        return pgp_signer(ring, auth.own_fingerprint), pgp_verifier(ring, auth.peer_fingerprint)
    raise ConfigError(f"[auth] bootstrap {auth.bootstrap!r} has no signing credentials")


def release_credentials(config: NodeConfig) -> None:
    """Stop what the bootstrap credentials started: GnuPG's agent for the node's ``gpg_home`` (``pgp``).

    gpg starts a gpg-agent daemon per home directory that outlives the node; the bootstrap round is
    the only user, so the node stops it when the round is over.
    """
    if config.auth.bootstrap == "pgp":
        GpgKeyring(config.resolve(config.auth.gpg_home)).close()
