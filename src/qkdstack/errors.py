"""One exception hierarchy for the whole stack.

User-facing commands catch :class:`QKDError`, print its message (one sentence) and
exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class QKDError(Exception):
    """Root of every error qkdstack raises on purpose."""

    exit_code = 1


class ConfigError(QKDError, ValueError):
    """A parameter or configuration field is invalid; the message names the field."""

    exit_code = 2


class ProtocolAbort(QKDError):
    """A post-processing round aborted; nothing of the round may be used.

    ``stage`` names the stage that aborted (``"sifting"``, ``"estimation"``,
    ``"cascade"``, ``"verification"``, ``"amplification"``, ``"authentication"``).
    """

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


class PeerAbort(ProtocolAbort):
    """The peer announced that it aborted the round identified by ``block_id``."""

    def __init__(self, stage: str, reason: str, block_id: str | None) -> None:
        super().__init__(stage, f"peer aborted: {reason}")
        self.block_id = block_id


class ChannelError(QKDError):
    """The classical channel failed: closed, timed out, or a malformed frame."""


class AuthenticationError(QKDError):
    """A MAC or signature did not verify, or a peer's identity was refused."""


class KeyPoolExhausted(AuthenticationError):
    """The authentication key pool cannot pay for the next round; the link stops."""


class KeyStoreError(QKDError):
    """A key-store operation failed (unknown key, already delivered, store full)."""
