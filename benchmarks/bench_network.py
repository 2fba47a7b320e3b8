"""Trusted-node key relay: enc_keys latency (p50/p99) and throughput for a 3-hop key, 1 and 64 clients.

Four sites in a line A-R1-R2-B run in this process (tests/_relay_support.py): per site one SQLite key
store (synchronous=FULL), one KME per link joined in process to its neighbour's, a relay store, a
SiteKME and its KME-to-KME server on 127.0.0.1 with real mutual TLS (uvicorn + httpx). The clients call
``SiteKME.enc_keys("SAE_A", "SAE_B")`` at A directly (no ETSI 014 HTTP front: benchmarks/bench_kms.py
measures that), one 256-bit key per call; each call relays the key over the three hops (per hop: a pad
and a one-time MAC key taken through the link KMEs, one HTTPS request, the MAC check) and returns once
B stored it. Every answer is checked to hold one 32-byte key.

Figures: ``relay_latency_p50_s``/``p99_s`` per client count, ``relay_keys_per_s`` and the key rate it
sustains in bits (``relay_key_bit_per_s``), to set against the secret-key rate of the slowest link; a
bulk run (:data:`BULK`) shows the rate in bits when requests carry many large keys. All four sites share
this one process and its event loop, so each figure is what ONE core does for the whole path; a real
site does a quarter to a third of that work. Run: ``.venv/bin/python benchmarks/run_all.py network``
(about a minute, most of it filling the stores).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

DURATION_S = float(os.environ.get("QKDSTACK_BENCH_NETWORK_DURATION", "5"))
CLIENTS = (1, 64)
BULK = (8, 28, 8192)
"""The bulk run: 8 clients, each request 28 keys of 8192 bits (one hop message of ~38 kB per hop)."""


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _measure(site, clients: int, duration: float, number: int = 1, size: int = 256) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    stop = time.perf_counter() + duration

    async def client() -> None:
        nonlocal failures
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                answer = await site.enc_keys("SAE_A", "SAE_B", number=number, size=size)
            except Exception:
                failures += 1
                continue
            latencies.append(time.perf_counter() - t0)
            assert len(answer["keys"]) == number and all(len(k["key"]) == (size // 8 + 2) // 3 * 4
                                                         for k in answer["keys"])

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    n = len(latencies)
    return {
        "clients": clients,
        "keys_per_request": number,
        "key_bits": size,
        "requests": n,
        "failures": failures,
        "relay_requests_per_s": round(n / elapsed, 1),
        "relay_keys_per_s": round(n * number / elapsed, 1),
        "relay_key_bit_per_s": round(size * number * n / elapsed, 1),
        "relay_latency_p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "relay_latency_p99_s": round(_percentile(latencies, 0.99), 4) if latencies else None,
    }


async def _main(root: Path) -> dict[str, object]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from _relay_support import LINE, Network
    from qkdstack.kms.etsi014 import tune_gc_for_serving

    # 64 blocks of 2048 chunks per link: 128k chunks of 256 bits, 64k per pool (a bulk request takes 897 a hop)
    async with Network(LINE, root, blocks=64, block_bytes=32 * 2048, hop_timeout_s=30.0).run() as net:
        tune_gc_for_serving()
        site = net.sites["A"]
        await site.enc_keys("SAE_A", "SAE_B")  # warm up connections
        runs = [await _measure(site, c, DURATION_S) for c in CLIENTS]
        clients, number, size = BULK
        runs.append(await _measure(site, clients, min(DURATION_S, 3.0), number, size))
        return {"hops": 3, "duration_s": DURATION_S, "runs": runs}


def run() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(_main(Path(tmp)))


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
