"""ETSI GS QKD 014 key delivery: enc_keys requests/s and latency with 1 and 64 concurrent SAE clients.

The server (two KMEs with SQLite stores, peer agreement in process, uvicorn with mutual TLS) runs in a
child process; the clients run in this process, each on its own keep-alive TLS connection with the
SAE's client certificate. The clients are a lean HTTP/1.1 load generator (:class:`_LeanConnection`):
hand-written request bytes, minimal answer parsing, every answer checked for status 200 and a valid
Key container. httpx cost 2.6 ms of CPU per request against the server's 1.5 ms and so measured
mostly itself on 2 cores. Server and clients run on uvloop (libuv event loop and its TLS), which
the node should use too; ``QKDSTACK_BENCH_KMS_LOOP=asyncio`` measures the standard loop.
Every request is ``GET /api/v1/keys/SAE_B/enc_keys`` (one 256-bit key): a reservation at site A
(committed without fsync, see docs/kms.md), the peer reservation at site B and the delivery at A
(both durable: SQLite synchronous=FULL), each group-committed with the other requests of the moment.
Run: ``.venv/bin/python benchmarks/run_all.py kms`` (about 45 s).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

DURATION_S = float(os.environ.get("QKDSTACK_BENCH_KMS_DURATION", "10"))
PREFILL_KEYS = 120_000  # keys of 256 bits per direction; more than the runs can take


def _make_pki(root: Path) -> dict[str, str]:
    from qkdstack.certs import generate_key, issue_certificate, make_ca, write_certificate, write_private_key

    out = {}
    for site in ("A", "B"):
        ca_cert, ca_key = make_ca(f"site {site} CA")
        write_certificate(root / f"ca_{site}.pem", ca_cert)
        for name, server in ((f"KME_{site}", True), (f"SAE_{site}", False)):
            key = generate_key("ec-p256")
            cert = issue_certificate(
                ca_cert,
                ca_key,
                name,
                key.public_key(),
                client=not server,
                server=server,
                ip_addresses=["127.0.0.1"] if server else (),
            )
            write_certificate(root / f"{name}.pem", cert)
            write_private_key(root / f"{name}.key", key)
    return out


async def _serve(root: Path) -> None:
    from qkdstack.kms.etsi014 import TLSFiles, serve_etsi014, tune_gc_for_serving
    from qkdstack.kms.kme import KME, KMEConfig, link_pair
    from qkdstack.kms.store import LinkLimits, open_store

    limits = LinkLimits(capacity=4 * PREFILL_KEYS, high_water=3 * PREFILL_KEYS, low_water=PREFILL_KEYS)
    sync = os.environ.get("QKDSTACK_BENCH_KMS_SYNC", "FULL")
    a = KME(
        KMEConfig("KME_A", "KME_B", frozenset({"SAE_A"})), open_store(root / "a.db", limits=limits, synchronous=sync)
    )
    b = KME(
        KMEConfig("KME_B", "KME_A", frozenset({"SAE_B"})), open_store(root / "b.db", limits=limits, synchronous=sync)
    )
    block_chunks = 8192
    for i in range(2 * PREFILL_KEYS // block_chunks + 1):
        block = os.urandom(32 * block_chunks)
        await a.add_block(f"round-{i}", block)
        await b.add_block(f"round-{i}", block)
    ab, ba = link_pair(a, b)
    await a.attach_peer(ab)
    await b.attach_peer(ba)
    tls = TLSFiles(root / "KME_A.pem", root / "KME_A.key", root / "ca_A.pem")
    tune_gc_for_serving()  # what a node serving keys should do after start-up (see docs/kms.md)
    async with serve_etsi014(a, "127.0.0.1", 0, tls) as srv:
        print(srv.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin


def _check_key_container(body: bytes) -> bool:
    """True if ``body`` is a Key container with exactly one 256-bit key (a UUID ID and 32 base64 bytes)."""
    try:
        keys = json.loads(body)["keys"]
        if len(keys) != 1:
            return False
        uuid.UUID(keys[0]["key_ID"])
        return len(base64.b64decode(keys[0]["key"], validate=True)) == 32
    except (KeyError, TypeError, ValueError):
        return False


class _LeanConnection:
    """One SAE's HTTP/1.1 keep-alive connection over mutual TLS, with as little client CPU as possible.

    The benchmark measures the server: a general-purpose client (httpx) spends more CPU per request
    than the server does and, on a 2-core machine, takes the cores the server would use. This client
    writes the request bytes by hand and reads only the status line, Content-Length and the body;
    every answer is still checked (status 200 and a valid Key container). TLS is real: the SAE's
    client certificate, the server verified against the site CA.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host

    @classmethod
    async def open(cls, host: str, port: int, ctx: ssl.SSLContext) -> _LeanConnection:
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx, limit=1 << 20)
        return cls(reader, writer, host)

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode("ascii"))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = -1
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length < 0:
            raise ConnectionError("answer without Content-Length")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


