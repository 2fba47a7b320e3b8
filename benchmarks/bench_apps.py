"""Key consumers: hybrid handshake latency and tunnel throughput over loopback.

* ``hybrid_handshake_*_ms``: full ML-KEM-768 + X25519 + QKD handshake (both parties, one
  process, in-memory channel with the real codec, in-memory key source), median and p90.
* ``tunnel_*_MB_per_s``: bytes a service sends through exit -> entry to a client, all on
  127.0.0.1 in one event loop (so the figure includes both tunnel ends' work on one core; median of 3 runs),
  in AES-256-GCM mode (rekey every 16 MiB) and in one-time-pad mode (QKD key for every
  byte); ``direct_MB_per_s`` is the same transfer without the tunnel. MB = 10^6 bytes.

Run: ``.venv/bin/python benchmarks/run_all.py apps`` (about 10-30 s).
"""

from __future__ import annotations

import asyncio
import statistics
import time

from qkdstack.apps import hybrid
from qkdstack.apps.keysource import InMemoryKeySource
from qkdstack.apps.tunnel import Tunnel, TunnelConfig
from qkdstack.protocol.channel import channel_pair

CHUNK = bytes(range(256)) * 256  # 64 KiB
REPEATS = 3  # throughput figures are the median of this many runs (the machine is shared)


async def _handshakes(n: int) -> list[float]:
    master, slave = InMemoryKeySource.pair()
    times = []
    for _ in range(n):
        a, b = channel_pair()
        t0 = time.perf_counter()
        await asyncio.gather(hybrid.initiator(a, master), hybrid.responder(b, slave))
        times.append(time.perf_counter() - t0)
    return times


async def _source_server(total: int) -> asyncio.Server:
    async def send_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        left = total
        while left > 0:
            writer.write(CHUNK[: min(left, len(CHUNK))])
            left -= len(CHUNK)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(send_all, "127.0.0.1", 0)


async def _download(port: int, total: int) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = 0
    while chunk := await reader.read(1 << 20):
        got += len(chunk)
    elapsed = time.perf_counter() - t0
    writer.close()
    if got != total:
        raise RuntimeError(f"transfer incomplete: {got} of {total} bytes")
    return elapsed


async def _tunnel_throughput(total: int, otp: bool) -> tuple[float, dict]:
    service = await _source_server(total)
    master, slave = InMemoryKeySource.pair()
    kw = {"rekey_bytes": 16 * 1024 * 1024, "otp": otp, "otp_refill_bytes": 1024 * 1024}
    exit_ = Tunnel(
        TunnelConfig("exit", ("127.0.0.1", 0), ("127.0.0.1", service.sockets[0].getsockname()[1]), **kw), slave
    )
    await exit_.start()
    entry = Tunnel(TunnelConfig("entry", ("127.0.0.1", 0), ("127.0.0.1", exit_.port), **kw), master)
    await entry.start()
    try:
        elapsed = await _download(entry.port, total)
    finally:
        await entry.close()
        await exit_.close()
        service.close()
    s = entry.stats
    return total / elapsed / 1e6, {"rekeys": s.rekeys, "qkd_bits": s.qkd_bits_consumed}


async def _direct(total: int) -> float:
    service = await _source_server(total)
    try:
        elapsed = await _download(service.sockets[0].getsockname()[1], total)
    finally:
        service.close()
    return total / elapsed / 1e6


async def _run() -> dict:
    times = await _handshakes(40)
    aes_total, otp_total = 128 * 1024 * 1024, 32 * 1024 * 1024
    aes_runs = [await _tunnel_throughput(aes_total, otp=False) for _ in range(REPEATS)]
    otp_runs = [await _tunnel_throughput(otp_total, otp=True) for _ in range(REPEATS)]
    direct = statistics.median([await _direct(aes_total) for _ in range(REPEATS)])
    aes, aes_info = statistics.median(r[0] for r in aes_runs), aes_runs[0][1]
    otp, otp_info = statistics.median(r[0] for r in otp_runs), otp_runs[0][1]
    times.sort()
    return {
        "hybrid_handshake_median_ms": round(1e3 * statistics.median(times), 3),
        "hybrid_handshake_p90_ms": round(1e3 * times[int(0.9 * len(times))], 3),
        "hybrid_handshake_qkd_bits": 256,
        "tunnel_aes_gcm_MB_per_s": round(aes, 1),
        "tunnel_aes_gcm_bytes": aes_total,
        "tunnel_aes_gcm_rekeys": aes_info["rekeys"],
        "tunnel_otp_MB_per_s": round(otp, 1),
        "tunnel_otp_bytes": otp_total,
        "tunnel_otp_qkd_bits_consumed": otp_info["qkd_bits"],
        "direct_loopback_MB_per_s": round(direct, 1),
    }


def run() -> dict:
    return asyncio.run(_run())


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
