"""``qkdstack demo --topology FILE``: a whole QKD network on loopback, keys relayed through trusted nodes.

1. Every site of the topology is written (``init --topology``'s writer) and started as its own
   ``qkdstack node`` process; each link's first accepted round is shown as the link comes up.
2. The two SAEs farthest apart take keys over ETSI 014: the master's KME relays each key hop by hop
   (one-time pad + one-time MAC from each hop's QKD key; docs/network.md), the slave fetches it by ID,
   and the demo checks that both got the same bytes and shows the path the key took.
3. One relay node on that path is killed (SIGKILL, as a failure would); the next keys go another way
   if the topology has one (a ring does), and are checked the same way.
4. A summary: links, keys relayed, paths, wall time.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import signal
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from qkdstack.demo import free_port_block, log_tail, say, site_status, start_nodes, stop_nodes
from qkdstack.errors import QKDError
from qkdstack.network.site_kme import PATH_EXTENSION as RELAY_PATH_EXTENSION
from qkdstack.network.topology import Topology, load_topology
from qkdstack.node.deployment import SiteLayout, most_distant_sae_sites, network_ports, write_network_deployment


@dataclass(frozen=True)
class NetworkDemoOptions:
    topology: str
    rounds: int = 2
    keys: int = 4
    pulses_per_frame: int | None = None
    """None: each link's frame follows its own distance (as ``init --topology``)."""
    timeout_s: float = 600.0


@dataclass
class NetworkDemoResult:
    links_up: int = 0
    links: int = 0
    keys_relayed: int = 0
    keys_match: bool = True
    paths: list[list[str]] = field(default_factory=list)
    rerouted: bool | None = None
    """Keys went another way after a relay node was killed (None: the topology has no relay to kill)."""
    wall_s: float = 0.0


def sae_client(layout: SiteLayout, sae: str) -> httpx.AsyncClient:
    """An ETSI 014 client for ``sae`` at ``layout``'s site (its certificate, mutual TLS)."""
    cert, key = layout.sae_cert(sae)
    ctx = ssl.create_default_context(cafile=str(layout.ca))
    ctx.load_cert_chain(str(cert), str(key))
    return httpx.AsyncClient(base_url=f"{layout.etsi_url}/api/v1/keys/", verify=ctx, timeout=60)


async def _wait_links(layouts: dict[str, SiteLayout], procs: dict[str, Any], topology: Topology,
                      opts: NetworkDemoOptions, result: NetworkDemoResult) -> None:
    """Print each link as its first round is accepted and its KME peer link is up; until all are."""
    shown: set[str] = set()
    result.links = len(topology.links)
    deadline = time.monotonic() + opts.timeout_s
    while len(shown) < len(topology.links):
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise QKDError(f"site {name} exited with code {proc.returncode}:\n{log_tail(layouts[name])}")
        for link in topology.links:
            if link.link_id in shown:
                continue
            status = site_status(layouts[link.transmitter]) or {}
            doc = next((d for d in status.get("links") or [] if d.get("peer") == link.receiver), None)
            if not doc or not doc.get("kme_link_up") or not (doc.get("store") or {}).get("stored_keys"):
                continue
            last = doc.get("last_round") or {}
            shown.add(link.link_id)
            say(f"  link {link.transmitter} -> {link.receiver} up: {link.device.get('distance_km', '?')} km, "
                f"QBER {100 * float(last.get('qber_z') or 0):.2f} %, {doc.get('secret_bits', 0)} bits of key, "
                f"{doc['store']['stored_keys']} keys stored")
        if time.monotonic() > deadline:
            raise QKDError(f"links not up within {opts.timeout_s:.0f} s")
        await asyncio.sleep(0.5)
    result.links_up = len(shown)


