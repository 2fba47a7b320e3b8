#!/usr/bin/env python3
"""Soak and fault-injection probe (outside CI): many SIGKILL cycles (and network faults) on loopback, then counts.

Runs the two sites of a fresh test deployment as ``qkdstack node`` processes while an SAE pair takes keys all
the time (the master SAE takes a key over ETSI 014 at one site, the slave SAE fetches the same key ID at the
other and the bytes are compared; the master alternates between A and B, so both halves of each store serve).
Each cycle injects one fault, chosen at random:

* ``kill``: SIGKILL of A or B at a random instant (rounds and deliveries in flight); the other node must stay
  the same process; the victim is restarted;
* ``net`` (A's three connections then run through fault proxies): a black hole, latency, a reset or a
  half-close of the classical, quantum or KME-link connection.

After each fault the cycle waits until a fresh round is accepted and an SAE key flows again, re-requests the
last keys delivered (each must be refused now: it was delivered once already), then checks that the stores
agree. It prints one JSON object:

* ``cycles``, ``survived`` (the other node stayed up and the link recovered), ``failed_cycles``, ``kills``;
* ``keys_delivered``: keys taken by a master SAE and fetched by its slave SAE with equal bytes;
* ``double_deliveries`` (must be 0): a key ID handed out twice by ``enc_keys``, the same key bytes under
  two IDs, or a key delivered again when its slave SAE asks for it a second time;
* ``mismatches`` (must be 0): the slave got other bytes than the master under one key ID;
* ``store_divergence`` (must be 0): checks, after each cycle and once after the nodes stopped, at which the
  two key stores did not agree (a chunk available at one site only, other bytes, or more than the blocks
  in flight at one site only; ``TwoSites.store_disagreement``);
* ``rounds_accepted`` (blocks in both stores at the end), ``rounds_lost``: rounds whose work gave no stored
  key, i.e. rounds aborted at either site (a kill cuts the round in flight: the survivor aborts it) plus
  rounds accepted at a site whose block is in neither store or one only at the end (dropped on resync);
  ``rounds_pending_at_stop``: the last accepted rounds still in ``pending/`` when the nodes stopped
  (committed or dropped by the next start, counted neither as accepted nor lost);
* ``deliveries_refused`` while a node was down (expected), recovery times, tracebacks in the logs.

    .venv/bin/python scripts/fault_probe.py --cycles 100 --faults kill     # the soak: about 8 s per cycle
    .venv/bin/python scripts/fault_probe.py --cycles 120                   # kills and network faults

The tests' short versions: tests/test_soak.py (10 kill cycles, :func:`run_probe`), tests/test_faults.py.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import deque
from contextlib import closing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _fault_proxy import CONNECTIONS, TwoSites
from qkdstack.errors import ChannelError, QKDError

NET_FAULTS = ("drop", "delay", "reset", "half-close")
RECHECK = 8
"""Keys re-requested at their slave site after each cycle (the last ones delivered)."""


def _other(site: str) -> str:
    return "B" if site == "A" else "A"


class Probe:
    def __init__(self, sites: TwoSites, rng: random.Random, timeout_s: float, pause_s: float = 2.0) -> None:
        self.sites = sites
        self.rng = rng
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        self.counts = {"cycles": 0, "survived": 0, "failed_cycles": 0, "kills": 0, "net_faults": 0,
                       "keys_delivered": 0, "double_deliveries": 0, "mismatches": 0, "deliveries_refused": 0,
                       "redeliveries_checked": 0, "store_divergence": 0}
        self.recovery_s: list[float] = []
        self.failures: list[str] = []
        self._ids: set[str] = set()
        self._digests: set[bytes] = set()  # SHA-256 of each key delivered: the probe keeps no key bytes
        self._recent: deque[tuple[str, str]] = deque(maxlen=RECHECK)  # (key ID, slave site)

    def _double(self, why: str) -> None:
        self.counts["double_deliveries"] += 1
        self.failures.append(f"double delivery: {why}")

    async def roundtrip(self, master: str) -> None:
        """The master SAE takes one key at ``master``, the slave SAE fetches it by ID at the other site."""
        slave = _other(master)
        keys = await self.sites._client(master).get_new_keys(1, 256)
        for k in keys:
            digest = hashlib.sha256(k.key).digest()
            if k.key_id in self._ids:
                self._double(f"enc_keys at {master} handed out key ID {k.key_id} again")
            elif digest in self._digests:
                self._double(f"enc_keys at {master} handed out the bytes of an earlier key as {k.key_id}")
            self._ids.add(k.key_id)
            self._digests.add(digest)
        got = await self.sites._client(slave).get_keys_by_id([k.key_id for k in keys])
        if [(k.key_id, k.key) for k in got] != [(k.key_id, k.key) for k in keys]:
            self.counts["mismatches"] += 1
            self.failures.append(f"mismatch: the slave SAE at {slave} got other keys than the master at {master}")
            return
        self.counts["keys_delivered"] += len(keys)
        self._recent.extend((k.key_id, slave) for k in keys)

    async def traffic(self, stop: asyncio.Event) -> None:
        """SAE key requests back to back, the master alternating between A and B."""
        n = 0
        while not stop.is_set():
            n += 1
            try:
                await self.roundtrip("A" if n % 2 else "B")
            except QKDError:
                self.counts["deliveries_refused"] += 1
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.02)

    async def recheck(self) -> None:
        """Ask again, at its slave site, for each of the last keys delivered: each must be refused."""
        for key_id, slave in list(self._recent):
            try:
                await self.sites._client(slave).get_keys_by_id([key_id])
            except ChannelError:
                continue  # the KME is unreachable: no answer either way
            except QKDError:
                self.counts["redeliveries_checked"] += 1  # refused, as it must be
                continue
            self.counts["redeliveries_checked"] += 1
            self._double(f"key {key_id} was delivered a second time at {slave}")

    async def kill_cycle(self) -> None:
        victim = self.rng.choice("AB")
        survivor = _other(victim)
        pid = self.sites.pid(survivor)
        await asyncio.sleep(self.rng.uniform(0.0, self.pause_s))
        self.sites.kill(victim)
        self.counts["kills"] += 1
        t0 = time.monotonic()
        await asyncio.sleep(self.rng.uniform(0.2, self.pause_s))
        rounds = self.sites.rounds(survivor)
        self.sites.start(victim)
        await self.sites.wait_keys_flow(120, after={survivor: rounds})
        self.recovery_s.append(time.monotonic() - t0)
        if not (self.sites.alive(survivor) and self.sites.pid(survivor) == pid):
            raise AssertionError(f"{survivor} did not survive the kill of {victim}")

    async def net_cycle(self) -> None:
        connection, fault = self.rng.choice(CONNECTIONS), self.rng.choice(NET_FAULTS)
        proxy = self.sites.proxies[connection]
        pids = {s: self.sites.pid(s) for s in "AB"}
        await asyncio.sleep(self.rng.uniform(0.0, self.pause_s))
        t0 = time.monotonic()
        if fault == "drop":
            proxy.drop()
        elif fault == "delay":
            proxy.delay_s = self.rng.uniform(0.05, 0.5)
            await asyncio.sleep(self.rng.uniform(0.5, 2 * self.timeout_s))
            proxy.heal()
        elif fault == "reset":
            proxy.reset()
        else:
            proxy.half_close(self.rng.choice(("upstream", "client")))
        self.counts["net_faults"] += 1
        rounds = {s: self.sites.rounds(s) for s in "AB"}
        await self.sites.wait_keys_flow(120, after=rounds if connection != "kms" else None)
        self.recovery_s.append(time.monotonic() - t0)
        if not all(self.sites.alive(s) and self.sites.pid(s) == pids[s] for s in "AB"):
            raise AssertionError(f"a node exited after {fault} on {connection}")

    async def run(self, cycles: int, faults: list[str], interrupted: asyncio.Event) -> None:
        stop = asyncio.Event()
        traffic = asyncio.create_task(self.traffic(stop))
        try:
            for _ in range(cycles):
                if interrupted.is_set():
                    break
                kind = self.rng.choice(faults)
                self.counts["cycles"] += 1
                try:
                    await (self.kill_cycle() if kind == "kill" else self.net_cycle())
                    self.counts["survived"] += 1
                except (AssertionError, TimeoutError) as exc:
                    self.counts["failed_cycles"] += 1
                    self.failures.append(f"{kind}: {str(exc)[:300]}")
                    for site in "AB":  # restart whatever died, so the probe goes on
                        if not self.sites.alive(site):
                            self.sites.start(site)
                    await asyncio.sleep(self.timeout_s)
                await self.recheck()
                try:
                    await self.sites.wait_stores_agree(30)
                except AssertionError as exc:
                    self.counts["store_divergence"] += 1
                    self.failures.append(f"stores: {exc}")
        finally:
            stop.set()
            await traffic


def round_accounting(sites: TwoSites) -> dict[str, int]:
    """Rounds from both sites' ``data/rounds.jsonl``, ``pending/`` and key stores, read once the nodes stopped.

    accepted: blocks in both stores; pending_at_stop: accepted blocks still in ``pending/`` at either site
    (the next start commits or drops them); lost: rounds aborted at either site, plus accepted blocks (at
    either site) that are not pending and not in both stores. Block IDs are the same at both sites.
    """
    accepted: set[str] = set()
    aborted: set[str] = set()
    pending: set[str] = set()
    stored: list[set[str]] = []
    for site in "AB":
        data = sites.out / site / "data"
        path = data / "rounds.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                doc = json.loads(line)
            except ValueError:
                continue  # a line cut by SIGKILL
            (accepted if doc.get("accepted") else aborted).add(str(doc.get("block_id")))
        for p in (data / "pending").glob("*.json"):
            try:
                pending.add(str(json.loads(p.read_text()).get("block_id")))
            except ValueError:
                continue
        db = data / "keys.db"
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as con:
            stored.append({r[0] for r in con.execute("SELECT block_id FROM qkd_blocks")})
    both = stored[0] & stored[1]
    return {
        "rounds_accepted": len(both),
        "rounds_aborted": len(aborted - both),
        "rounds_lost": len((aborted | accepted) - both - pending),
        "rounds_pending_at_stop": len(pending - both),
    }


async def run_probe(out: Path, *, cycles: int, faults: str = "kill", timeout_s: float = 3.0, seed: int = 2026,
                    pause_s: float = 2.0, interrupted: asyncio.Event | None = None) -> dict[str, Any]:
    """Run the probe on a fresh deployment under ``out`` and return its counts (the module doc's JSON).

    Every process and proxy it starts is stopped before it returns or raises.
    """
    kinds = faults.split(",")
    sites = TwoSites(out / "dep", proxied="net" in kinds, timeout_s=timeout_s)
    probe = Probe(sites, random.Random(seed), timeout_s, pause_s)
    started = time.monotonic()
    try:
        await sites.start_proxies()
        sites.start("B")
        sites.start("A")
        await sites.wait_keys_flow(180)
        await probe.run(cycles, kinds, interrupted or asyncio.Event())
    finally:
        codes = await sites.close()
    why = sites.store_disagreement()  # once more with both nodes stopped
    if why is not None:
        probe.counts["store_divergence"] += 1
        probe.failures.append(f"stores after stop: {why}")
    rec = probe.recovery_s
    return {
        **probe.counts,
        **round_accounting(sites),
        "recovery_s": {"median": round(statistics.median(rec), 2), "max": round(max(rec), 2)} if rec else None,
        "exit_codes_at_sigterm": codes,
        "tracebacks_in_logs": sum(sites.log(s).count("Traceback") for s in "AB"),
        "wall_s": round(time.monotonic() - started, 1),
        "failures": probe.failures[:20],
        "deployment": str(out / "dep"),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qkdstack-fault-probe-"))
    interrupted = asyncio.Event()  # SIGINT/SIGTERM: finish the cycle, stop the nodes, print the counts so far
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, interrupted.set)
    return await run_probe(out, cycles=args.cycles, faults=args.faults, timeout_s=args.timeout_s, seed=args.seed,
                           pause_s=args.pause_s, interrupted=interrupted)


def ok(result: dict[str, Any]) -> bool:
    """The probe's verdict: no double delivery, no mismatch, no divergence, every cycle survived."""
    return (result["double_deliveries"] == 0 and result["mismatches"] == 0 and result["store_divergence"] == 0
            and result["failed_cycles"] == 0 and result["survived"] == result["cycles"])


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=120)
    parser.add_argument("--faults", default="kill,net", help="comma-separated: kill, net (default both)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="[link] timeout_s of both nodes")
    parser.add_argument("--pause-s", type=float, default=2.0,
                        help="longest random wait before a fault and before a killed node's restart")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", help="folder for the deployment and the node logs (default: a new temp folder)")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    print(json.dumps(result, indent=1))
    return 0 if ok(result) else 1


if __name__ == "__main__":
    sys.exit(cli())
