"""ETSI GS QKD 014 key delivery from a node that is generating key (issue 11, item 2).

Two ``qkdstack node`` processes on loopback, as ``qkdstack init`` writes them (25 km, PSK, SQLite,
mutual TLS), run rounds continuously; 64 SAE clients (benchmarks/bench_kms.py's lean keep-alive mTLS
load generator, reused, not copied) send ``enc_keys`` to site A back to back for a fixed time.
Reported: requests/s, p50/p99 latency, errors, the rounds both nodes accepted during the measurement
(so that one can see generation did go on), the nodes' real-time factor and CPU, and the load average
(the machine may be shared: the figures are only as good as the cores the nodes got).

The two key stores are prefilled with the same blocks before the nodes start (as bench_kms does), and
their capacity is raised so that generation never pauses for a full store: the measurement is of
serving *while* generating, not of the key supply (at 25 km a round yields about 500 keys).
Target (issue 11): >= 1,000 requests/s with p99 <= 100 ms.
Run: ``.venv/bin/python benchmarks/run_all.py kms_generating`` (about a minute; the measurement time is
``QKDSTACK_BENCH_KMS_GEN_DURATION``, default 10 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_kms  # noqa: E402 - the load generator of the plain KMS benchmark
from bench_node import start_nodes, stop_nodes  # noqa: E402 - the same two node processes

DURATION_S = float(os.environ.get("QKDSTACK_BENCH_KMS_GEN_DURATION", "10"))
CLIENTS = 64
PREFILL_KEYS = 60_000
"""Keys of 256 bits put in both stores before start: more than the measurement takes at 3,000 req/s."""
WARMUP_TIMEOUT_S = 180.0


def _ports_free(base: int, count: int) -> bool:
    for port in range(base, base + count):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _base_port() -> int:
    for base in range(23100, 60000, 137):
        if _ports_free(base, 16):
            return base
    raise RuntimeError("no free ports on loopback")


async def _prefill(config_path: Path) -> None:
    """Put the same PREFILL_KEYS keys into a site's key store, as the node will open it."""
    from qkdstack.kms.kme import KME, KMEConfig
    from qkdstack.kms.store import LinkLimits, open_store
    from qkdstack.node.config import load_config

    cfg = load_config(config_path)
    k = cfg.kms
    store = open_store(
        "sqlite:///" + str(cfg.resolve(k.store.removeprefix("sqlite:///"))),
        chunk_bits=k.key_size_bits,
        limits=LinkLimits(k.capacity_keys, k.high_water_keys, k.low_water_keys),
    )
    kme = KME(KMEConfig(kme_id=cfg.site.name, peer_kme_id=cfg.site.peer, sae_ids=frozenset(k.sae_ids),
                        key_size=k.key_size_bits), store)
    block_chunks = 8192
    rng = __import__("random").Random(11)  # the same bytes at both sites (benchmark data, not key)
    for i in range(PREFILL_KEYS // block_chunks + 1):
        await kme.add_block(f"prefill-{i}", rng.randbytes(32 * block_chunks))
    await kme.close()
    store.close()


def _status(site_dir: Path) -> dict[str, Any]:
    path = site_dir / "data" / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


async def _probe(url: str, certs: Path) -> bool:
    """One enc_keys request: True once the node delivers keys (its KME peer link is up)."""
    import ssl

    host, port = url.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(certs / "ca_A.pem"))
    ctx.load_cert_chain(str(certs / "SAE_A.pem"), str(certs / "SAE_A.key"))
    try:
        conn = await bench_kms._LeanConnection.open(host, int(port), ctx)
    except OSError:
        return False
    try:
        status, _ = await conn.get("/api/v1/keys/SAE_B/enc_keys")
        return status == 200
    finally:
        await conn.close()


def run() -> dict:
    import tomllib

    from qkdstack.node.deployment import render_toml, write_deployment

    with tempfile.TemporaryDirectory(prefix="qkdstack-bench-kmsgen-") as tmp:
        root = Path(tmp)
        layouts = write_deployment(root / "dep", ["A", "B"], bootstrap="psk", base_port=_base_port())
        for layout in layouts.values():
            data = tomllib.loads(layout.config.read_text())
            data["kms"].update(capacity_keys=2_000_000, high_water_keys=1_900_000, low_water_keys=1_000)
            layout.config.write_text(render_toml(data))
            asyncio.run(_prefill(layout.config))
        a_dir = layouts["A"].config.parent
        certs = root / "certs"  # bench_kms's file names for site A's CA and SAE_A's client certificate
        certs.mkdir()
        (certs / "ca_A.pem").symlink_to(a_dir / "tls" / "ca.pem")
        (certs / "SAE_A.pem").symlink_to(a_dir / "sae" / "SAE_A.pem")
        (certs / "SAE_A.key").symlink_to(a_dir / "sae" / "SAE_A.key")
        procs: dict[str, subprocess.Popen] = {}
        logs: dict[str, Any] = {}
        try:
            start_nodes(layouts, root, procs, logs)
            deadline = time.monotonic() + WARMUP_TIMEOUT_S
            url = None
            while time.monotonic() < deadline:
                st = _status(a_dir)
                url = st.get("etsi014_url")
                if url and st.get("rounds_accepted", 0) >= 2 and bench_kms._run(_probe(url, certs)):
                    break
                if any(p.poll() is not None for p in procs.values()):
                    raise RuntimeError("a node exited during warm-up: " + (root / "A.log").read_text()[-2000:])
                time.sleep(1.0)
            else:
                raise RuntimeError("the nodes did not start delivering keys within the warm-up time")
            before = {s: _status(layouts[s].config.parent) for s in procs}
            cpu0 = {s: bench_kms._cpu_s(p.pid) for s, p in procs.items()}
            t0 = time.monotonic()
            load = bench_kms._run(bench_kms._clients(url, certs, CLIENTS, DURATION_S))
            elapsed = time.monotonic() - t0
            cpu = {s: round(bench_kms._cpu_s(p.pid) - cpu0[s], 2) for s, p in procs.items()}
            time.sleep(0.5)  # the round in flight at the end writes its status
            after = {s: _status(layouts[s].config.parent) for s in procs}
            return {
                "clients": CLIENTS,
                "duration_s": DURATION_S,
                **load,
                "rounds_accepted_during": after["A"].get("rounds_accepted", 0) - before["A"].get("rounds_accepted", 0),
                "real_time_factor_A": after["A"].get("real_time_factor"),
                "node_cpu_s": cpu,
                "elapsed_s": round(elapsed, 2),
                "target": ">= 1000 req/s, p99 <= 100 ms",
                "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                "cpu_count": os.cpu_count(),
            }
        finally:
            stop_nodes(procs, logs)


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
