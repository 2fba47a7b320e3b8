"""Key relay on the deployment path: is the relay or the slowest link the bottleneck?

Four ``qkdstack node`` processes on loopback (the line A – R1 – R2 – B of examples/topologies/line4.toml,
every link 25 km, ``init --topology``'s frames, PSK, SQLite) generate key on all three links. After a
warm-up, eight ETSI 014 clients at A take keys for SAE_B (28 keys of 8192 bits per request, relayed over
three hops) and eight at B fetch them by ID, as fast as they are answered, for ``SECONDS``; the links keep
generating all the while. Over that window:

* ``link_key_bit_per_s``: each link's key stored per second of wall time (``stored_bits`` in the sites'
  ``status.json``), and ``slowest_link_bit_per_s``;
* ``relay_key_bit_per_s``: relayed key bits per second (fetched at B), ``relay_p50_s``/``p99_s`` per request,
  ``refused`` (503: no key on the path, or no route);
* ``path_store_keys_start``/``_end``: the stored keys of each link at the window's ends.

The relay keeps up when it delivers at least the slowest link's rate, or when the path's stores run
dry (the relay then waits for key: the link is the bottleneck). All four sites share this 2-core machine,
so the link rates are far below one link's alone. Run: ``.venv/bin/python benchmarks/run_all.py
network_nodes`` (about two minutes).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

SECONDS = float(os.environ.get("QKDSTACK_BENCH_NETWORK_NODES_SECONDS", "40"))
WARMUP_S = 60.0
CLIENTS, NUMBER, SIZE = 8, 28, 8192
TOPOLOGY = {
    "sites": {"A": {"sae": ["SAE_A"]}, "R1": {}, "R2": {}, "B": {"sae": ["SAE_B"]}},
    "links": [{"transmitter": "A", "receiver": "R1", "distance_km": 25},
              {"transmitter": "R1", "receiver": "R2", "distance_km": 25},
              {"transmitter": "R2", "receiver": "B", "distance_km": 25}],
}


def _links(layouts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from qkdstack.demo import site_status

    """Each link's status document, as its transmitter reports it (by ``A->R1``)."""
    out = {}
    for tx, rx in (("A", "R1"), ("R1", "R2"), ("R2", "B")):
        for doc in (site_status(layouts[tx]) or {}).get("links") or []:
            if doc.get("peer") == rx:
                out[f"{tx}->{rx}"] = doc
    return out


async def _load(layouts: dict[str, Any], seconds: float) -> dict[str, Any]:
    from qkdstack.demo_network import sae_client

    latencies: list[float] = []
    refused = 0
    reasons: Counter[str] = Counter()
    fetched_bits = 0
    stop = time.monotonic() + seconds

    async def one(master: Any, slave: Any) -> None:
        nonlocal refused, fetched_bits
        while time.monotonic() < stop:
            t0 = time.monotonic()
            answer = await master.post("SAE_B/enc_keys", json={"number": NUMBER, "size": SIZE})
            if answer.status_code != 200:
                refused += 1
                reasons[f"{answer.status_code} {answer.json().get('message', '')[:120]}"] += 1
                await asyncio.sleep(0.2)
                continue
            latencies.append(time.monotonic() - t0)
            keys = answer.json()["keys"]
            got = await slave.post("SAE_A/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]})
            assert got.status_code == 200, got.text
            assert [k["key"] for k in got.json()["keys"]] == [k["key"] for k in keys]
            fetched_bits += sum(8 * len(base64.b64decode(k["key"])) for k in keys)

    masters = [sae_client(layouts["A"], "SAE_A") for _ in range(CLIENTS)]
    slaves = [sae_client(layouts["B"], "SAE_B") for _ in range(CLIENTS)]
    start = time.monotonic()
    try:
        await asyncio.gather(*(one(m, s) for m, s in zip(masters, slaves, strict=True)))
    finally:
        for c in masters + slaves:
            await c.aclose()
    elapsed = time.monotonic() - start
    latencies.sort()
    return {
        "relay_key_bit_per_s": fetched_bits / elapsed,
        "relay_requests": len(latencies),
        "relay_p50_s": statistics.median(latencies) if latencies else None,
        "relay_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "refused": refused,
        "refusals": dict(reasons.most_common(5)),
        "seconds": elapsed,
    }


def run() -> dict[str, Any]:
    from qkdstack.demo import free_port_block, start_nodes, stop_nodes
    from qkdstack.network.topology import parse_topology
    from qkdstack.node.deployment import network_ports, write_network_deployment

    topology = parse_topology(TOPOLOGY, "bench")
    links, sites = network_ports(topology, 1)
    span = sum(len(g) for g in (*links.values(), *sites.values()))
    with tempfile.TemporaryDirectory() as tmp:
        layouts = write_network_deployment(topology, Path(tmp) / "net", base_port=free_port_block(span))
        procs = start_nodes(layouts, list(layouts))
        try:
            deadline = time.monotonic() + WARMUP_S + 120
            while len([d for d in _links(layouts).values() if d.get("rounds_accepted")]) < 3:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"links not up: {_links(layouts)}")
                time.sleep(1.0)
            time.sleep(WARMUP_S / 2)
            before = _links(layouts)
            t0 = time.monotonic()
            load = asyncio.run(_load(layouts, SECONDS))
            after = _links(layouts)
            window = time.monotonic() - t0
        finally:
            stop_nodes(procs)
    rates = {name: (after[name]["stored_bits"] - before[name]["stored_bits"]) / window for name in after}
    slowest = min(rates.values())
    return {
        "distance_km": 25,
        "clients": CLIENTS,
        "keys_per_request": NUMBER,
        "key_bits": SIZE,
        "link_key_bit_per_s": rates,
        "slowest_link_bit_per_s": slowest,
        **load,
        "path_store_keys_start": {n: (d.get("store") or {}).get("stored_keys") for n, d in before.items()},
        "path_store_keys_end": {n: (d.get("store") or {}).get("stored_keys") for n, d in after.items()},
        "relay_over_slowest_link": load["relay_key_bit_per_s"] / slowest if slowest else None,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
