"""The receiver pairs a session's classical and quantum connections by a session nonce (issue 11, found by the
fault probes): a quantum-channel connection left over from another attempt must not be paired with the next
session's classical connection (every round would then abort, for good)."""

from __future__ import annotations

import asyncio
import secrets

from _node_support import deploy, status
from qkdstack.node.config import load_config, parse_address
from qkdstack.node.service import Node
from qkdstack.transport.tcp import connect


async def test_a_stale_quantum_connection_is_not_paired(tmp_path):
    out = tmp_path / "dep"
    layouts = deploy(out, "psk", rounds=2)
    b = Node(load_config(layouts["B"].config))
    a = Node(load_config(layouts["A"].config))
    tasks = [asyncio.create_task(b.run())]
    host, port = parse_address("link", "quantum", b.cfg.link.quantum)
    stale = await connect(host, port, attempts=200, delay=0.05, timeout=5)  # B listens once it has started
    await stale.send("link.session", nonce=secrets.token_bytes(16))  # another session's quantum connection
    try:
        tasks.append(asyncio.create_task(a.run()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while not (a.finished and b.finished):
            for t in tasks:
                if t.done():
                    t.result()
            assert loop.time() < deadline, [status(out / s) for s in "AB"]
            await asyncio.sleep(0.1)
        for site in "AB":
            st = status(out / site)
            assert st["rounds_accepted"] == 2 and st["rounds_aborted"] == 0, st
            assert st["reconnections"] == 0, st["recent_aborts"]
    finally:
        a.stop.set()
        b.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await stale.close()
