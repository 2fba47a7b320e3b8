#!/usr/bin/env python3
"""Long fault-injection probe (outside CI): many SIGKILL cycles and network faults on loopback, then counts.

Runs the two sites of a fresh test deployment as ``qkdstack node`` processes (A's three connections
through fault proxies) while an SAE pair takes keys all the time (SAE_A at A over ETSI 014, SAE_B fetches
the same key ID at B and the bytes are compared). Each cycle injects one fault, chosen at random:

* ``kill``: SIGKILL of A or B at a random instant (rounds and deliveries in flight); the other node must stay
  the same process; the victim is restarted;
* ``net``: a black hole, latency, a reset or a half-close of the classical, quantum or KME-link connection.

After each fault the cycle waits until a fresh round is accepted and an SAE key flows again, then checks
that the stores agree. It prints one JSON object: cycles, survived (the other node stayed up and the link
recovered), keys_checked, mismatches (must be 0), store_disagreements (must be 0), deliveries refused while a
node was down (expected), recovery times. The tests' short version is tests/test_faults.py.

    .venv/bin/python scripts/fault_probe.py --cycles 120            # about 15 s per cycle
    .venv/bin/python scripts/fault_probe.py --cycles 5 --faults kill
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _fault_proxy import CONNECTIONS, KeyMismatch, TwoSites
from qkdstack.errors import QKDError

NET_FAULTS = ("drop", "delay", "reset", "half-close")


class Probe:
    def __init__(self, sites: TwoSites, rng: random.Random, timeout_s: float) -> None:
        self.sites = sites
        self.rng = rng
        self.timeout_s = timeout_s
        self.counts = {"cycles": 0, "survived": 0, "kills": 0, "net_faults": 0, "keys_checked": 0,
                       "mismatches": 0, "deliveries_refused": 0, "store_disagreements": 0, "failed_cycles": 0}
        self.recovery_s: list[float] = []
        self.failures: list[str] = []

    async def traffic(self, stop: asyncio.Event) -> None:
        """SAE key requests back to back; every key fetched at both sites is compared."""
        while not stop.is_set():
            try:
                ids = await self.sites.key_roundtrip()
                self.counts["keys_checked"] += len(ids)
            except KeyMismatch:
                self.counts["mismatches"] += 1
            except QKDError:
                self.counts["deliveries_refused"] += 1
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.02)

    async def kill_cycle(self) -> None:
        victim = self.rng.choice("AB")
        survivor = "A" if victim == "B" else "B"
        pid = self.sites.pid(survivor)
        await asyncio.sleep(self.rng.uniform(0.0, 2.0))
        self.sites.kill(victim)
        self.counts["kills"] += 1
        t0 = time.monotonic()
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))
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
        await asyncio.sleep(self.rng.uniform(0.0, 2.0))
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
                try:
                    await self.sites.wait_stores_agree(30)
                except AssertionError as exc:
                    self.counts["store_disagreements"] += 1
                    self.failures.append(f"stores: {exc}")
        finally:
            stop.set()
            await traffic


async def main(args: argparse.Namespace) -> dict:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qkdstack-fault-probe-"))
    sites = TwoSites(out / "dep", proxied=True, timeout_s=args.timeout_s)
    probe = Probe(sites, random.Random(args.seed), args.timeout_s)
    started = time.monotonic()
    interrupted = asyncio.Event()  # SIGINT/SIGTERM: finish the cycle, stop the nodes, print the counts so far
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, interrupted.set)
    try:
        await sites.start_proxies()
        sites.start("B")
        sites.start("A")
        await sites.wait_keys_flow(180)
        await probe.run(args.cycles, args.faults.split(","), interrupted)
    finally:
        codes = await sites.close()
    rec = probe.recovery_s
    return {
        **probe.counts,
        "recovery_s": {"median": round(statistics.median(rec), 2), "max": round(max(rec), 2)} if rec else None,
        "exit_codes_at_sigterm": codes,
        "tracebacks_in_logs": sum(sites.log(s).count("Traceback") for s in "AB"),
        "wall_s": round(time.monotonic() - started, 1),
        "failures": probe.failures[:20],
        "deployment": str(out / "dep"),
    }


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=120)
    parser.add_argument("--faults", default="kill,net", help="comma-separated: kill, net (default both)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="[link] timeout_s of both nodes")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", help="folder for the deployment and the node logs (default: a new temp folder)")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    print(json.dumps(result, indent=1))
    ok = result["mismatches"] == 0 and result["store_disagreements"] == 0 and result["failed_cycles"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(cli())
