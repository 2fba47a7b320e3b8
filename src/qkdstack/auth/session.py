"""Authenticating a whole post-processing round with one Wegman–Carter tag per direction.

Usage at each party (``role`` is ``"alice"`` or ``"bob"``; both use the same ``round_id``)::

    auth = await begin_round(channel, pool, role, round_id)   # attaches the transcript observer,
                                                             # exchanges pool state, reserves keys
    ... run the round's stages on ``channel`` ...             # every frame is recorded
    outcome = await auth.finish(round_key)                   # tags exchanged and verified
    store(outcome.key_for_store, pending=outcome.pending_round_id)
    commit(outcome.committed_round_ids); drop(outcome.dropped_round_ids)

Nothing of the round may be used before :meth:`RoundAuthenticator.finish` returns: it raises
:class:`~qkdstack.errors.AuthenticationError` when the peer's tag does not verify (or
:class:`~qkdstack.errors.PeerAbort` when the peer refused ours), and the round must then be thrown
away. If the round aborts for another reason before ``finish``, call :meth:`RoundAuthenticator.abandon`
(the reserved pads stay burnt).

Message order: Alice sends ``auth.sync`` then Bob answers with his; at the end Alice sends
``auth.tag``; Bob verifies it and only then sends his ``auth.tag`` (so Alice's accepting Bob's tag
proves Bob accepted hers), or ``round.abort`` if it failed. The tag messages are outside the transcript
they authenticate. Key bits consumed per round: one 128-bit pad per direction, plus a 128-bit
hash key per direction when it is refreshed (see :mod:`qkdstack.auth.pool`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from qkdstack.auth.pool import AuthKeyPool, RoundKeys, RoundOutcome
from qkdstack.auth.wegman_carter import A_TO_B, ALICE, B_TO_A, BOB, TranscriptMac, WegmanCarterMac
from qkdstack.errors import AuthenticationError, ConfigError

SYNC_KIND = "auth.sync"
TAG_KIND = "auth.tag"


def round_epsilon(transcript_bytes: int) -> float:
    """Forgery probability of a round's two tags (one per direction) on transcripts of at most that many bytes.

    Bernstein's bound holds for messages of at most ``L`` bytes, and the forger picks the length of the
    transcript he substitutes: call it with the longer of the two ends' transcripts.
    """
    from qkdstack.auth.wegman_carter import poly1305_epsilon

    return 2 * poly1305_epsilon(transcript_bytes)


MAX_TRANSCRIPT_BYTES = 1 << 40
"""Largest transcript length a peer may claim in ``auth.tag`` (a sanity bound on an unauthenticated field)."""


class RoundAuthenticator:
    """One round's authentication state at one party; made by :func:`begin_round`."""

    def __init__(self, channel: Any, pool: AuthKeyPool, transcript: TranscriptMac, keys: RoundKeys) -> None:
        self.channel = channel
        self.pool = pool
        self.transcript = transcript
        self.keys = keys
        self.role = transcript.role
        self._done = False
        self.mac_epsilon = 0.0

    def __repr__(self) -> str:
        return f"RoundAuthenticator(role={self.role!r}, round_id={self.keys.round_id}, done={self._done})"

    def _tag(self, direction: str) -> bytes:
        self.keys.touched.add(direction)
        return self.transcript.tag(WegmanCarterMac(self.keys.hash_key[direction]), self.keys.pad[direction])

    def _epsilon(self, msg: Any) -> float:
        """The round's MAC term with ``L`` = the longer of this end's transcript and the one the peer tagged."""
        claimed = msg.fields.get("length")
        if not isinstance(claimed, int) or not 0 <= claimed <= MAX_TRANSCRIPT_BYTES:
            claimed = MAX_TRANSCRIPT_BYTES  # unknown: assume the longest (counts more, not less)
        self.mac_epsilon = round_epsilon(max(self.transcript.byte_length, claimed))
        return self.mac_epsilon

    def _verify(self, direction: str, msg: Any) -> None:
        self.keys.touched.add(direction)
        tag = msg.fields.get("tag")
        ok = isinstance(tag, bytes) and self.transcript.verify(
            WegmanCarterMac(self.keys.hash_key[direction]), self.keys.pad[direction], tag
        )
        if not ok:
            self.pool.fail_round(self.keys, [direction], mac_epsilon=self._epsilon(msg))
            raise AuthenticationError(
                f"the peer's transcript tag for round {self.keys.round_id} on link {self.pool.link_id} did not "
                f"verify: the classical messages were altered, dropped, injected or reordered, or the peer "
                f"does not hold this link's authentication key; the round is discarded"
            )

    async def finish(self, round_key: bytes, key_epsilon: float = 0.0, block_epsilon: float = 0.0) -> RoundOutcome:
        """Exchange and verify the transcript tags; on success refill the pool from ``round_key``.

        Returns the :class:`~qkdstack.auth.pool.RoundOutcome` (``key_for_store`` is the round key
        minus the refill slice; ``epsilon`` the round's authentication error: the tags' forgery bound
        plus the distance from uniform of the keys they used). ``key_epsilon`` is ``round_key``'s
        distance from uniform (its block's ε_sec), charged to the rounds its refill will pay for;
        ``block_epsilon`` its block's ε_sec + ε_cor, added to the link's running total.
        """
        if self._done:
            raise ConfigError("this round was already finished or abandoned.")
        self._done = True
        self.transcript.detach()
        length = self.transcript.byte_length
        try:
            if self.role == ALICE:
                await self.channel.send(TAG_KIND, tag=self._tag(A_TO_B), length=length)
                msg = await self.channel.recv(TAG_KIND)
                self._verify(B_TO_A, msg)
            else:
                msg = await self.channel.recv(TAG_KIND)
                try:
                    self._verify(A_TO_B, msg)
                except AuthenticationError:
                    await self.channel.send_abort("authentication", "transcript tag did not verify")
                    raise
                await self.channel.send(TAG_KIND, tag=self._tag(B_TO_A), length=length)
        except BaseException:
            self.pool.release(self.keys)  # no-op when _verify already recorded the failure
            raise
        return self.pool.complete_round(
            self.keys, round_key, mac_epsilon=self._epsilon(msg), refill_epsilon=key_epsilon,
            block_epsilon=block_epsilon,
        )

    def abandon(self) -> None:
        """The round aborted before its tags were exchanged: stop recording; keep the burns."""
        self._done = True
        self.transcript.detach()
        self.pool.release(self.keys)


