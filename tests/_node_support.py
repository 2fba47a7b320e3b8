"""Shared helpers of the node tests: deployments on free loopback ports, running two nodes, store snapshots.

Nodes run in-process (:class:`~qkdstack.node.service.Node` objects in the test's event loop) or as
``qkdstack node`` subprocesses; either way they talk over real TCP sockets on 127.0.0.1. Frames are
small but key-positive with a margin (5 km, 2.5·10⁷ pulses: phase-error bound about 12 % against the
20 % tolerance, about 60 kbit of secret key per round), so a round takes a couple of seconds. The device
simulation is seeded so that runs are reproducible (the protocol's own randomness is the OS CSPRNG).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import sqlite3
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qkdstack.demo import ephemeral_port_start
from qkdstack.node.config import load_config
from qkdstack.node.deployment import SiteLayout, render_toml, write_deployment
from qkdstack.node.service import Node

DISTANCE_KM = 5.0
PULSES = 25_000_000
LINK_TIMEOUT_S = 15.0
STORE_LINK_ID = "A|B"

_used_ports: set[int] = set()


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(extra: int = 0) -> int:
    """A base port P with P..P+2, P+8..P+13 (the deployment's: links, SKIP, ETSI 014, admin) and P+20..P+20+extra
    free and unused in this run."""
    # below the ephemeral range, where outgoing connections take their source ports (demo.free_port_block)
    top = ephemeral_port_start() - 50 - extra
    for _ in range(500):
        base = random.randrange(10_000, top, 50)
        wanted = [base, base + 1, base + 2, *range(base + 8, base + 14), *range(base + 20, base + 20 + extra)]
        if not _used_ports.intersection(wanted) and all(_free(p) for p in wanted):
            _used_ports.update(wanted)
            return base
    raise RuntimeError("no free loopback ports")


def edit_config(path: Path, **changes: dict[str, Any]) -> None:
    """Rewrite a site.toml with some fields changed: ``edit_config(p, link={"classical": "..."})``."""
    data = tomllib.loads(path.read_text())
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    path.write_text(render_toml(data))


def deploy(
    out: Path,
    bootstrap: str = "psk",
    *,
    rounds: int = 3,
    base_port: int | None = None,
    distance_km: float = DISTANCE_KM,
    pulses: int | None = PULSES,
    seed: int | None = 2026,
    **kwargs: Any,
) -> dict[str, SiteLayout]:
    """A two-site deployment (A transmitter, B receiver) with small frames and a short link timeout.

    ``pulses=None`` keeps ``write_deployment``'s (and ``qkdstack init``'s) frame size.
    """
    layouts = write_deployment(
        out,
        ["A", "B"],
        bootstrap=bootstrap,
        base_port=base_port or free_base_port(),
        distance_km=distance_km,
        **({} if pulses is None else {"pulses_per_frame": pulses}),
        rounds=rounds,
        seed=seed,
        **kwargs,
    )
    for layout in layouts.values():
        edit_config(layout.config, link={"timeout_s": LINK_TIMEOUT_S})
    return layouts


def status(site_dir: Path) -> dict[str, Any]:
    path = site_dir / "data" / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


async def run_nodes(
    configs: list[Path],
    *,
    until: Callable[[list[Node]], bool] | None = None,
    timeout: float = 60.0,
) -> list[Node]:
    """Run nodes in this event loop until ``until(nodes)`` holds (default: every node finished its rounds).

    Then stop them and wait for their shutdown. A node task that fails re-raises here. Raises
    TimeoutError (with the nodes' last statuses) if the condition does not hold within ``timeout``.
    """
    nodes = [Node(load_config(c)) for c in configs]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    cond = until or (lambda ns: all(n.finished for n in ns))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while not cond(nodes):
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if loop.time() > deadline:
                raise TimeoutError(
                    "nodes did not reach the condition in time; statuses: "
                    + json.dumps([status(c.parent) for c in configs], default=str)[:3000]
                )
            await asyncio.sleep(0.1)
    finally:
        for n in nodes:
            n.stop.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return nodes


def store_keys(site_dir: Path) -> dict[str, bytes]:
    """chunk ID -> key bytes of a site's SQLite key store (read directly: a test audit, not an API)."""
    db = site_dir / "data" / "keys.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        return {cid: bytes(m) for cid, m in con.execute("SELECT chunk_id, material FROM qkd_chunks")}


def store_blocks(site_dir: Path) -> set[str]:
    """Block IDs (round IDs of the post-processing) held in a site's key store."""
    db = site_dir / "data" / "keys.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        return {r[0] for r in con.execute("SELECT block_id FROM qkd_blocks")}
