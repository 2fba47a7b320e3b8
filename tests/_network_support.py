"""Shared helpers of the network tests: a topology's deployment on free ports, its site processes, ETSI 014 calls.

Every site runs as a ``qkdstack node`` subprocess (the real deployment path); the tests talk to the
sites' ETSI 014 servers over mutual TLS with httpx, as any stock client would. Frames are small and
the links short (5 km, 2.5·10⁷ pulses per frame), and each link stops generating after a few rounds
so that the CPU is free for the relays under test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from _node_support import _free
from qkdstack.demo import ephemeral_port_start
from qkdstack.network.topology import Topology, load_topology
from qkdstack.node.deployment import SiteLayout, network_ports, write_network_deployment

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "topologies"
PULSES = 25_000_000
DISTANCE_KM = 5.0


def free_base_port(topology: Topology) -> int:
    """A base port whose whole block (links and sites, :func:`network_ports`) is free on loopback."""
    # below the ephemeral range, where outgoing connections take their source ports (demo.free_port_block)
    top = ephemeral_port_start()
    for _ in range(300):
        base = random.randrange(10_000, top - 1_000, 100)
        links, sites = network_ports(topology, base)
        ports = [p for group in (*links.values(), *sites.values()) for p in group.values()]
        if max(ports) < top and all(_free(p) for p in ports):
            return base
    raise RuntimeError("no free loopback ports")


def deploy(topology_file: Path, out: Path, *, rounds: int = 3, bootstrap: str = "psk") -> dict[str, SiteLayout]:
    topology = load_topology(topology_file)
    return write_network_deployment(topology, out, bootstrap=bootstrap, base_port=free_base_port(topology),
                                    distance_km=DISTANCE_KM, pulses_per_frame=PULSES, rounds=rounds)


def start_site(layout: SiteLayout, *, prefix: list[str] | None = None) -> subprocess.Popen:
    log = open(layout.config.parent / "node.log", "ab")  # noqa: SIM115 (kept open for the process's life)
    return subprocess.Popen([*(prefix or []), sys.executable, "-m", "qkdstack.cli", "node", "--config",
                             str(layout.config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_site(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def running(layouts: dict[str, SiteLayout], **kwargs: Any) -> Iterator[dict[str, subprocess.Popen]]:
    """Every site of ``layouts`` as a node process; all stopped on the way out, whatever happened."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, layout in layouts.items():
            procs[name] = start_site(layout, **kwargs)
        yield procs
    finally:
        for proc in procs.values():
            stop_site(proc)


def site_status(layout: SiteLayout) -> dict[str, Any]:
    path = layout.config.parent / "data" / "status.json"
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        return json.loads(path.read_text())
    return {}


def log_tail(layout: SiteLayout, lines: int = 25) -> str:
    with contextlib.suppress(FileNotFoundError):
        return "\n".join((layout.config.parent / "node.log").read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_links_up(layouts: dict[str, SiteLayout], procs: dict[str, subprocess.Popen], *, timeout: float = 180,
                  sites: list[str] | None = None) -> None:
    """Until every link of the named sites has stored key and its KME peer link is up."""
    deadline = time.monotonic() + timeout
    names = sites or list(layouts)
    while True:
        for name in names:
            if procs[name].poll() is not None:
                raise AssertionError(f"site {name} exited with {procs[name].returncode}:\n{log_tail(layouts[name])}")
        pending = []
        for name in names:
            links = site_status(layouts[name]).get("links") or []
            if not links:
                pending.append(f"{name}: no status yet")
            for link in links:
                if not link.get("kme_link_up") or not (link.get("store") or {}).get("stored_keys"):
                    pending.append(f"{name}-{link.get('peer')}")
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"links not up within {timeout:.0f} s: {pending}\n"
                                 + "\n".join(log_tail(layouts[n], 8) for n in names))
        time.sleep(0.5)


def etsi_client(layout: SiteLayout, sae: str, timeout: float = 30.0) -> httpx.Client:
    """An httpx client for ``sae`` at ``layout``'s site, with the SAE's certificate (mutual TLS)."""
    cert, key = layout.sae_cert(sae)
    ctx = ssl.create_default_context(cafile=str(layout.ca))
    ctx.load_cert_chain(str(cert), str(key))
    return httpx.Client(base_url=f"{layout.etsi_url}/api/v1/keys/", verify=ctx, timeout=timeout)


def enc_keys(client: httpx.Client, slave: str, number: int = 1, *, busy_s: float = 20.0, **body: Any) -> httpx.Response:
    """ETSI 014 enc_keys; a 503 (the KME cannot serve *now*, e.g. no route known yet) is retried for ``busy_s``."""
    deadline = time.monotonic() + busy_s
    while True:
        answer = client.post(f"{slave}/enc_keys", json={"number": number, "size": 256, **body})
        if answer.status_code != 503 or time.monotonic() > deadline:
            return answer
        time.sleep(0.5)


def dec_keys(client: httpx.Client, master: str, key_ids: list[str]) -> httpx.Response:
    return client.post(f"{master}/dec_keys", json={"key_IDs": [{"key_ID": k} for k in key_ids]})


def keys_of(response: httpx.Response) -> dict[str, bytes]:
    assert response.status_code == 200, response.text
    return {k["key_ID"]: base64.b64decode(k["key"]) for k in response.json()["keys"]}