async def begin_round(channel: Any, pool: AuthKeyPool, role: str, round_id: int) -> RoundAuthenticator:
    """Start recording the transcript on ``channel``, exchange pool state and reserve the round's keys.

    Call before the round's first message. Raises :class:`~qkdstack.errors.KeyPoolExhausted` when the
    pool cannot pay for the round, :class:`~qkdstack.errors.AuthenticationError` when the two pools
    cannot be reconciled.
    """
    if role not in (ALICE, BOB):
        raise ConfigError(f"role must be 'alice' or 'bob', not {role!r}.")
    tm = TranscriptMac(role, pool.link_id, round_id)
    tm.attach(channel)
    try:
        mine = pool.sync_state()
        if role == ALICE:
            await channel.send(SYNC_KIND, round_id=round_id, state=mine)
            peer = await channel.recv(SYNC_KIND)
        else:
            peer = await channel.recv(SYNC_KIND)
            await channel.send(SYNC_KIND, round_id=round_id, state=mine)
        if peer.fields.get("round_id") != round_id:
            raise AuthenticationError(
                f"the peer is authenticating round {peer.fields.get('round_id')!r}, this end round {round_id}"
            )
        keys = pool.reserve_round(peer.fields.get("state"), round_id)
    except BaseException:
        tm.detach()
        raise
    return RoundAuthenticator(channel, pool, tm, keys)


async def authenticate_round(
    channel: Any,
    pool: AuthKeyPool,
    role: str,
    round_id: int,
    stages: Callable[[], Awaitable[bytes]],
    key_epsilon: float = 0.0,
) -> RoundOutcome:
    """Run ``stages()`` (the round's post-processing, returning the round key) under one transcript MAC.

    Equivalent to :func:`begin_round`, ``stages()``, :meth:`RoundAuthenticator.finish`, with
    :meth:`RoundAuthenticator.abandon` if the stages raise. ``key_epsilon``: the round key's ε_sec.
    """
    auth = await begin_round(channel, pool, role, round_id)
    try:
        round_key = await stages()
    except BaseException:
        auth.abandon()
        raise
    return await auth.finish(round_key, key_epsilon)


async def authenticate_peer(channel: Any, pool: AuthKeyPool, role: str, round_id: int) -> RoundOutcome:
    """Entity authentication on a (re)connection: an empty round whose tags prove both ends hold the pool.

    Costs one pad per direction (256 bits, plus hash keys if due) and refills nothing. It also
    settles any pending round (``committed_round_ids``/``dropped_round_ids``) before new key is made.
    """
    auth = await begin_round(channel, pool, role, round_id)
    return await auth.finish(b"")
