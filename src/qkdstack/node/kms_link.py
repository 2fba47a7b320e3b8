"""The authenticated link between the two sites' KMEs (key-ID agreement).

The KMEs reserve keys for each other's SAEs over this link (``PeerLink.request``, see
:mod:`qkdstack.kms.kme`). It carries no key bits, only key IDs and SAE IDs, but its
integrity matters (a forged reservation could hand a key to the wrong SAE), so every
frame is authenticated:

* The link key is 256 bits of QKD key: the node takes them from an accepted round's key
  before the rest reaches the key store (``link_keys`` by round ID, the same at both sites).
* On connection each end sends ``kms.hello`` with the round ID of the newest link key it
  holds and a fresh 32-byte nonce; both use the newest key they share and derive the
  connection key HMAC-SHA256(link key, "qkdstack-kms" ‖ nonce of the receiver site ‖ nonce of
  the transmitter site), so frames of an earlier connection cannot be replayed.
* Every later frame carries HMAC-SHA256(connection key, direction ‖ sequence ‖ body); the tag
  is checked in constant time and a bad tag closes the link (fail closed).

This is computationally secure authentication (HMAC), chosen because the link carries
thousands of small messages per second that information-theoretic tags would pay for with
more key than they protect; the post-processing rounds themselves stay authenticated by
Wegman–Carter. Requests are pipelined by ID, so concurrent ``enc_keys`` calls do not wait
for one another.

Keepalive: a link that carries no request for ``keepalive_s`` seconds sends a ``ping`` frame,
authenticated like every other frame, which the peer answers at once; the traffic keeps both
ends' read timeouts (``[link] timeout_s``) from closing an idle link, and a ping left unanswered
within the request timeout closes the link, so the node reconnects *before* an SAE's request
finds it dead. Without it an ``enc_keys`` about one timeout after the previous one met a link
that had just closed (HTTP 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from qkdstack.errors import AuthenticationError, ChannelError
from qkdstack.transport.channel import Channel

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _tag(key: bytes, direction: bytes, seq: int, body: bytes) -> bytes:
    return hmac.new(key, direction + struct.pack(">Q", seq) + body, hashlib.sha256).digest()


class KmsPeerLink:
    """A :class:`~qkdstack.kms.kme.PeerLink` over a channel, every frame HMAC-authenticated.

    ``is_transmitter`` fixes the order of nonces and the direction labels; ``handler``
    answers the peer's requests (the local KME's ``handle_peer``).
    """

    def __init__(
        self,
        channel: Channel,
        is_transmitter: bool,
        handler: Handler,
        timeout: float = 10.0,
        keepalive_s: float | None = None,
    ) -> None:
        self._channel = channel
        self._out_label = b"T" if is_transmitter else b"R"
        self._in_label = b"R" if is_transmitter else b"T"
        self._is_transmitter = is_transmitter
        self._handler = handler
        self._timeout = timeout
        self._keepalive_s = keepalive_s
        self._last_rx = 0.0
        self._key: bytes | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._pinger: asyncio.Task | None = None
        self.pings_sent = 0
        self._send_lock = asyncio.Lock()
        self.closed = asyncio.Event()
        self.key_round: int | None = None

    def __repr__(self) -> str:
        return f"KmsPeerLink(key_round={self.key_round}, closed={self.closed.is_set()})"

    async def handshake(self, link_keys: dict[int, bytes]) -> None:
        """Agree on the newest shared link key and derive the connection key; start reading."""
        nonce = secrets.token_bytes(32)
        await self._channel.send("kms.hello", rounds=sorted(link_keys), nonce=nonce)
        hello = await self._channel.recv(expect="kms.hello")
        shared = set(link_keys) & {int(r) for r in hello["rounds"]}
        peer_nonce = hello["nonce"]
        if not shared or not isinstance(peer_nonce, bytes) or len(peer_nonce) != 32:
            raise AuthenticationError("the peer KME holds no link key in common with this site")
        self.key_round = max(shared)
        tx_nonce, rx_nonce = (nonce, peer_nonce) if self._is_transmitter else (peer_nonce, nonce)
        self._key = hmac.new(link_keys[self.key_round], b"qkdstack-kms" + rx_nonce + tx_nonce, hashlib.sha256).digest()
        self._last_rx = asyncio.get_running_loop().time()
        self._reader = asyncio.create_task(self._read_loop())
        if self._keepalive_s:
            self._pinger = asyncio.create_task(self._ping_loop(self._keepalive_s))

    async def _send(self, kind: str, message_id: int, payload: dict[str, Any]) -> None:
        assert self._key is not None
        body = json.dumps({"kind": kind, "id": message_id, "payload": payload}, separators=(",", ":")).encode()
        async with self._send_lock:
            tag = _tag(self._key, self._out_label, self._send_seq, body)
            self._send_seq += 1
            await self._channel.send("kms.frame", body=body, tag=tag)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request to the peer KME and wait for its answer."""
        return await self._call("req", message)

    async def ping(self) -> None:
        """One authenticated round trip that the peer answers without its KME (keepalive and liveness)."""
        await self._call("ping", {})

    async def _ping_loop(self, interval: float) -> None:
        """Ping whenever nothing arrived for ``interval`` seconds; close the link if a ping goes unanswered."""
        loop = asyncio.get_running_loop()
        while not self.closed.is_set():
            idle_until = self._last_rx + interval
            if loop.time() < idle_until:
                await asyncio.sleep(idle_until - loop.time())
                continue
            self.pings_sent += 1
            try:
                await self.ping()
            except ChannelError as exc:
                if not self.closed.is_set():
                    log.warning("KME peer link: keepalive failed (%s); closing the link to reconnect", exc)
                await self._channel.close()  # ends the read loop, which sets ``closed``
                self.closed.set()
                return

    async def _call(self, kind: str, message: dict[str, Any]) -> dict[str, Any]:
        if self.closed.is_set() or self._key is None:
            raise ChannelError("the link to the peer KME is down")
        self._next_id += 1
        message_id = self._next_id
        future = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = future
        try:
            await self._send(kind, message_id, message)
            return await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            raise ChannelError("the peer KME did not answer in time") from None
        finally:
            self._waiting.pop(message_id, None)

    async def _answer(self, message_id: int, payload: dict[str, Any]) -> None:
        try:
            answer = await self._handler(payload)
        except Exception as exc:  # the peer gets an error answer, never silence
            log.warning("peer KME request failed: %s", exc)
            answer = {"ok": False, "error": str(exc)}
        with contextlib.suppress(ChannelError):
            await self._send("resp", message_id, answer)

    async def _pong(self, message_id: int) -> None:
        with contextlib.suppress(ChannelError):
            await self._send("resp", message_id, {"ok": True})

    async def _read_loop(self) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                msg = await self._channel.recv(expect="kms.frame")
                self._last_rx = asyncio.get_running_loop().time()
                body, tag = msg["body"], msg["tag"]
                expected = _tag(self._key, self._in_label, self._recv_seq, body)  # type: ignore[arg-type]
                self._recv_seq += 1
                if not isinstance(tag, bytes) or not hmac.compare_digest(tag, expected):
                    raise AuthenticationError("a frame from the peer KME failed authentication; link closed")
                frame = json.loads(body)
                if frame["kind"] in ("req", "ping"):
                    if frame["kind"] == "req":
                        answer = self._answer(int(frame["id"]), frame["payload"])
                    else:
                        answer = self._pong(int(frame["id"]))
                    task = asyncio.create_task(answer)
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                else:
                    future = self._waiting.get(int(frame["id"]))
                    if future is not None and not future.done():
                        future.set_result(frame["payload"])
        except (ChannelError, AuthenticationError, ValueError, KeyError) as exc:
            if not self.closed.is_set():
                log.warning("KME peer link closed: %s", exc)
        finally:
            self.closed.set()
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ChannelError("the link to the peer KME closed"))
            for task in tasks:
                task.cancel()

    async def close(self) -> None:
        self.closed.set()
        for task in (self._pinger, self._reader):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await self._channel.close()
