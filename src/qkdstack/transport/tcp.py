"""TCP transport for the classical channel between two node processes.

Wire format of one frame: ``length`` (4 bytes, big-endian, of what follows), ``sequence``
(8 bytes, big-endian, per direction, starting at 0 on each connection), then the codec
frame. The receiver rejects a frame whose sequence number is not the next expected one,
so a replayed, dropped or reordered frame is caught at once (the authentication layer
catches it again cryptographically through the round transcript). Frames above
``max_frame_bytes`` are refused before they are read.

:class:`TcpChannel` is a :class:`~qkdstack.protocol.channel.Channel`: post-processing
stages run over it unchanged. :func:`connect` retries with back-off until the peer
listens; :func:`serve` accepts connections and hands each to a callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable

from qkdstack.errors import ChannelError
from qkdstack.protocol.channel import Channel

_HEADER = struct.Struct(">IQ")
DEFAULT_MAX_FRAME = 256 * 1024 * 1024


class TcpChannel(Channel):
    """One end of a framed, sequenced TCP connection."""

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
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    async def _send_frame(self, frame: bytes) -> None:
        async with self._send_lock:
            self._writer.write(_HEADER.pack(len(frame) + 8, self._send_seq) + frame)
            self._send_seq += 1
            if self._writer.transport.is_closing():
                raise ChannelError(f"connection to {self.peer} lost while sending: closed")
            if not self._writer.transport.get_write_buffer_size():
                return  # the kernel took the whole frame: nothing to wait for (the usual case)
            try:
                async with asyncio.timeout(self._timeout):
                    await self._writer.drain()
            except (ConnectionError, TimeoutError) as exc:
                raise ChannelError(f"connection to {self.peer} lost while sending: {exc or 'timed out'}") from None

    async def _recv_frame(self) -> bytes:
        try:
            async with asyncio.timeout(self._timeout):  # one deadline for the whole frame, no extra tasks
                header = await self._reader.readexactly(_HEADER.size)
                length, seq = _HEADER.unpack(header)
                if length < 8 or length - 8 > self._max:
                    raise ChannelError(f"frame of {length} bytes from {self.peer} refused (limit {self._max})")
                body = await self._reader.readexactly(length - 8)
        except asyncio.IncompleteReadError:
            raise ChannelError(f"connection to {self.peer} closed") from None
        except TimeoutError:
            raise ChannelError(f"no message from {self.peer} within {self._timeout} s") from None
        except ConnectionError as exc:
            raise ChannelError(f"connection to {self.peer} lost: {exc}") from None
        if seq != self._recv_seq:
            raise ChannelError(
                f"frame out of sequence from {self.peer}: expected #{self._recv_seq}, got #{seq} "
                "(replayed, dropped or reordered)"
            )
        self._recv_seq += 1
        return body

    async def close(self) -> None:
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
) -> TcpChannel:
    """Connect to a listening peer, retrying with exponential back-off."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            reader, writer = await asyncio.open_connection(host, port)
            return TcpChannel(reader, writer, timeout=timeout)
        except OSError as exc:
            last = exc
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