async def _relay(layouts: dict[str, SiteLayout], master: str, slave: str, opts: NetworkDemoOptions,
                 result: NetworkDemoResult) -> list[str]:
    """Keys for the slave SAE at the far site: taken at the master's KME, fetched by ID at the slave's."""
    sae_m, sae_s = layouts[master].sae_ids[0], layouts[slave].sae_ids[0]
    async with sae_client(layouts[master], sae_m) as m, sae_client(layouts[slave], sae_s) as s:
        deadline = time.monotonic() + 60
        while True:
            answer = await m.post(f"{sae_s}/enc_keys", json={"number": opts.keys, "size": 256,
                                                             "extension_optional": [{RELAY_PATH_EXTENSION: True}]})
            if answer.status_code == 200:
                break
            if time.monotonic() > deadline:
                raise QKDError(f"enc_keys at {master} kept failing: {answer.status_code} {answer.text}")
            await asyncio.sleep(1.0)
        taken = answer.json()["keys"]
        got = await s.post(f"{sae_m}/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in taken]})
        if got.status_code != 200:
            raise QKDError(f"dec_keys at {slave} failed: {got.status_code} {got.text}")
    same = [base64.b64decode(k["key"]) for k in taken] == [base64.b64decode(k["key"]) for k in got.json()["keys"]]
    path = list((taken[0].get("key_extension") or {}).get(RELAY_PATH_EXTENSION) or [master, slave])
    result.keys_relayed += len(taken)
    result.keys_match &= same
    result.paths.append(path)
    say(f"  {sae_m} at {master} took {len(taken)} keys for {sae_s}; relayed {' -> '.join(path)}; {sae_s} at "
        f"{slave} fetched them by ID: {'identical' if same else 'DIFFERENT'}")
    say(f"      key_ID {taken[0]['key_ID']}")
    return path


async def run_network_demo(opts: NetworkDemoOptions) -> NetworkDemoResult:
    start = time.monotonic()
    topology = load_topology(opts.topology)
    pair = most_distant_sae_sites(topology)
    if pair is None:
        raise QKDError(f"{opts.topology}: the demo needs SAEs at two sites")
    links, sites = network_ports(topology, 1)
    span = sum(len(g) for g in (*links.values(), *sites.values()))
    workdir = Path(tempfile.mkdtemp(prefix="qkdstack-network-demo-"))
    result = NetworkDemoResult()
    say(f"qkdstack demo: a QKD network of {len(topology.sites)} sites and {len(topology.links)} links on loopback "
        f"({opts.topology})")
    layouts = write_network_deployment(topology, workdir, base_port=free_port_block(span), rounds=opts.rounds,
                                       pulses_per_frame=opts.pulses_per_frame)
    procs = start_nodes(layouts, list(layouts))
    try:
        say(f"  {len(procs)} site processes started; deployment in {workdir}")
        await _wait_links(layouts, procs, topology, opts, result)
        master, slave = pair
        path = await _relay(layouts, master, slave, opts, result)
        relays = path[1:-1]
        if relays:
            victim = relays[0]
            say(f"  relay node {victim} killed (SIGKILL)")
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            del procs[victim]
            try:
                new_path = await _relay(layouts, master, slave, opts, result)
                result.rerouted = victim not in new_path
            except QKDError as exc:
                say(f"  no other path without {victim}: {exc}")
                result.rerouted = False
    finally:
        stop_nodes(procs)
        shutil.rmtree(workdir, ignore_errors=True)
    result.wall_s = time.monotonic() - start
    say(_summary(result))
    return result


def _summary(result: NetworkDemoResult) -> str:
    lines = ["", "summary",
             f"  links up                  {result.links_up} of {result.links}",
             f"  keys relayed              {result.keys_relayed}, identical at both ends: {result.keys_match}",
             *(f"  path {i + 1}                    {' -> '.join(p)}" for i, p in enumerate(result.paths))]
    if result.rerouted is not None:
        lines.append(f"  rerouted after the kill   {result.rerouted}")
    lines.append(f"  wall time                 {result.wall_s:.1f} s")
    return "\n".join(lines)


def network_demo_ok(result: NetworkDemoResult) -> bool:
    return bool(result.keys_relayed and result.keys_match and result.rerouted is not False)
