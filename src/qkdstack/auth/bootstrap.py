"""The signature-authenticated first round (PKI or OpenPGP bootstrap) that seeds the key pool.

Usage at each party::

    boot = await begin_bootstrap_round(channel, role, link_id, my_name)   # nonces, transcript on
    ... run the first round's stages on ``channel`` ...
    pool, key_for_store = await boot.finish(signer, verifier, round_key, path=pool_path)

``signer(digest) -> dict`` returns the message fields proving this node's identity over the
transcript digest, ``verifier(fields, digest)`` accepts the peer's or raises
:class:`~qkdstack.errors.AuthenticationError` (for example :func:`pki_signer`/:func:`pki_verifier`,
or :func:`qkdstack.auth.pgp.pgp_signer`/:func:`qkdstack.auth.pgp.pgp_verifier`).

The transcript starts with an ``auth.hello`` from each side carrying a fresh 32-byte nonce and the
node name, so each signature covers both parties' fresh randomness (no replay of an old bootstrap)
and both names (no relaying to a third node). Message order at the end: Alice sends ``auth.sig``;
Bob verifies it (a refusal is sent back as ``round.abort`` with the reason, so both logs show it)
and sends his; Alice verifies it and sends ``auth.done`` (or ``round.abort``); Bob seeds his pool only
after ``auth.done``. The first ``seed_bytes`` of the round key seed the pool
(:meth:`~qkdstack.auth.pool.AuthKeyPool.from_seed`), the rest goes to the key store. A pool that has
authenticated no round yet may be replaced by a new bootstrap if the ends disagree about the first one.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from qkdstack.auth.pool import AuthKeyPool
from qkdstack.auth.wegman_carter import ALICE, BOB, TranscriptMac
from qkdstack.errors import AuthenticationError, ConfigError

HELLO_KIND = "auth.hello"
SIG_KIND = "auth.sig"
DONE_KIND = "auth.done"
BOOTSTRAP_ROUND_ID = 0
DEFAULT_SEED_BYTES = 1024

Signer = Callable[[bytes], dict[str, Any]]
Verifier = Callable[[dict[str, Any], bytes], None]


class BootstrapRound:
    """State of a bootstrap round at one party; made by :func:`begin_bootstrap_round`."""

    def __init__(self, channel: Any, role: str, link_id: str, transcript: TranscriptMac, peer_name: str) -> None:
        self.channel = channel
        self.role = role
        self.link_id = link_id
        self.transcript = transcript
        self.peer_claimed_name = peer_name

    def __repr__(self) -> str:
        return f"BootstrapRound(role={self.role!r}, link_id={self.link_id!r})"

    async def finish(
        self,
        signer: Signer,
        verifier: Verifier,
        round_key: bytes,
        *,
        seed_bytes: int = DEFAULT_SEED_BYTES,
        **pool_kwargs: Any,
    ) -> tuple[AuthKeyPool, bytes]:
        """Exchange and verify the transcript signatures; return the seeded pool and the rest of the key."""
        self.transcript.detach()
        if len(round_key) < seed_bytes + 1:
            raise ConfigError(f"the bootstrap round key must be longer than seed_bytes={seed_bytes} bytes.")
        digest = self.transcript.digest()
        mine = signer(digest)
        ch = self.channel
        if self.role == ALICE:
            await ch.send(SIG_KIND, **mine)
            await _verify_peer(ch, verifier, digest)
            await ch.send(DONE_KIND)
        else:
            await _verify_peer(ch, verifier, digest)
            await ch.send(SIG_KIND, **mine)
            await ch.recv(DONE_KIND)
        pool = AuthKeyPool.from_seed(self.link_id, round_key[:seed_bytes], **pool_kwargs)
        return pool, bytes(round_key[seed_bytes:])

    def abandon(self) -> None:
        self.transcript.detach()


async def _verify_peer(channel: Any, verifier: Verifier, digest: bytes) -> None:
    """Receive the peer's signatures and verify them; a refusal is sent back so both logs show it."""
    peer = await channel.recv(SIG_KIND)
    try:
        verifier(peer.fields, digest)
    except AuthenticationError as exc:
        await channel.send_abort("authentication", str(exc))
        raise


async def begin_bootstrap_round(channel: Any, role: str, link_id: str, my_name: str) -> BootstrapRound:
    """Start the bootstrap round: record the transcript and exchange names and fresh nonces."""
    if role not in (ALICE, BOB):
        raise ConfigError(f"role must be 'alice' or 'bob', not {role!r}.")
    tm = TranscriptMac(role, link_id, BOOTSTRAP_ROUND_ID)
    tm.attach(channel)
    try:
        hello = {"name": my_name, "nonce": secrets.token_bytes(32)}
        if role == ALICE:
            await channel.send(HELLO_KIND, **hello)
            peer = await channel.recv(HELLO_KIND)
        else:
            peer = await channel.recv(HELLO_KIND)
            await channel.send(HELLO_KIND, **hello)
        if not isinstance(peer.fields.get("nonce"), bytes) or len(peer.fields["nonce"]) != 32:
            raise AuthenticationError("the peer's hello carries no 32-byte nonce")
    except BaseException:
        tm.detach()
        raise
    return BootstrapRound(channel, role, link_id, tm, str(peer.fields.get("name")))


def pki_signer(identity: Any) -> Signer:
    """A :data:`Signer` for a :class:`~qkdstack.auth.pki.PkiIdentity`."""
    from qkdstack.auth.pki import sign_transcript

    return lambda digest: sign_transcript(identity, digest).to_fields()


def pki_verifier(trust: Any, expected_peer_name: str) -> Verifier:
    """A :data:`Verifier` checking a peer's PKI bundle against :class:`~qkdstack.auth.pki.TrustAnchors`."""
    from qkdstack.auth.pki import SignatureBundle, verify_transcript

    def verify(fields: dict[str, Any], digest: bytes) -> None:
        verify_transcript(SignatureBundle.from_fields(fields), digest, trust, expected_peer_name)

    return verify