async def _clients(url: str, root: Path, n: int, duration: float) -> dict:
    """``n`` SAE clients, each on its own keep-alive mTLS connection, sending enc_keys back to back."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(root / "ca_A.pem"))
    ctx.load_cert_chain(str(root / "SAE_A.pem"), str(root / "SAE_A.key"))
    latencies: list[float] = []
    errors = 0
    path = "/api/v1/keys/SAE_B/enc_keys"

    async def one(conn: _LeanConnection, stop_at: float) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            status, body = await conn.get(path)
            dt = time.perf_counter() - t0
            if status == 200 and _check_key_container(body):
                latencies.append(dt)
            else:
                errors += 1

    conns = [await _LeanConnection.open(host, int(port), ctx) for _ in range(n)]
    try:
        for c in conns:  # TLS handshakes and keep-alive connections before timing
            status, _ = await c.get("/api/v1/keys/SAE_B/status")
            assert status == 200
        start = time.perf_counter()
        await asyncio.gather(*(one(c, start + duration) for c in conns))
        elapsed = time.perf_counter() - start
    finally:
        for c in conns:
            await c.close()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3 if latencies else float("nan")

    return {
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_p50_ms": round(pct(0.50), 2),
        "latency_p99_ms": round(pct(0.99), 2),
        "requests": len(latencies),
        "errors": errors,
    }


async def _inprocess(root: Path, duration: float) -> dict:
    """The KME service alone (no HTTP, no TLS): 64 concurrent enc_keys calls, both stores, durable commits."""
    from qkdstack.kms.kme import KME, KMEConfig, link_pair
    from qkdstack.kms.store import open_store

    a = KME(KMEConfig("KME_A", "KME_B", frozenset({"SAE_A"})), open_store(root / "ia.db"))
    b = KME(KMEConfig("KME_B", "KME_A", frozenset({"SAE_B"})), open_store(root / "ib.db"))
    for i in range(6):
        block = os.urandom(32 * 8192)
        await a.add_block(f"round-{i}", block)
        await b.add_block(f"round-{i}", block)
    ab, ba = link_pair(a, b)
    await a.attach_peer(ab)
    await b.attach_peer(ba)
    done = 0

    async def worker(stop_at: float) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await a.enc_keys("SAE_A", "SAE_B")
            done += 1

    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(t0 + duration) for _ in range(64)))
    elapsed = time.perf_counter() - t0
    out = {
        "requests_per_s": round(done / elapsed, 1),
        "cpu_ms_per_request": round((time.process_time() - c0) * 1e3 / done, 3),
    }
    a.store.close()
    b.store.close()
    return out


def _run(coro: Any) -> Any:
    """Run ``coro`` on uvloop (libuv event loop and TLS) unless QKDSTACK_BENCH_KMS_LOOP=asyncio."""
    if os.environ.get("QKDSTACK_BENCH_KMS_LOOP", "uvloop") == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="qkdstack-bench-kms-") as tmp:
        root = Path(tmp)
        _make_pki(root)
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            port = int(server.stdout.readline())
            url = f"https://127.0.0.1:{port}"
            sync = os.environ.get("QKDSTACK_BENCH_KMS_SYNC", "FULL")
            out: dict = {"duration_s": DURATION_S, "key_size_bit": 256, "store": f"sqlite synchronous={sync}"}
            for n in (1, 64):
                s0, c0 = _cpu_s(server.pid), time.process_time()
                res = _run(_clients(url, root, n, DURATION_S))
                done = max(1, res["requests"] + res["errors"] + n)  # + n status calls of the warm-up
                # CPU per request, warm-up handshakes included: what the machine's cores must supply.
                res["server_cpu_ms_per_request"] = round((_cpu_s(server.pid) - s0) * 1e3 / done, 3)
                res["client_cpu_ms_per_request"] = round((time.process_time() - c0) * 1e3 / done, 3)
                out[f"clients_{n}"] = res
            out["kme_in_process_64"] = _run(_inprocess(root, min(DURATION_S, 3.0)))
            return out
        finally:
            server.stdin.close()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        _run(_serve(Path(sys.argv[2])))
    else:
        print(json.dumps(run(), indent=2))
