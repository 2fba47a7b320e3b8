"""ETSI GS QKD 014 key delivery: enc_keys requests/s and latency with 1 and 64 concurrent SAE clients.

The server (two KMEs with SQLite stores, peer agreement in process, uvicorn with mutual TLS) runs in a
child process; the clients are httpx AsyncClients with keep-alive in this process, each with its own
TLS connection and the SAE's client certificate. Every request is ``GET /api/v1/keys/SAE_B/enc_keys``
(one 256-bit key): a reservation at site A, the peer reservation at site B, and the delivery at A,
each a durable transaction (SQLite synchronous=FULL, group commit). Run:
``.venv/bin/python benchmarks/run_all.py kms`` (about 30 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    from qkdstack.kms.etsi014 import TLSFiles, serve_etsi014
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
    async with serve_etsi014(a, "127.0.0.1", 0, tls) as srv:
        print(srv.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin


async def _clients(url: str, root: Path, n: int, duration: float) -> dict:
    import httpx

    ctx = ssl.create_default_context(cafile=str(root / "ca_A.pem"))
    ctx.load_cert_chain(str(root / "SAE_A.pem"), str(root / "SAE_A.key"))
    latencies: list[float] = []
    errors = 0

    async def one(client: httpx.AsyncClient, stop_at: float) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            r = await client.get("/api/v1/keys/SAE_B/enc_keys")
            dt = time.perf_counter() - t0
            if r.status_code == 200 and len(r.json()["keys"]) == 1:
                latencies.append(dt)
            else:
                errors += 1

    clients = [httpx.AsyncClient(base_url=url, verify=ctx, timeout=30) for _ in range(n)]
    try:
        for c in clients:  # TLS handshakes and keep-alive connections before timing
            assert (await c.get("/api/v1/keys/SAE_B/status")).status_code == 200
        start = time.perf_counter()
        await asyncio.gather(*(one(c, start + duration) for c in clients))
        elapsed = time.perf_counter() - start
    finally:
        for c in clients:
            await c.aclose()
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
                res = asyncio.run(_clients(url, root, n, DURATION_S))
                done = max(1, res["requests"] + res["errors"] + n)  # + n status calls of the warm-up
                # CPU per request, warm-up handshakes included: what the machine's cores must supply.
                res["server_cpu_ms_per_request"] = round((_cpu_s(server.pid) - s0) * 1e3 / done, 3)
                res["client_cpu_ms_per_request"] = round((time.process_time() - c0) * 1e3 / done, 3)
                out[f"clients_{n}"] = res
            out["kme_in_process_64"] = asyncio.run(_inprocess(root, min(DURATION_S, 3.0)))
            return out
        finally:
            server.stdin.close()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        asyncio.run(_serve(Path(sys.argv[2])))
    else:
        print(json.dumps(run(), indent=2))
