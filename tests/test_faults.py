"""Fault injection on loopback: a node survives its peer and the network, and keys flow again after each fault.

Two real ``qkdstack node`` processes (tests/_fault_proxy.py: :class:`TwoSites`) with small frames and a
short ``[link] timeout_s``; faults: SIGKILL of either node while rounds run and an SAE takes keys, a proxy
that black-holes, delays, resets and half-closes each of the three connections (classical, quantum, KME
peer link), and idle periods longer than every timeout (the store full, no SAE traffic). After each fault
an SAE takes a key at A over ETSI 014 and the peer SAE gets the same bytes at B, and the two stores agree.
A fatal condition (an exhausted authentication pool) ends both processes with exit 1, never 0. The KME
peer link's keepalive is also tested on its own over a TCP pair. The long version (100+ fault cycles) is
scripts/fault_probe.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import secrets
import subprocess
import time

import pytest

from _fault_proxy import CONNECTIONS, KeyMismatch, TwoSites
from _node_support import edit_config, run_nodes
from qkdstack.errors import ChannelError, QKDError
from qkdstack.node.kms_link import KmsPeerLink
from qkdstack.transport.tcp import TcpChannel, connect, serve

TIMEOUT_S = 3.0
"""``[link] timeout_s`` of the fault tests: short, so idle periods and black holes are detected quickly, but
above the longest time a node's event loop is busy in a round on a loaded two-core machine."""


# ------------------------------------------------------------------------- KME peer link keepalive


async def _kms_link_pair(*, channel_timeout: float, keepalive_s: float | None, request_timeout: float = 5.0):
    accepted: asyncio.Queue[TcpChannel] = asyncio.Queue()
    done = asyncio.Event()

    async def handler(ch: TcpChannel) -> None:
        await accepted.put(ch)
        await done.wait()

    server = await serve("127.0.0.1", 0, handler, timeout=channel_timeout)
    client = await connect("127.0.0.1", server.sockets[0].getsockname()[1], timeout=channel_timeout)
    peer = await accepted.get()

    async def answer(msg):
        return {"ok": True, "echo": msg.get("n")}

    link_keys = {7: secrets.token_bytes(32)}
    a = KmsPeerLink(client, True, answer, timeout=request_timeout, keepalive_s=keepalive_s)
    b = KmsPeerLink(peer, False, answer, timeout=request_timeout, keepalive_s=keepalive_s)
    await asyncio.gather(a.handshake(link_keys), b.handshake(link_keys))

    async def close() -> None:
        await a.close()
        await b.close()
        done.set()
        server.close()

    return a, b, close


async def test_kms_link_stays_up_when_idle_past_the_timeout():
    """Authenticated pings keep an idle KME peer link open past the read timeout; a request then just works."""
    a, b, close = await _kms_link_pair(channel_timeout=0.5, keepalive_s=0.1)
    try:
        await asyncio.sleep(1.6)  # three times the read timeout without a request
        assert not a.closed.is_set() and not b.closed.is_set()
        assert a.pings_sent > 0 and b.pings_sent > 0
        assert (await a.request({"n": 5}))["echo"] == 5
        assert (await b.request({"n": 6}))["echo"] == 6
    finally:
        await close()
    # Without keepalives the same idle period closes the link (what made enc_keys fail with 503 after 60 s).
    a, b, close = await _kms_link_pair(channel_timeout=0.5, keepalive_s=None)
    try:
        await asyncio.sleep(1.6)
        assert a.closed.is_set() and b.closed.is_set()
        with pytest.raises(ChannelError):
            await a.request({"n": 1})
    finally:
        await close()


async def test_kms_link_closes_when_pings_go_unanswered():
    """A peer that holds the connection open but no longer answers (hung) is detected by the pings alone."""
    a, b, close = await _kms_link_pair(channel_timeout=30.0, keepalive_s=0.1, request_timeout=0.3)
    try:
        b._reader.cancel()  # B stops reading (and answering) but keeps its socket open
        b._pinger.cancel()
        await asyncio.wait_for(a.closed.wait(), 3.0)  # well before the 30 s read timeout
    finally:
        await close()


# ---------------------------------------------------------------------------------- helpers


