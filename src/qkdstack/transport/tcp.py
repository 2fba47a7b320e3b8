"""TCP transport for the classical channel between two node processes.

Wire format of one frame: ``length`` (4 bytes, big-endian, of what follows), ``sequence``
(8 bytes, big-endian, per direction, starting at 0 on each connection), then the codec
frame. The receiver rejects a frame whose sequence number is not the next expected one,
so a replayed, dropped or reordered frame is caught at once (the authentication layer
catches it again cryptographically through the round transcript). Frames above
``max_frame_bytes`` are refused before they are read. A frame with an empty body (length 8)
is a *keepalive*: it carries nothing, is sequenced like any frame and is skipped by the
receiver (:meth:`TcpChannel.keepalive`); the codec never produces an empty frame.

Every failure of the connection reaches callers as :class:`~qkdstack.errors.ChannelError`
and leaves the channel broken (fail-stop); the node then ends the session and reconnects.

:class:`TcpChannel` is a :class:`~qkdstack.transport.channel.Channel`: post-processing
stages run over it unchanged. :func:`connect` retries with back-off until the peer
listens; :func:`serve` accepts connections and hands each to a callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable

from qkdstack.errors import ChannelError
from qkdstack.transport.channel import Channel

_HEADER = struct.Struct(">IQ")
DEFAULT_MAX_FRAME = 256 * 1024 * 1024


class TcpChannel(Channel):
    """One end of a framed, sequenced TCP connection.

    The channel is *fail-stop*: the first failure of the connection (closed or reset by the
    peer, a timeout, an OS error, uvloop's ``RuntimeError`` on a closed handle, a refused or
    out-of-sequence frame) raises :class:`~qkdstack.errors.ChannelError`, aborts the TCP
    connection (so the peer learns at once) and marks the channel :attr:`broken`; every later
    ``send`` or ``recv`` raises ``ChannelError`` again without touching the socket. After a
    timeout or a refused frame the byte stream may be cut mid-frame, so nothing could be read
    reliably from it anyway; callers reconnect.

    :meth:`keepalive` sends an empty frame: the peer's ``recv`` skips it (and restarts its
    deadline) and never returns it, so it reaches no frame observer, no transcript MAC and no
    counter. It carries nothing, so it needs no authentication: forging one achieves no more
    than delaying frames, which a man in the middle can do anyway.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout: float | None = 60.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
    ) -> None:
        super().__init__()
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._max = max_frame_bytes
        self._send_seq = 0
        self._recv_seq = 0
        self._send_lock = asyncio.Lock()
        self.broken: str | None = None
        """Why the connection failed (None while it works)."""
        self.keepalives_received = 0
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def _fail(self, reason: str) -> ChannelError:
        """Mark the channel broken, abort the connection, return the error to raise."""
        if self.broken is None:
            self.broken = reason
        with contextlib.suppress(Exception):  # already closed, or a uvloop handle that is gone
            self._writer.transport.abort()
        return ChannelError(reason)

    def _check(self) -> None:
        if self.broken is not None:
            raise ChannelError(f"connection to {self.peer} is down ({self.broken})")

    async def keepalive(self) -> None:
        """Send an empty frame that keeps the peer's ``recv`` from timing out (see the class docstring)."""
        await self._send_frame(b"")

    async def _send_frame(self, frame: bytes) -> None:
        self._check()
        async with self._send_lock:
            self._check()
            try:
                self._writer.write(_HEADER.pack(len(frame) + 8, self._send_seq) + frame)
                self._send_seq += 1
                if self._writer.transport.is_closing():
                    raise self._fail(f"connection to {self.peer} lost while sending: closed")
                if not self._writer.transport.get_write_buffer_size():
                    return  # the kernel took the whole frame: nothing to wait for (the usual case)
                async with asyncio.timeout(self._timeout):
                    await self._writer.drain()
            except ChannelError:
                raise
            except TimeoutError:
                raise self._fail(f"connection to {self.peer} lost while sending: timed out after "
                                 f"{self._timeout} s") from None
            except (OSError, RuntimeError) as exc:  # ConnectionError is an OSError; uvloop: "handler is closed"
                raise self._fail(f"connection to {self.peer} lost while sending: {exc or type(exc).__name__}") from None

    async def _recv_frame(self) -> bytes:
        self._check()
        while True:
            try:
                async with asyncio.timeout(self._timeout):  # one deadline per frame, no extra tasks
                    header = await self._reader.readexactly(_HEADER.size)
                    length, seq = _HEADER.unpack(header)
                    if length < 8 or length - 8 > self._max:
                        raise self._fail(f"frame of {length} bytes from {self.peer} refused (limit {self._max})")
                    body = await self._reader.readexactly(length - 8) if length > 8 else b""
            except ChannelError:
                raise
            except asyncio.IncompleteReadError:
                raise self._fail(f"connection to {self.peer} closed") from None
            except TimeoutError:
                raise self._fail(f"no message from {self.peer} within {self._timeout} s") from None
            except (OSError, RuntimeError) as exc:
                raise self._fail(f"connection to {self.peer} lost: {exc or type(exc).__name__}") from None
            if seq != self._recv_seq:
                raise self._fail(
                    f"frame out of sequence from {self.peer}: expected #{self._recv_seq}, got #{seq} "
                    "(replayed, dropped or reordered)"
                )
            self._recv_seq += 1
            if body:
                return body
            self.keepalives_received += 1  # a keepalive: skip it, with a fresh deadline for the next frame

    async def close(self) -> None:
        if self.broken is None:
            self.broken = "closed by this end"
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


async def connect(
    host: str,
    port: int,
    *,
    attempts: int = 50,
    delay: float = 0.1,
    max_delay: float = 2.0,
    timeout: float | None = 60.0,
    on_failure: Callable[[int, OSError], None] | None = None,
) -> TcpChannel:
    """Connect to a listening peer, retrying with exponential back-off.

    Each attempt is bounded by ``timeout``; every failure (refused, unreachable, timed out) is
    retried, and after ``attempts`` of them :class:`~qkdstack.errors.ChannelError` is raised.
    ``on_failure(attempt, error)`` is called after each failed attempt (the node logs them).
    """
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            async with asyncio.timeout(timeout):  # a silently dropped SYN must not hang for minutes
                reader, writer = await asyncio.open_connection(host, port)
            return TcpChannel(reader, writer, timeout=timeout)
        except OSError as exc:  # refused, unreachable, timed out (TimeoutError is an OSError)
            last = exc
            if on_failure is not None:
                on_failure(attempt, exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, max_delay)
    raise ChannelError(f"cannot reach {host}:{port} after {attempts} attempts: {last}")


async def serve(
    host: str,
    port: int,
    handler: Callable[[TcpChannel], Awaitable[None]],
    *,
    timeout: float | None = 60.0,
) -> asyncio.Server:
    """Listen on ``host:port``; each accepted connection is wrapped and passed to ``handler``."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = TcpChannel(reader, writer, timeout=timeout)
        try:
            await handler(channel)
        finally:
            await channel.close()

    return await asyncio.start_server(on_connect, host, port)
