"""The classical channel as the post-processing stages see it: re-exported from the transport layer.

The :class:`Channel` interface, its per-stage accounting and the in-memory pair live in
:mod:`qkdstack.transport.channel`, below the TCP channel that implements the same interface, so
imports run one way (protocol → transport). Stages import them from here, next to the protocol.
"""

from qkdstack.transport.channel import (
    RECEIVED,
    SENT,
    Channel,
    ChannelStats,
    InMemoryChannel,
    Message,
    StageCounter,
    channel_pair,
)

__all__ = [
    "RECEIVED",
    "SENT",
    "Channel",
    "ChannelStats",
    "InMemoryChannel",
    "Message",
    "StageCounter",
    "channel_pair",
]
