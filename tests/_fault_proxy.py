"""Fault injection between two node processes: a small asyncio TCP proxy and a two-site harness.

Used by tests/test_faults.py (short, in CI) and scripts/fault_probe.py (long, outside CI).

The proxy listens on one loopback port and forwards each accepted connection to the target,
connecting upstream at once, so the order of connections (classical before quantum) is kept.
Faults act on the connections open at the time, as a broken network would:

* :meth:`FaultProxy.drop`: on the open connections, bytes in both directions are read and thrown
  away from now on (a black hole, as a dead route leaves them: both ends stay connected and hear
  nothing, only timeouts can tell); new connections pass;
* ``delay_s``: every chunk waits this long before it is forwarded (latency, both directions);
* :meth:`FaultProxy.reset`: both sockets are aborted (RST to each end);
* :meth:`FaultProxy.half_close`: one direction is shut (the far end reads EOF) while the other
  direction and both sockets stay open, as a half-dead middlebox leaves them;
* ``refuse``: new connections are closed as soon as they are accepted.

:meth:`FaultProxy.heal` ends latency and refusals; connections a fault broke stay broken and the
nodes must reconnect through the proxy on their own.

:class:`TwoSites` runs the two sites of a test deployment as real ``qkdstack node`` processes
(site A the transmitter, B the receiver), optionally with A's three link connections through
proxies, and checks what the fault tests need: both processes alive, keys that flow (an SAE takes a
key at A over ETSI 014 and the peer SAE gets the same bytes at B), and stores that agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _node_support import deploy, edit_config, free_base_port
from qkdstack.apps.keysource import Etsi014Client
from qkdstack.errors import QKDError


class _Pair:
    """One proxied connection: the client-side and the upstream-side streams."""

    def __init__(self, proxy: FaultProxy, client: tuple, upstream: tuple) -> None:
        self.proxy = proxy
        self.dropping = False
        (self.c_reader, self.c_writer), (self.u_reader, self.u_writer) = client, upstream
        self.tasks = [
            asyncio.create_task(self._pump(self.c_reader, self.u_writer)),
            asyncio.create_task(self._pump(self.u_reader, self.c_writer)),
        ]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.proxy.delay_s:
                    await asyncio.sleep(self.proxy.delay_s)
                if self.dropping:
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, RuntimeError, asyncio.IncompleteReadError):
            pass
        finally:
            # EOF (or an error) one way: pass the EOF on, and once both ways are done, close.
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()
            if all(t.done() or t is asyncio.current_task() for t in self.tasks):
                self.close()

    def abort(self) -> None:
        for w in (self.c_writer, self.u_writer):
            with contextlib.suppress(Exception):
                w.transport.abort()

    def half_close(self, toward: str) -> None:
        """Shut the direction that reaches ``toward`` ("client" or "upstream"): that end reads EOF."""
        writer = self.c_writer if toward == "client" else self.u_writer
        pump = self.tasks[1] if toward == "client" else self.tasks[0]
        pump.cancel()
        with contextlib.suppress(Exception):
            writer.write_eof()

    def close(self) -> None:
        for w in (self.c_writer, self.u_writer):
            with contextlib.suppress(Exception):
                w.close()
        self.proxy.pairs.discard(self)


class FaultProxy:
    """Forward ``listen_port`` on 127.0.0.1 to ``target_port``, with faults on demand (see module doc)."""

    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.listen_port = listen_port
        self.target_port = target_port
        self.delay_s = 0.0
        self.refuse = False
        self.accepted = 0
        self.pairs: set[_Pair] = set()
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"FaultProxy({self.listen_port}->{self.target_port}, open={len(self.pairs)})"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._on_connect, self.host, self.listen_port)
        return self

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refuse:
            writer.transport.abort()
            return
        try:
            upstream = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()  # the target is down: the client sees the connection fail
            return
        self.pairs.add(_Pair(self, (reader, writer), upstream))

    def drop(self) -> int:
        """Black-hole the open connections for good (new ones pass); returns how many."""
        pairs = list(self.pairs)
        for p in pairs:
            p.dropping = True
        return len(pairs)

    def reset(self) -> int:
        """Abort every open connection at both ends; returns how many."""
        pairs = list(self.pairs)
        for p in pairs:
            p.abort()
        return len(pairs)

    def half_close(self, toward: str = "upstream") -> int:
        """Send EOF toward one end of every open connection, leaving the other direction open."""
        pairs = list(self.pairs)
        for p in pairs:
            p.half_close(toward)
        return len(pairs)

    def heal(self) -> None:
        self.refuse = False
        self.delay_s = 0.0

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for p in list(self.pairs):
            p.abort()
            for t in p.tasks:
                t.cancel()
        for p in list(self.pairs):
            for t in p.tasks:
                with contextlib.suppress(BaseException):
                    await t
        self.pairs.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


# ------------------------------------------------------------------------------------ two sites

CONNECTIONS = ("classical", "quantum", "kms")
AVAILABLE, ERASED = 0, 2  # qkdstack.kms.store.AVAILABLE, ERASED


class KeyMismatch(AssertionError):
    """The slave SAE got other bytes than the master SAE under the same key ID."""


class TwoSites:
    """Sites A (transmitter) and B (receiver) as ``qkdstack node`` processes on loopback.

    ``proxied``: A reaches B's three link ports through :class:`FaultProxy` objects (``self.proxies``
    by connection name; start them with :meth:`start_proxies` in the event loop that runs the test).
    ``kms``: extra ``[kms]`` fields (capacity marks, ...). Logs go to ``<out>/<site>.log``.
    """

    def __init__(
        self,
        out: Path,
        *,
        proxied: bool = False,
        timeout_s: float = 2.0,
        kms: dict[str, Any] | None = None,
        protocol: dict[str, Any] | None = None,
    ) -> None:
        self.out = out
        base = free_base_port(extra=3 if proxied else 0)
        self.layouts = deploy(out, "psk", rounds=0, base_port=base)
        for site in "AB":
            edit_config(self.layouts[site].config, link={"timeout_s": timeout_s},
                        **({"kms": kms} if kms else {}), **({"protocol": protocol} if protocol else {}))
        self.proxies: dict[str, FaultProxy] = {}
        if proxied:
            edit_config(self.layouts["A"].config, link={name: f"127.0.0.1:{base + 20 + i}"
                                                        for i, name in enumerate(CONNECTIONS)})
            self.proxies = {name: FaultProxy(base + 20 + i, base + i) for i, name in enumerate(CONNECTIONS)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts = {"A": 0, "B": 0}
        self._clients: dict[str, Etsi014Client] = {}

    # -- processes

    async def start_proxies(self) -> None:
        for proxy in self.proxies.values():
            await proxy.start()

    def start(self, site: str) -> None:
        assert site not in self.procs or self.procs[site].poll() is not None, f"{site} is running"
        log = open(self.out / f"{site}.log", "ab")  # noqa: SIM115 - the process holds it; closed in stop()
        self.procs[site] = subprocess.Popen(
            [str(Path(sys.executable).with_name("qkdstack")), "node", "--config", str(self.layouts[site].config)],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        log.close()
        self.starts[site] += 1

    def kill(self, site: str) -> None:
        """SIGKILL: no cleanup of any kind, as a power cut or the OOM killer would stop the node."""
        proc = self.procs[site]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def alive(self, site: str) -> bool:
        return site in self.procs and self.procs[site].poll() is None

    def pid(self, site: str) -> int:
        return self.procs[site].pid

    def stop(self) -> dict[str, int | None]:
        """SIGTERM both nodes and wait; returns their exit codes (None: had to be killed)."""
        codes: dict[str, int | None] = {}
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for site, proc in self.procs.items():
            try:
                codes[site] = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[site] = None
        return codes

    async def close(self) -> dict[str, int | None]:
        """Stop everything this harness started: SAE clients, nodes, proxies. Returns the nodes' exit codes."""
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        self._clients.clear()
        codes = self.stop()
        for proxy in self.proxies.values():
            await proxy.close()
        return codes

    def log(self, site: str) -> str:
        path = self.out / f"{site}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self, site: str) -> dict[str, Any]:
        path = self.out / site / "data" / "status.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    # -- keys

    def _client(self, site: str) -> Etsi014Client:
        if site not in self._clients:
            lay, peer = self.layouts[site], "B" if site == "A" else "A"
            cert, key = lay.sae_cert(f"SAE_{site}")
            self._clients[site] = Etsi014Client(lay.etsi_url, f"SAE_{peer}", str(cert), str(key), str(lay.ca),
                                                timeout_s=5.0)
        return self._clients[site]

    async def key_roundtrip(self, number: int = 1, master: str = "A") -> list[str]:
        """SAE_A takes ``number`` keys at A (enc_keys), SAE_B fetches them at B (dec_keys); the bytes must match.

        ``master="B"``: the other way round (each KME serves masters from its own half of the store).
        Returns the key IDs. QKDError (503, unreachable KME, ...) passes through; KeyMismatch if bytes differ.
        """
        slave = "B" if master == "A" else "A"
        masters = await self._client(master).get_new_keys(number, 256)
        slaves = await self._client(slave).get_keys_by_id([k.key_id for k in masters])
        if [(k.key_id, k.key) for k in slaves] != [(k.key_id, k.key) for k in masters]:
            raise KeyMismatch("the slave SAE got other keys than the master SAE")
        return [k.key_id for k in masters]

    async def wait_keys_flow(self, timeout: float = 30.0, *, after: dict[str, int] | None = None) -> list[str]:
        """Retry :meth:`key_roundtrip` until it works, and, with ``after``, only once each named site's
        ``rounds_accepted`` exceeds the given count (fresh rounds, not only keys made before a fault)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for site in "AB":
                if site in self.procs and not self.alive(site):
                    raise AssertionError(f"node {site} exited with {self.procs[site].returncode}:\n"
                                         + self.log(site)[-3000:])
            if all(self.status(s).get("rounds_accepted", 0) > n for s, n in (after or {}).items()):
                try:
                    return await self.key_roundtrip()
                except QKDError as exc:
                    last = exc
            await asyncio.sleep(0.2)
        raise TimeoutError(f"no key flowed within {timeout} s (last error: {last}); statuses: "
                           + json.dumps([self.status(s) for s in "AB"], default=str)[:2500])

    def rounds(self, site: str) -> int:
        return int(self.status(site).get("rounds_accepted", 0))

    # -- stores

    def _chunks(self, site: str) -> tuple[dict[str, tuple[int, bytes | None]], set[str]]:
        db = self.out / site / "data" / "keys.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as con:
            chunks = {cid: (state, None if m is None else bytes(m))
                      for cid, state, m in con.execute("SELECT chunk_id, state, material FROM qkd_chunks")}
            blocks = {r[0] for r in con.execute("SELECT block_id FROM qkd_blocks")}
        return chunks, blocks

    def stored_keys(self, site: str) -> int:
        """Chunks held (available or reserved) in a site's store, read now (status.json is written per round)."""
        return sum(1 for state, _ in self._chunks(site)[0].values() if state != ERASED)

    def store_disagreement(self) -> str | None:
        """None if the stores agree, else why: on the blocks both hold, a chunk available at one site only
        or different bytes; or more than two blocks (those in flight at the moment of reading) at one site only."""
        (ca, ba), (cb, bb) = self._chunks("A"), self._chunks("B")
        if len(ba ^ bb) > 2:
            return f"{len(ba - bb)} blocks only at A, {len(bb - ba)} only at B"
        for cid in set(ca) & set(cb):
            (sa, ma), (sb, mb) = ca[cid], cb[cid]
            if (sa == AVAILABLE) != (sb == AVAILABLE):
                return f"chunk {cid} is available at {'A' if sa == AVAILABLE else 'B'} only"
            if ma is not None and mb is not None and ma != mb:
                return f"chunk {cid} holds different bytes at the two sites"
        return None

    async def wait_stores_agree(self, timeout: float = 15.0) -> None:
        """Poll until the stores agree (a reservation cut by a fault is discarded at both sites on resync)."""
        deadline = time.monotonic() + timeout
        why = self.store_disagreement()
        while why is not None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the stores disagree: {why}")
            await asyncio.sleep(0.3)
            why = self.store_disagreement()
