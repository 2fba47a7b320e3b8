"""The tunnel carries real HTTP through rekeys (AES-GCM and OTP modes) and refuses tampering."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import http.server
import shutil
import threading
import urllib.error
import urllib.request

import pytest

from qkdstack.apps.keysource import InMemoryKeySource
from qkdstack.apps.tunnel import Tunnel, TunnelConfig, parse_hostport
from qkdstack.errors import ConfigError

BODY = hashlib.shake_256(b"qkdstack tunnel test").digest(200_000)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(BODY)

    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        digest = hashlib.sha256(data).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(digest)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(digest)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_service():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


async def start_pair(service_port: int, **kw):
    master, slave = InMemoryKeySource.pair(capacity_bits=kw.pop("capacity_bits", None))
    exit_ = Tunnel(TunnelConfig("exit", ("127.0.0.1", 0), ("127.0.0.1", service_port), **kw), slave)
    await exit_.start()
    entry = Tunnel(TunnelConfig("entry", ("127.0.0.1", 0), ("127.0.0.1", exit_.port), **kw), master)
    await entry.start()
    return entry, exit_, master, slave


async def settle(*tunnels):
    for _ in range(200):
        if all(t.stats.active == 0 for t in tunnels):
            return
        await asyncio.sleep(0.02)


def fetch(url: str, data: bytes | None = None) -> bytes:
    with urllib.request.urlopen(url, data=data, timeout=20) as resp:
        return resp.read()


@pytest.mark.parametrize("otp", [False, True])
async def test_http_through_tunnel_with_rekeys(http_service, otp):
    entry, exit_, master, slave = await start_pair(http_service, rekey_bytes=32 * 1024, otp=otp)
    try:
        url = f"http://127.0.0.1:{entry.port}/file"
        got = await asyncio.to_thread(fetch, url)
        assert got == BODY
        upload = hashlib.shake_256(b"upload").digest(100_000)
        answer = await asyncio.to_thread(fetch, url, upload)
        assert answer == hashlib.sha256(upload).hexdigest().encode()
        await settle(entry, exit_)
        assert entry.stats.errors == [] and exit_.stats.errors == []
        assert entry.stats.connections == 2 == exit_.stats.connections
        if otp:
            # Every byte in both directions was covered by one-time pad from QKD key.
            assert entry.stats.qkd_bits_otp >= 8 * (len(BODY) + len(upload))
            assert entry.stats.qkd_bits_otp == exit_.stats.qkd_bits_otp
        else:
            # Hard limit: no key protects more than rekey_bytes in one direction.
            assert entry.stats.rekeys >= len(BODY) // (32 * 1024) + len(upload) // (32 * 1024)
            assert exit_.stats.rekeys == entry.stats.rekeys
            assert entry.stats.qkd_bits_rekey == 256 * entry.stats.rekeys
        assert entry.stats.qkd_bits_handshake == 2 * 256 == exit_.stats.qkd_bits_handshake
        assert master.delivered_bits == slave.delivered_bits and master.awaiting_slave == 0
    finally:
        await entry.close()
        await exit_.close()


async def test_time_based_rekey(http_service):
    """An idle but open connection rekeys on the timer."""
    entry, exit_, _, _ = await start_pair(http_service, rekey_seconds=0.1)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", entry.port)
        await asyncio.sleep(0.6)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        while chunk := await reader.read():
            data += chunk
        assert data.startswith(b"HTTP/1.") and data.endswith(BODY)
        writer.close()
        await settle(entry, exit_)
        assert entry.stats.rekeys >= 2 and exit_.stats.rekeys == entry.stats.rekeys
    finally:
        await entry.close()
        await exit_.close()


async def test_tampering_on_the_wire_closes_the_connection(http_service):
    """A man in the middle flipping one bit of a record after the handshake is caught."""
    master, slave = InMemoryKeySource.pair()
    exit_ = Tunnel(TunnelConfig("exit", ("127.0.0.1", 0), ("127.0.0.1", http_service)), slave)
    await exit_.start()
    seen = 0

    async def mitm(cr, cw):
        nonlocal seen
        sr, sw = await asyncio.open_connection("127.0.0.1", exit_.port)

        async def pipe(r, w, flip):
            nonlocal seen
            while data := await r.read(65536):
                if flip:
                    if seen < 4000 <= seen + len(data):  # well past the handshake frames
                        b = bytearray(data)
                        b[4000 - seen] ^= 0x80
                        data = bytes(b)
                    seen += len(data)
                w.write(data)
                await w.drain()
            w.close()

        await asyncio.gather(pipe(cr, sw, True), pipe(sr, cw, False), return_exceptions=True)

    proxy = await asyncio.start_server(mitm, "127.0.0.1", 0)
    entry = Tunnel(TunnelConfig("entry", ("127.0.0.1", 0), ("127.0.0.1", proxy.sockets[0].getsockname()[1])), master)
    await entry.start()
    try:
        big = bytes(50_000)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            await asyncio.to_thread(fetch, f"http://127.0.0.1:{entry.port}/", big)
        await settle(entry, exit_)
        assert any("AuthenticationError" in e for e in exit_.stats.errors), exit_.stats.errors
    finally:
        await entry.close()
        await exit_.close()
        proxy.close()


async def test_no_qkd_key_no_tunnel(http_service):
    entry, exit_, master, _ = await start_pair(http_service, capacity_bits=0)
    try:
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            await asyncio.to_thread(fetch, f"http://127.0.0.1:{entry.port}/")
        await settle(entry, exit_)
        assert entry.stats.handshakes_failed == 1 and master.delivered_bits == 0
    finally:
        await entry.close()
        await exit_.close()


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="listen"):
        parse_hostport("nohost", "listen")
    with pytest.raises(ConfigError, match="rekey-bytes"):
        TunnelConfig("entry", ("h", 1), ("h", 2), rekey_bytes=1).validate()
    with pytest.raises(ConfigError, match="mode"):
        TunnelConfig("middle", ("h", 1), ("h", 2)).validate()


async def test_rekey_without_qkd_key_fails_closed(http_service):
    """Key for the handshake but none for the first rekey: the connection ends, no data under a stale key."""
    entry, exit_, master, _ = await start_pair(http_service, rekey_bytes=32 * 1024, capacity_bits=256)
    try:
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError, http.client.HTTPException)):
            got = await asyncio.to_thread(fetch, f"http://127.0.0.1:{entry.port}/")
            assert got == BODY  # unreachable: the transfer must not complete
        await settle(entry, exit_)
        assert any("rekey needs a fresh QKD key" in e for e in entry.stats.errors), entry.stats.errors
        assert entry.stats.rekeys == 0 and master.remaining_bits == 0
    finally:
        await entry.close()
        await exit_.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_through_tunnel(http_service):
    """A stock client, unchanged: curl fetches through the entry port."""
    entry, exit_, _, _ = await start_pair(http_service, rekey_bytes=64 * 1024)
    try:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{entry.port}/x",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert out == BODY
        await settle(entry, exit_)
        assert entry.stats.rekeys >= 2 and entry.stats.errors == []
    finally:
        await entry.close()
        await exit_.close()


async def test_otp_uses_the_last_key_then_refuses(http_service):
    """OTP mode with little key: small exchanges use what is left; when pad runs out the connection ends."""
    # Handshake (256 bits) plus ~3 KB of pad: too little for a refill, enough for a short request.
    entry, exit_, master, _ = await start_pair(http_service, otp=True, capacity_bits=256 + 8 * 3000)
    try:
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError, http.client.HTTPException)):
            got = await asyncio.to_thread(fetch, f"http://127.0.0.1:{entry.port}/")
            assert got == BODY  # unreachable: 200 kB cannot be covered by 3 kB of pad
        await settle(entry, exit_)
        assert entry.stats.qkd_bits_otp > 0  # the request itself went out under the remaining pad
        assert any("not enough key" in e for e in entry.stats.errors), entry.stats.errors
        # The refused request took nothing: what is left is exactly what the pad fetches did not use.
        assert master.remaining_bits == 8 * 3000 - entry.stats.qkd_bits_otp > 0
    finally:
        await entry.close()
        await exit_.close()