async def _sae_traffic(sites: TwoSites, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """An SAE pair taking keys continuously (errors such as 503 while a node is down are expected)."""
    while not stop.is_set():
        try:
            await sites.key_roundtrip()
            counts["keys"] += 1
        except KeyMismatch:
            counts["mismatches"] += 1
        except QKDError:
            counts["errors"] += 1
            await asyncio.sleep(0.05)


AUTHENTICATED = r"peer \w+ authenticated"
"""The log line of a session's entity authentication (one per session)."""
LINK_UP = r"KME peer link to \w+ up"


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


# ----------------------------------------------------------------- network faults, then SIGKILL


async def _proxy_fault(sites: TwoSites, connection: str, fault: str) -> None:
    """One fault on one connection; the node reconnects through the proxy (but after mere latency) and keys
    flow again: fresh rounds after the reconnection, unless only the KME link was hit, and an SAE key."""
    proxy = sites.proxies[connection]
    accepted = proxy.accepted
    if fault == "drop":  # silence: only the timeouts (and the KME link's pings) can tell
        assert proxy.drop() >= 1, f"no open {connection} connection to black-hole"
    elif fault == "delay":
        proxy.delay_s = 0.3
        await asyncio.sleep(1.0)
        proxy.heal()
    elif fault == "reset":
        assert proxy.reset() >= 1, f"no open {connection} connection to reset"
    else:
        assert proxy.half_close("upstream") >= 1, f"no open {connection} connection to half-close"
    if fault != "delay":  # latency alone need not break anything; every other fault forces a reconnection
        deadline = time.monotonic() + 30
        while proxy.accepted == accepted:
            assert time.monotonic() < deadline, f"no reconnection through the {connection} proxy after {fault}"
            await asyncio.sleep(0.1)
    rounds = {s: sites.rounds(s) for s in "AB"}
    await sites.wait_keys_flow(60, after=rounds if connection != "kms" else None)


async def _sigkill(sites: TwoSites, victim: str, rng: random.Random, counts: dict[str, int]) -> None:
    """kill -9 of ``victim`` while rounds run and an SAE pair takes keys; the other node must stay up and
    reconnect once the victim is restarted."""
    survivor = "A" if victim == "B" else "B"
    survivor_pid = sites.pid(survivor)
    stop = asyncio.Event()
    traffic = asyncio.create_task(_sae_traffic(sites, stop, counts))
    await asyncio.sleep(rng.uniform(0.3, 1.5))  # rounds and deliveries in flight
    sites.kill(victim)
    await asyncio.sleep(0.5)
    stop.set()
    await traffic
    await asyncio.sleep(1.0)  # the survivor keeps trying; it must not exit meanwhile
    assert sites.alive(survivor) and sites.pid(survivor) == survivor_pid, sites.log(survivor)[-3000:]
    authenticated = _count(AUTHENTICATED, sites.log(survivor))
    rounds = sites.rounds(survivor)
    sites.start(victim)
    await sites.wait_keys_flow(60, after={survivor: rounds})
    assert sites.alive(survivor) and sites.pid(survivor) == survivor_pid
    assert _count(AUTHENTICATED, sites.log(survivor)) > authenticated  # a new session with the restarted node


async def test_network_faults_on_each_connection_then_sigkill_of_either_node(tmp_path):
    """One deployment, A's three connections through fault proxies. For the classical, quantum and KME-link
    connection in turn: a black hole past the timeout, latency, a reset, a half-close. Then kill -9 of B and
    of A while rounds run and an SAE pair takes keys. After every fault both nodes (but a killed one) are the
    same processes, keys flow again, a killed node's peer reconnected to its restart, the stores agree; and a
    SIGTERM at the end is the only exit 0."""
    sites = TwoSites(tmp_path / "dep", proxied=True, timeout_s=TIMEOUT_S)
    counts = {"keys": 0, "errors": 0, "mismatches": 0}
    try:
        await sites.start_proxies()
        sites.start("B")
        sites.start("A")
        t0 = time.monotonic()
        await sites.wait_keys_flow(120)  # a first run on a fresh checkout also compiles the Numba kernels
        print(f"first key {time.monotonic() - t0:.1f} s after the start")
        pids = {s: sites.pid(s) for s in "AB"}
        for connection in CONNECTIONS:
            for fault in ("drop", "delay", "reset", "half-close"):
                t0 = time.monotonic()
                await _proxy_fault(sites, connection, fault)
                print(f"{connection} {fault}: keys flow again after {time.monotonic() - t0:.1f} s")
                assert all(sites.alive(s) and sites.pid(s) == pids[s] for s in "AB"), (connection, fault)
                await sites.wait_stores_agree()
        rng = random.Random(11)
        for victim in ("B", "A"):
            t0 = time.monotonic()
            await _sigkill(sites, victim, rng, counts)
            print(f"kill -9 {victim}: keys flow again {time.monotonic() - t0:.1f} s after the kill")
            await sites.wait_stores_agree()
        assert counts["mismatches"] == 0 and counts["keys"] > 0, counts
    finally:
        codes = await sites.close()
    assert codes == {"A": 0, "B": 0}
    for site in "AB":
        assert "Traceback" not in sites.log(site), sites.log(site)[-3000:]


# --------------------------------------------------------------------------- idle past timeouts


async def test_store_full_pause_and_idle_kms_link_keep_their_sessions(tmp_path):
    """The store fills and generation pauses for two timeouts with no SAE traffic: no reconnection on any of
    the three connections, no pool key spent, no abort; then a request is served at once and, once keys are
    taken below the high-water mark, generation resumes in the same session."""
    sites = TwoSites(tmp_path / "dep", timeout_s=TIMEOUT_S,
                     kms={"capacity_keys": 2000, "high_water_keys": 60, "low_water_keys": 10})
    try:
        sites.start("B")
        sites.start("A")
        await sites.wait_keys_flow(120)
        # Wait until generation paused: A's store at or above the high-water mark, no new round for a while.
        deadline = time.monotonic() + 60
        while True:
            st = sites.status("A")
            before = (st.get("rounds_accepted"), st.get("auth_bits_consumed"))
            await asyncio.sleep(1.0)
            st = sites.status("A")
            if sites.stored_keys("A") >= 60 and (st["rounds_accepted"], st["auth_bits_consumed"]) == before:
                break
            assert time.monotonic() < deadline, st
        base = {s: sites.status(s) for s in "AB"}
        logs = {s: sites.log(s) for s in "AB"}
        await asyncio.sleep(2 * TIMEOUT_S + 1.0)  # paused, and the KME peer link idle, past the read timeout
        for s in "AB":
            st = sites.status(s)
            for name in ("reconnections", "auth_bits_consumed", "rounds_accepted", "rounds_aborted", "recent_aborts"):
                assert st[name] == base[s][name], (s, name, st[name], base[s][name])
        # The idle KME peer link is still up: the first request after the pause is served (no 503).
        await sites.key_roundtrip()
        for s in "AB":
            assert _count(LINK_UP, sites.log(s)) == _count(LINK_UP, logs[s]), sites.log(s)[-3000:]
        # Taking keys below the high-water mark resumes generation in the same session (no new authentication).
        for master in "AB" * 20:  # each KME serves masters from its own half of the store
            if sites.stored_keys("A") < 60:
                break
            with contextlib.suppress(QKDError):  # this site's half is empty: the other site takes
                await sites.key_roundtrip(20, master=master)
        else:
            raise AssertionError(f"could not take keys below the high-water mark: {sites.stored_keys('A')} held")
        await sites.wait_keys_flow(60, after={"A": base["A"]["rounds_accepted"]})
        for s in "AB":
            st = sites.status(s)
            assert st["reconnections"] == base[s]["reconnections"], (s, st)
            assert st["recent_aborts"] == base[s]["recent_aborts"], (s, st)
            assert _count(AUTHENTICATED, sites.log(s)) == _count(AUTHENTICATED, logs[s]), sites.log(s)[-3000:]
        await sites.wait_stores_agree()
    finally:
        codes = await sites.close()
    assert codes == {"A": 0, "B": 0}


# ------------------------------------------------------------------------------ fatal: exit non-zero


def _exhaust_pool(site_dir) -> None:
    """Spend a saved authentication pool's pads to the last byte (the same at both sites: still in lockstep)."""
    path = site_dir / "data" / "auth-pool.json"
    doc = json.loads(path.read_text())
    for direction in doc["directions"].values():
        pad = direction["pad"]
        pad["cursor"], pad["data"] = pad["total"], ""
    path.write_text(json.dumps(doc, sort_keys=True))


async def test_exhausted_pool_stops_both_nodes_with_a_nonzero_exit(tmp_path):
    """A fatal condition (no authentication key left) stops ``qkdstack node`` with exit 1 and one line, never 0."""
    sites = TwoSites(tmp_path / "dep", timeout_s=TIMEOUT_S)
    for site in "AB":  # one settled round, so both sites hold a saved pool, then exhaust it
        edit_config(sites.layouts[site].config, protocol={"rounds": 1})
    await run_nodes([sites.layouts["A"].config, sites.layouts["B"].config], timeout=90)
    for site in "AB":
        edit_config(sites.layouts[site].config, protocol={"rounds": 0})
        _exhaust_pool(sites.out / site)
    try:
        sites.start("B")
        sites.start("A")
        for site in "AB":
            try:
                code = sites.procs[site].wait(60)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{site} did not stop on an exhausted pool:\n{sites.log(site)[-2000:]}") from None
            assert code == 1, (site, code, sites.log(site)[-2000:])
            assert "Traceback" not in sites.log(site)
            assert "qkdstack node: error:" in sites.log(site) and "authentication" in sites.log(site).lower()
    finally:
        await sites.close()
