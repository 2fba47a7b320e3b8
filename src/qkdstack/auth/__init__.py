"""Authentication of the classical channel: bootstrap by PSK, PKI or web of trust, then Wegman–Carter.

Modules (one job each):

* :mod:`~qkdstack.auth.wegman_carter` - the Poly1305 Wegman–Carter MAC and the round transcript MAC;
* :mod:`~qkdstack.auth.pool` - the per-direction authentication key pool, kept in lockstep at both ends;
* :mod:`~qkdstack.auth.session` - ``begin_round``/``finish``: one tag per direction per round;
* :mod:`~qkdstack.auth.bootstrap` - the signature-authenticated first round that seeds the pool;
* :mod:`~qkdstack.auth.psk` - pre-shared key files (the ``psk`` bootstrap);
* :mod:`~qkdstack.auth.pki` - X.509 dual-signature (classical + ML-DSA-65) transcript signatures;
* :mod:`~qkdstack.auth.pgp` - the OpenPGP web of trust, computed by GnuPG.

See docs/authentication.md for the life cycle and the security argument.
"""

from qkdstack.auth.bootstrap import begin_bootstrap_round, pki_signer, pki_verifier
from qkdstack.auth.pool import AuthKeyPool, RoundOutcome
from qkdstack.auth.session import authenticate_peer, authenticate_round, begin_round, round_epsilon
from qkdstack.auth.wegman_carter import TranscriptMac, WegmanCarterMac, poly1305_epsilon

__all__ = [
    "AuthKeyPool",
    "RoundOutcome",
    "TranscriptMac",
    "WegmanCarterMac",
    "authenticate_peer",
    "authenticate_round",
    "begin_bootstrap_round",
    "begin_round",
    "pki_signer",
    "pki_verifier",
    "poly1305_epsilon",
    "round_epsilon",
]
