"""The classical channel between Alice and Bob, as the post-processing stages see it.

Every stage is a pair of coroutines, one per party, that share nothing but a
:class:`Channel`. A message is a :class:`Message`: a ``kind`` (``"<stage>.<name>"``),
public ``fields`` and, separately, the ``disclosed`` bits: bits that are functions of
the key (parities, verification tags). The channel counts, per stage and direction, the
messages, the bytes on the wire and the disclosed bits, so error-correction leakage is
*measured* from what actually crossed, never assumed.

Every message is encoded to bytes by :mod:`qkdstack.transport.codec` and decoded at the
other end, also in memory, so the parties cannot share objects and the same stage code
runs unchanged over TCP. Frame observers (``add_observer``) see every frame in order;
the authentication layer uses them to MAC whole round transcripts.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qkdstack.bits import BitArray
from qkdstack.errors import ChannelError, PeerAbort
from qkdstack.transport.codec import decode_message, encode_message

SENT = "sent"
RECEIVED = "received"

ABORT_KIND = "round.abort"
"""Message kind a party sends when it aborts; the peer's ``recv`` raises ProtocolAbort on it."""

FrameObserver = Callable[[str, bytes], None]
"""Called with (direction, frame bytes) for every frame sent or received."""


@dataclass(frozen=True)
class Message:
    """One protocol message.

    ``kind`` is ``"<stage>.<name>"``; the stage prefix is what the channel's counters are
    keyed by. ``disclosed`` holds the bits that depend on the key and so count as leakage.
    """

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    disclosed: BitArray | None = None

    @property
    def stage(self) -> str:
        return self.kind.split(".", 1)[0]

    def __getitem__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise ChannelError(f"message {self.kind!r} lacks field {name!r}") from None

    def __repr__(self) -> str:
        disclosed = f", disclosed=<{len(self.disclosed)} bits>" if self.disclosed is not None else ""
        return f"Message({self.kind!r}, fields={sorted(self.fields)}{disclosed})"


@dataclass
class StageCounter:
    """What crossed the channel for one stage in one direction."""

    messages: int = 0
    wire_bytes: int = 0
    disclosed_bits: int = 0


@dataclass
class ChannelStats:
    """Counters per (stage, direction); direction is ``"sent"`` or ``"received"``."""

    counters: dict[tuple[str, str], StageCounter] = field(default_factory=lambda: defaultdict(StageCounter))

    def record(self, stage: str, direction: str, wire_bytes: int, disclosed_bits: int) -> None:
        c = self.counters[(stage, direction)]
        c.messages += 1
        c.wire_bytes += wire_bytes
        c.disclosed_bits += disclosed_bits

    def disclosed_bits(self, stage: str, direction: str | None = None) -> int:
        """Key-dependent bits that crossed during ``stage``: both directions, or only ``direction``.

        Both ends see the same frames, so one end's ``sent`` count is the other's ``received``
        count: the round reports leakage per role (Alice → Bob, Bob → Alice) from these.
        """
        return sum(
            c.disclosed_bits for (s, d), c in self.counters.items() if s == stage and direction in (None, d)
        )

    def wire_bytes(self, stage: str | None = None) -> int:
        return sum(c.wire_bytes for (s, _), c in self.counters.items() if stage in (None, s))

    def messages(self, stage: str | None = None, direction: str | None = None) -> int:
        return sum(
            c.messages for (s, d), c in self.counters.items() if stage in (None, s) and direction in (None, d)
        )

    def round_trips(self, stage: str) -> int:
        """Messages sent in ``stage``: with strict request/answer alternation, the round trips."""
        return self.messages(stage, SENT)

    def reset(self) -> None:
        self.counters.clear()


class Channel(ABC):
    """One party's end of an ordered, reliable classical channel.

    Subclasses move frames (``_send_frame``/``_recv_frame``); this class encodes,
    decodes, counts and notifies observers.
    """

    def __init__(self) -> None:
        self.stats = ChannelStats()
        self._observers: list[FrameObserver] = []

    def add_observer(self, observer: FrameObserver) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: FrameObserver) -> None:
        self._observers.remove(observer)

    async def send(self, kind: str, disclosed: BitArray | None = None, **fields: Any) -> None:
        """Send a message of ``kind`` with public ``fields`` and optional ``disclosed`` bits."""
        frame = encode_message(kind, fields, disclosed)
        for observer in self._observers:
            observer(SENT, frame)
        self.stats.record(kind.split(".", 1)[0], SENT, len(frame), len(disclosed) if disclosed else 0)
        await self._send_frame(frame)

    async def recv(self, expect: str | None = None) -> Message:
        """Receive the next message; if ``expect`` is given, any other kind is a protocol error.

        A peer's abort message (``round.abort``) raises :class:`~qkdstack.errors.PeerAbort` with its reason.
        """
        frame = await self._recv_frame()
        kind, fields, disclosed = decode_message(frame)
        for observer in self._observers:
            observer(RECEIVED, frame)
        msg = Message(kind, fields, disclosed)
        self.stats.record(msg.stage, RECEIVED, len(frame), len(disclosed) if disclosed else 0)
        if kind == ABORT_KIND and expect != ABORT_KIND:
            raise PeerAbort(str(fields.get("stage", "peer")), str(fields.get("reason", "no reason given")),
                            fields.get("block_id"))
        if expect is not None and kind != expect:
            raise ChannelError(f"expected message {expect!r}, received {kind!r}")
        return msg

    async def send_abort(self, stage: str, reason: str, block_id: str | None = None) -> None:
        """Tell the peer this party aborted round ``block_id`` (best effort: a dead channel is ignored)."""
        with contextlib.suppress(Exception):  # the round is already lost; the local abort stands
            await self.send(ABORT_KIND, stage=stage, reason=reason, block_id=block_id)

    @abstractmethod
    async def _send_frame(self, frame: bytes) -> None: ...

    @abstractmethod
    async def _recv_frame(self) -> bytes: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release transport resources; the in-memory channel has none."""


class InMemoryChannel(Channel):
    """One end of an in-process channel pair made by :func:`channel_pair`."""

    def __init__(self, inbox: asyncio.Queue[bytes], outbox: asyncio.Queue[bytes], timeout: float | None) -> None:
        super().__init__()
        self._inbox = inbox
        self._outbox = outbox
        self._timeout = timeout

    async def _send_frame(self, frame: bytes) -> None:
        self._outbox.put_nowait(frame)

    async def _recv_frame(self) -> bytes:
        if not self._inbox.empty():
            return self._inbox.get_nowait()
        try:
            async with asyncio.timeout(self._timeout):  # no extra task per recv, unlike wait_for
                return await self._inbox.get()
        except TimeoutError:
            raise ChannelError(f"no message within {self._timeout} s") from None


def channel_pair(timeout: float | None = 60.0) -> tuple[InMemoryChannel, InMemoryChannel]:
    """Two connected in-memory channel ends: (Alice's, Bob's)."""
    a_to_b: asyncio.Queue[bytes] = asyncio.Queue()
    b_to_a: asyncio.Queue[bytes] = asyncio.Queue()
    return InMemoryChannel(b_to_a, a_to_b, timeout), InMemoryChannel(a_to_b, b_to_a, timeout)
