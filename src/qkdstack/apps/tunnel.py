"""A TCP tunnel between two sites, protected with hybrid QKD keys or a one-time pad.

``entry`` (site A) listens for local clients and, per client connection, opens a tunnel
connection to the ``exit`` (site B), which connects to the target service. Any TCP client
(curl, a database client) works unchanged: it talks to the entry's port as if it were the
service.

Per tunnel connection
---------------------
1. **Hybrid handshake** (:mod:`qkdstack.apps.hybrid`) over a
   :class:`~qkdstack.transport.tcp.TcpChannel` on the same socket: ML-KEM-768 + X25519
   first, then one QKD key fetched by the entry (ETSI 014 master) and by ID at the exit
   (slave). It yields direction-separated AES-256-GCM keys.
2. **Records**, each ``header || body`` with header = u32 body length, u8 type, u32 epoch,
   u64 sequence number (17 bytes). AES-256-GCM with the direction's key of the current
   epoch, nonce = the 96-bit big-endian sequence number (sequence numbers never restart on a
   connection and each epoch has its own key, so no (key, nonce) pair repeats), AAD =
   direction byte || header: a reordered, replayed, truncated or cross-direction record fails
   authentication. A record out of sequence or of the wrong epoch is refused.
3. **Rekeying**: the entry starts a rekey every ``rekey_seconds`` or ``rekey_bytes`` (both
   directions counted): it fetches a fresh QKD key, announces its key ID in a ``REKEY``
   record under the old key and switches its sending key; the exit fetches the key by ID,
   answers ``REKEY_ACK`` under its old key and switches. The new keys are
   HKDF(chain || fresh QKD key) (:meth:`~qkdstack.apps.hybrid.HybridSession.rekey`); the
   old chain is dropped, so earlier epochs stay safe if later state leaks. A rekey that
   cannot get a QKD key closes the connection (fail closed).
4. **OTP mode** (``otp=True``): data records are one-time-pad encrypted and authenticated
   with a one-time Poly1305 (Wegman–Carter) tag over direction || header || ciphertext,
   consuming QKD key for every byte plus 32 bytes per record (:mod:`qkdstack.apps.otp`).
   Pad keys are fetched by the entry (master) and announced by ID in ``PAD`` records; the
   exit asks for pad for its own direction with ``PAD_REQUEST``. Control records stay
   AES-GCM protected. When no key can be had, the connection closes; no byte is ever sent
   under a reused or missing pad.

End of data in one direction is an authenticated ``CLOSE`` record (so truncation is
detected); the connection ends when both directions have closed. Logs show handshakes,
rekeys (epoch, key ID) and QKD key consumed in bits, never key bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import struct
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qkdstack.apps import hybrid
from qkdstack.apps.keysource import KeySource, QKDKey, plan_request, source_limits
from qkdstack.apps.otp import ONE_TIME_MAC, PadStream, xor_bytes
from qkdstack.errors import AuthenticationError, ChannelError, ConfigError, KeyStoreError, QKDError
from qkdstack.transport.tcp import TcpChannel

log = logging.getLogger(__name__)

DATA, CLOSE, REKEY, REKEY_ACK, OTP_DATA, PAD, PAD_REQUEST, REKEY_REQUEST = 1, 2, 3, 4, 5, 6, 7, 8
_HEADER = struct.Struct(">IBIQ")
_TAG = 16
_DIR_I2R, _DIR_R2I = b"\x00", b"\x01"
_MAX_CONTROL = 64 * 1024
_MAX_RECORD = 1 << 20


def parse_hostport(value: str, name: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ConfigError naming the flag otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} must be HOST:PORT with a port in 0..65535, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass
class TunnelConfig:
    """What one tunnel end does. ``mode`` is ``"entry"`` (site A) or ``"exit"`` (site B)."""

    mode: str
    listen: tuple[str, int]
    connect: tuple[str, int]
    rekey_seconds: float = 60.0
    rekey_bytes: int = 64 * 1024 * 1024
    otp: bool = False
    record_bytes: int = 16 * 1024
    qkd_key_bits: int = 256
    otp_refill_bytes: int = 64 * 1024
    handshake_timeout_s: float = 30.0

    def validate(self) -> None:
        if self.mode not in ("entry", "exit"):
            raise ConfigError(f"mode must be 'entry' or 'exit', got {self.mode!r}")
        if not self.rekey_seconds > 0:
            raise ConfigError(f"rekey-seconds must be positive, got {self.rekey_seconds}")
        if self.rekey_bytes < 1024:
            raise ConfigError(f"rekey-bytes must be at least 1024, got {self.rekey_bytes}")
        if not 1 <= self.record_bytes <= _MAX_RECORD:
            raise ConfigError(f"record-bytes must be in 1..1048576, got {self.record_bytes}")
        if self.qkd_key_bits < 128 or self.qkd_key_bits % 8:
            raise ConfigError(f"qkd-key-bits must be a multiple of 8 and at least 128, got {self.qkd_key_bits}")
        if self.otp_refill_bytes < 1024:
            raise ConfigError(f"otp-refill-bytes must be at least 1024, got {self.otp_refill_bytes}")


@dataclass
class TunnelStats:
    """Counters of one tunnel end (all connections); QKD key in bits, traffic in bytes."""

    connections: int = 0
    active: int = 0
    handshakes_failed: int = 0
    rekeys: int = 0
    qkd_bits_handshake: int = 0
    qkd_bits_rekey: int = 0
    qkd_bits_otp: int = 0
    otp_bits_discarded: int = 0
    bytes_to_exit: int = 0
    bytes_to_entry: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def qkd_bits_consumed(self) -> int:
        return self.qkd_bits_handshake + self.qkd_bits_rekey + self.qkd_bits_otp


class _Link:
    """The record layer of one tunnel connection, after the handshake."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: hybrid.HybridSession,
        initiator: bool,
        keys: KeySource,
        config: TunnelConfig,
        stats: TunnelStats,
        name: str,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.session = session
        self.initiator = initiator
        self.keys = keys
        self.cfg = config
        self.stats = stats
        self.name = name
        self._lock = asyncio.Lock()
        self._send_dir, self._recv_dir = (_DIR_I2R, _DIR_R2I) if initiator else (_DIR_R2I, _DIR_I2R)
        self._send_aead, self._recv_aead = self._aeads(session)
        self._send_epoch = self._recv_epoch = session.epoch
        self._send_seq = self._recv_seq = 0
        self._next: hybrid.HybridSession | None = None
        self._rekey_pending = False
        self._rekeyed = asyncio.Event()  # set whenever this side's send key changes
        self._requested_epoch = -1  # exit side: epoch for which a REKEY_REQUEST was sent
        self._sent_bytes = 0  # data bytes sent under the current send key
        self._recv_bytes = 0  # data bytes received under the current receive key
        self._epoch_start = time.monotonic()
        # OTP state: pad for what we send, pad for what we receive.
        self.send_pad, self.recv_pad = PadStream(), PadStream()
        self._pad_arrived = asyncio.Event()
        self._pad_requested = 0
        self.sent_close = False
        self.got_close = False

    def _aeads(self, s: hybrid.HybridSession) -> tuple[AESGCM, AESGCM]:
        i2r, r2i = AESGCM(s.i2r_key), AESGCM(s.r2i_key)
        return (i2r, r2i) if self.initiator else (r2i, i2r)

    # ---- record I/O -------------------------------------------------------------------

    async def _write_record(self, rtype: int, payload: bytes, otp: tuple[bytes, bytes] | None = None) -> None:
        """Encrypt and write one record; caller holds ``self._lock``."""
        header = _HEADER.pack(len(payload) + _TAG, rtype, self._send_epoch, self._send_seq)
        aad = self._send_dir + header
        if otp is None:
            body = self._send_aead.encrypt(self._send_seq.to_bytes(12, "big"), payload, aad)
        else:
            mac_key, pad = otp
            ct = xor_bytes(payload, pad)
            body = ct + ONE_TIME_MAC.tag(mac_key, aad + ct)
        self._send_seq += 1
        self.writer.write(header + body)
        await self.writer.drain()

    async def send(self, rtype: int, payload: bytes = b"") -> None:
        async with self._lock:
            await self._write_record(rtype, payload)

    async def recv(self) -> tuple[int, bytes]:
        """Read, check and decrypt the next record; raises on any tampering."""
        try:
            header = await self.reader.readexactly(_HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise EOFError from None
            raise ChannelError("tunnel connection closed inside a record header") from None
        length, rtype, epoch, seq = _HEADER.unpack(header)
        limit = (_MAX_RECORD if rtype in (DATA, OTP_DATA) else _MAX_CONTROL) + _TAG
        if length < _TAG or length > limit:
            raise ChannelError(f"tunnel record of {length} bytes refused (limit {limit})")
        if seq != self._recv_seq:
            raise ChannelError(f"tunnel record out of sequence: expected #{self._recv_seq}, got #{seq}")
        if epoch != self._recv_epoch:
            raise ChannelError(f"tunnel record of epoch {epoch} while epoch {self._recv_epoch} is current")
        try:
            body = await self.reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ChannelError("tunnel connection closed inside a record (truncated)") from None
        aad = self._recv_dir + header
        if rtype == OTP_DATA:
            n = length - _TAG
            if not self.cfg.otp:
                raise ChannelError("one-time-pad record on a tunnel not in OTP mode")
            try:
                material = self.recv_pad.take(ONE_TIME_MAC.key_bytes + n)
            except KeyStoreError:
                raise ChannelError("one-time-pad record beyond the announced pad") from None
            mac_key, pad = material[: ONE_TIME_MAC.key_bytes], material[ONE_TIME_MAC.key_bytes :]
            ct, tag = body[:n], body[n:]
            if not hmac.compare_digest(ONE_TIME_MAC.tag(mac_key, aad + ct), tag):
                raise AuthenticationError("tunnel one-time-pad record failed Wegman–Carter authentication")
            payload = xor_bytes(ct, pad)
        else:
            try:
                payload = self._recv_aead.decrypt(seq.to_bytes(12, "big"), body, aad)
            except InvalidTag:
                raise AuthenticationError("tunnel record failed AES-GCM authentication") from None
        self._recv_seq += 1
        return rtype, payload

    # ---- rekeying ---------------------------------------------------------------------

    def _due(self) -> bool:
        limit = self.cfg.rekey_bytes
        return (
            self._sent_bytes >= limit
            or self._recv_bytes >= limit
            or time.monotonic() - self._epoch_start >= self.cfg.rekey_seconds
        )

    async def maybe_rekey(self, force: bool = False) -> None:
        """Entry side: start a rekey if one is due (or ``force``) and none is in flight."""
        if not self.initiator or self._rekey_pending or not (force or self._due()):
            return
        self._rekey_pending = True
        try:
            (qkd,) = await self.keys.get_new_keys(1, self.cfg.qkd_key_bits)
        except KeyStoreError as exc:
            raise KeyStoreError(f"rekey needs a fresh QKD key and none is available: {exc}") from None
        new = self.session.rekey(qkd)
        async with self._lock:
            await self._write_record(REKEY, struct.pack(">I", new.epoch) + qkd.key_id.encode())
            self._send_aead = AESGCM(new.i2r_key)
            self._send_epoch = new.epoch
            self._sent_bytes = 0
        self._next = new
        self._rekeyed.set()
        self.stats.qkd_bits_rekey += qkd.size_bits
        log.info(
            "%s: rekey to epoch %d started with QKD key %s (%d bits)", self.name, new.epoch, qkd.key_id, qkd.size_bits
        )

    async def _on_rekey(self, payload: bytes) -> None:
        """Exit side: fetch the announced key, switch receive key, acknowledge, switch send key."""
        if self.initiator or len(payload) < 5:
            raise ChannelError("unexpected or malformed REKEY record")
        (epoch,) = struct.unpack(">I", payload[:4])
        key_id = payload[4:].decode(errors="replace")
        if epoch != self.session.epoch + 1:
            raise ChannelError(f"REKEY to epoch {epoch} while at epoch {self.session.epoch}")
        (qkd,) = await self.keys.get_keys_by_id([key_id])
        new = self.session.rekey(qkd)
        self._recv_aead = AESGCM(new.i2r_key)
        self._recv_epoch = new.epoch
        async with self._lock:
            await self._write_record(REKEY_ACK, struct.pack(">I", new.epoch))
            self._send_aead = AESGCM(new.r2i_key)
            self._send_epoch = new.epoch
            self._sent_bytes = self._recv_bytes = 0
        self.session = new
        self._rekeyed.set()
        self.stats.rekeys += 1
        self.stats.qkd_bits_rekey += qkd.size_bits
        log.info("%s: rekeyed to epoch %d with QKD key %s (%d bits)", self.name, epoch, key_id, qkd.size_bits)

    def _on_rekey_ack(self, payload: bytes) -> None:
        if not self.initiator or self._next is None or payload != struct.pack(">I", self._next.epoch):
            raise ChannelError("unexpected REKEY_ACK record")
        self._recv_aead = AESGCM(self._next.r2i_key)
        self._recv_epoch = self._next.epoch
        self.session, self._next = self._next, None
        self._rekey_pending = False
        self._recv_bytes = 0
        self._epoch_start = time.monotonic()
        self._rekeyed.set()
        self.stats.rekeys += 1
        log.info("%s: rekey to epoch %d complete", self.name, self.session.epoch)

    async def _before_send(self, n: int) -> None:
        """Hold a data record until the send key has room for it (at most ``rekey_bytes`` per key).

        The entry rekeys itself; the exit asks with a ``REKEY_REQUEST`` and waits for the
        entry's ``REKEY``. A record larger than the limit still goes out alone under a fresh key.
        """
        while self._sent_bytes and self._sent_bytes + n > self.cfg.rekey_bytes:
            self._rekeyed.clear()
            if self.initiator and not self._rekey_pending:
                await self.maybe_rekey(force=True)
                continue
            if not self.initiator and self._requested_epoch != self.session.epoch:
                self._requested_epoch = self.session.epoch
                await self.send(REKEY_REQUEST, struct.pack(">I", self.session.epoch))
            await self._rekeyed.wait()

    async def _on_rekey_request(self, payload: bytes) -> None:
        if not self.initiator or len(payload) != 4:
            raise ChannelError("unexpected or malformed REKEY_REQUEST record")
        # A request for an epoch already left behind (a rekey crossed it) needs nothing.
        if struct.unpack(">I", payload)[0] == self.session.epoch:
            await self.maybe_rekey(force=True)

    # ---- one-time pad -------------------------------------------------------------------

    async def _fetch_pad(self, nbytes: int) -> list[QKDKey]:
        """Fetch at least ``nbytes`` of pad: a refill's worth if the store has it, else just ``nbytes``.

        Each request is all or none, so a refused refill leaves nothing half-used.
        """
        max_bits, max_keys = source_limits(self.keys)
        cap = (max_bits // 8) * max_keys
        want = min(max(nbytes, self.cfg.otp_refill_bytes), cap)
        number, size_bits = plan_request(want, max_bits, max_keys)
        try:
            keys = await self.keys.get_new_keys(number, size_bits)
        except KeyStoreError:
            if want <= nbytes:
                raise
            number, size_bits = plan_request(nbytes, max_bits, max_keys)
            keys = await self.keys.get_new_keys(number, size_bits)
        bits = number * size_bits
        self.stats.qkd_bits_otp += bits
        log.info("%s: fetched %d QKD keys (%d bits) for the one-time pad", self.name, number, bits)
        return keys

    @staticmethod
    def _pad_payload(direction: bytes, keys: list[QKDKey]) -> bytes:
        ids = [k.key_id.encode() for k in keys]
        return direction + struct.pack(">H", len(ids)) + b"".join(struct.pack(">H", len(i)) + i for i in ids)

    async def _ensure_send_pad(self, need: int) -> None:
        while self.send_pad.available < need:
            if self.initiator:
                keys = await self._fetch_pad(need - self.send_pad.available)
                async with self._lock:
                    await self._write_record(PAD, self._pad_payload(_DIR_I2R, keys))
                self.send_pad.append(keys)
            else:
                missing = need - self.send_pad.available
                if self._pad_requested < missing:
                    self._pad_requested = missing
                    self._pad_arrived.clear()
                    await self.send(PAD_REQUEST, struct.pack(">Q", missing))
                await self._pad_arrived.wait()

    async def _on_pad(self, payload: bytes) -> None:
        if self.initiator or len(payload) < 3:
            raise ChannelError("unexpected or malformed PAD record")
        direction, (count,) = payload[:1], struct.unpack(">H", payload[1:3])
        pos, ids = 3, []
        for _ in range(count):
            (n,) = struct.unpack(">H", payload[pos : pos + 2])
            ids.append(payload[pos + 2 : pos + 2 + n].decode(errors="replace"))
            pos += 2 + n
        if not ids or pos != len(payload):
            raise ChannelError("malformed PAD record")
        keys = await self.keys.get_keys_by_id(ids)
        bits = sum(k.size_bits for k in keys)
        self.stats.qkd_bits_otp += bits
        log.info("%s: fetched %d QKD keys (%d bits) by ID for the one-time pad", self.name, len(keys), bits)
        if direction == _DIR_I2R:
            self.recv_pad.append(keys)
        elif direction == _DIR_R2I:
            self.send_pad.append(keys)
            self._pad_requested = 0
            self._pad_arrived.set()
        else:
            raise ChannelError("PAD record for an unknown direction")

    async def _on_pad_request(self, payload: bytes) -> None:
        if not self.initiator or len(payload) != 8:
            raise ChannelError("unexpected or malformed PAD_REQUEST record")
        (need,) = struct.unpack(">Q", payload)
        keys = await self._fetch_pad(need)
        self.recv_pad.append(keys)
        async with self._lock:
            await self._write_record(PAD, self._pad_payload(_DIR_R2I, keys))

    # ---- pumps --------------------------------------------------------------------------

    async def send_data(self, data: bytes) -> None:
        if self.cfg.otp:
            need = ONE_TIME_MAC.key_bytes + len(data)
            await self._ensure_send_pad(need)
            async with self._lock:
                material = self.send_pad.take(need)
                k = ONE_TIME_MAC.key_bytes
                await self._write_record(OTP_DATA, data, otp=(material[:k], material[k:]))
        else:
            await self._before_send(len(data))
            await self.send(DATA, data)
            self._sent_bytes += len(data)
            await self.maybe_rekey()

    async def pump_out(self, plain: asyncio.StreamReader) -> None:
        """Local plaintext side -> tunnel, until EOF (then an authenticated CLOSE)."""
        while True:
            data = await plain.read(self.cfg.record_bytes)
            if not data:
                break
            await self.send_data(data)
            if self.initiator:
                self.stats.bytes_to_exit += len(data)
            else:
                self.stats.bytes_to_entry += len(data)
        await self.send(CLOSE)
        self.sent_close = True

    async def pump_in(self, plain: asyncio.StreamWriter) -> None:
        """Tunnel -> local plaintext side; handles control records; returns at EOF of the tunnel."""
        while True:
            try:
                rtype, payload = await self.recv()
            except EOFError:
                if not (self.got_close and self.sent_close):
                    raise ChannelError("tunnel connection closed by the peer before the end of data") from None
                return
            if rtype in (DATA, OTP_DATA):
                if self.got_close:
                    raise ChannelError("data after CLOSE")
                plain.write(payload)
                await plain.drain()
                if rtype == DATA:
                    self._recv_bytes += len(payload)
                    await self.maybe_rekey()
            elif rtype == CLOSE:
                self.got_close = True
                if plain.can_write_eof():
                    with contextlib.suppress(OSError):
                        plain.write_eof()
                if self.sent_close:
                    return
            elif rtype == REKEY:
                await self._on_rekey(payload)
            elif rtype == REKEY_ACK:
                self._on_rekey_ack(payload)
            elif rtype == PAD:
                await self._on_pad(payload)
            elif rtype == PAD_REQUEST:
                await self._on_pad_request(payload)
            elif rtype == REKEY_REQUEST:
                await self._on_rekey_request(payload)
            else:
                raise ChannelError(f"unknown tunnel record type {rtype}")

    async def timer(self) -> None:
        """Entry side: start time-based rekeys even when no data flows."""
        while True:
            left = self.cfg.rekey_seconds - (time.monotonic() - self._epoch_start)
            await asyncio.sleep(max(left, 0.05))
            await self.maybe_rekey()

    def finish(self) -> None:
        discarded = self.send_pad.discard() + self.recv_pad.discard()
        self.stats.otp_bits_discarded += 8 * discarded


class Tunnel:
    """One end of the tunnel: a listening server that forwards each connection.

    ``keys`` is the key source of this site: the entry uses it as ETSI 014 master
    (new keys), the exit as slave (keys by ID).
    """

    def __init__(self, config: TunnelConfig, keys: KeySource) -> None:
        config.validate()
        self.cfg = config
        self.keys = keys
        self.stats = TunnelStats()
        self._server: asyncio.Server | None = None
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        if self._server is None:
            raise ChannelError("tunnel is not started")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        ensure = getattr(self.keys, "ensure_limits", None)
        if ensure is not None and self.cfg.mode == "entry":
            await ensure()
        host, port = self.cfg.listen
        try:
            self._server = await asyncio.start_server(self._on_client, host, port)
        except OSError as exc:
            raise ConfigError(f"listen: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        log.info(
            "tunnel %s listening on %s:%d, forwarding to %s:%d (%s, rekey every %g s or %d bytes)",
            self.cfg.mode,
            host,
            self.port,
            *self.cfg.connect,
            "one-time pad" if self.cfg.otp else "AES-256-GCM",
            self.cfg.rekey_seconds,
            self.cfg.rekey_bytes,
        )

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def close(self, grace_s: float = 1.0) -> None:
        """Stop listening; connections get ``grace_s`` seconds to finish, then are cut."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._tasks:  # let connections that are finishing finish, then cut the rest
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Cancellation only comes from close(); end quietly (asyncio 3.11 logs cancelled handler tasks).
        with contextlib.suppress(asyncio.CancelledError):
            await self._handle(reader, writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        name = f"{self.cfg.mode}#{next(self._ids)}"
        self.stats.connections += 1
        self.stats.active += 1
        others: list[asyncio.StreamWriter] = []
        try:
            if self.cfg.mode == "entry":
                await self._entry(reader, writer, name, others)
            else:
                await self._exit(reader, writer, name, others)
        except (QKDError, OSError, EOFError) as exc:
            msg = f"{name}: connection closed: {type(exc).__name__}: {exc}"
            log.warning(msg)
            self.stats.errors.append(msg)
        finally:
            self.stats.active -= 1
            for w in [writer, *others]:
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            self._tasks.discard(task)

    async def _entry(self, client_r, client_w, name: str, others: list) -> None:
        host, port = self.cfg.connect
        try:
            tr, tw = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise ChannelError(f"cannot reach the tunnel exit at {host}:{port} ({exc.strerror or exc})") from None
        others.append(tw)
        channel = TcpChannel(tr, tw, timeout=self.cfg.handshake_timeout_s, max_frame_bytes=_MAX_CONTROL)
        try:
            session = await hybrid.initiator(channel, self.keys, self.cfg.qkd_key_bits)
        except QKDError:
            self.stats.handshakes_failed += 1
            raise
        self.stats.qkd_bits_handshake += session.qkd_bits_consumed
        link = _Link(tr, tw, session, True, self.keys, self.cfg, self.stats, name)
        await self._run(link, client_r, client_w, timer=True)

    async def _exit(self, tun_r, tun_w, name: str, others: list) -> None:
        channel = TcpChannel(tun_r, tun_w, timeout=self.cfg.handshake_timeout_s, max_frame_bytes=_MAX_CONTROL)
        try:
            session = await hybrid.responder(channel, self.keys)
        except QKDError:
            self.stats.handshakes_failed += 1
            raise
        self.stats.qkd_bits_handshake += session.qkd_bits_consumed
        host, port = self.cfg.connect
        try:
            sr, sw = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise ChannelError(f"cannot reach the service at {host}:{port} ({exc.strerror or exc})") from None
        others.append(sw)
        link = _Link(tun_r, tun_w, session, False, self.keys, self.cfg, self.stats, name)
        await self._run(link, sr, sw, timer=False)

    async def _run(self, link: _Link, plain_r, plain_w, timer: bool) -> None:
        log.info("%s: tunnel up, QKD key %s (%d bits)", link.name, link.session.key_id, link.session.qkd_bits_consumed)
        out = asyncio.create_task(link.pump_out(plain_r))
        inn = asyncio.create_task(link.pump_in(plain_w))
        # The rekey timer is watched too: if it cannot get a QKD key, the connection must end.
        pending = {out, inn} | ({asyncio.create_task(link.timer())} if timer else set())
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
                if out.done() and (inn.done() or link.got_close):
                    break
        finally:
            for t in pending:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
            link.finish()
            log.info(
                "%s: closed after %d rekeys; QKD key consumed so far by this tunnel end: %d bits",
                link.name,
                link.session.epoch,
                self.stats.qkd_bits_consumed,
            )
