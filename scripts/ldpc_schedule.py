#!/usr/bin/env python3
"""Choose the LDPC blind-round schedule from where codewords really decode (outside CI).

The blind rounds of ``qkdstack.protocol.ldpc`` reveal bits in steps: f_start·k·h(q) syndrome bits first,
then ⌈Δ·(1 + growth·(r − 1))⌉ more in round r, Δ = ⌈blind_step·k·h(q)⌉, until Bob decodes. A codeword
stops at the first step past its *decode point* (the bits it needs), so f is the mean decode point plus
the mean overshoot, and each step costs a round trip. Two parts:

* ``measure QBER FRAMES``: runs the LDPC stage (Alice and Bob, in-memory channel) on frames of ``--n``
  bits with i.i.d. errors at rate QBER and *fine* steps (``--step``, constant) from f_start on every code
  (no ``f_start_by_rate``), so that where each frame stopped is its decode point to within one fine
  step. One JSON line per frame: the actual error rate e, the bits Alice disclosed before Bob decoded
  (syndrome, un-merged rows, extra parities; ``needed``) and the check parities. The frame must fit one
  codeword (the decode point of one of several codewords is not visible in the outcome).
* ``evaluate FILE...``: replays schedules (f_start fixed, a grid of ``blind_step`` × ``blind_growth``)
  on those decode points with the protocol's own step arithmetic, and prints per schedule and file the
  mean f (everything counted: steps, check parities, one status bit per round; in units of N·h(e), as the
  benchmark counts) and the mean and largest number of round trips.

The replay assumes a codeword decodes as soon as the bits it needs are out, whatever the steps before;
Bob's warm start makes later decodings depend a little on the path, so confirm a choice with
``benchmarks/bench_reconciliation.py fer``. Usage (1 % and 2 %: about 4 min per 80 frames)::

    .venv/bin/python scripts/ldpc_schedule.py measure 0.01 80 > p01.jsonl
    .venv/bin/python scripts/ldpc_schedule.py evaluate p01.jsonl p02.jsonl p03.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math

import numpy as np

from qkdstack.protocol import ldpc
from qkdstack.protocol.channel import channel_pair

STEPS = (0.006, 0.008, 0.01, 0.012, 0.015)
GROWTHS = (0.0, 0.1, 0.2, 0.3, 0.5)


def _frame(qber: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, n, dtype=np.uint8)
    return a, a ^ (rng.random(n) < qber).astype(np.uint8)


async def _stage(a: np.ndarray, b: np.ndarray, qber: float, params: ldpc.LdpcParams, seed: int):
    alice_end, bob_end = channel_pair()
    return await asyncio.gather(ldpc.alice(alice_end, a, qber, params, seed=seed), ldpc.bob(bob_end, b, qber, params))


def measure(qber: float, frames: int, n: int, step: float, seed0: int) -> None:
    params = ldpc.LdpcParams(blind_step=step, blind_growth=0.0, max_blind_rounds=400, f_start_by_rate=())
    plan = ldpc.make_plan(n, qber, params)
    if plan.codewords != 1:
        raise SystemExit(f"a frame of {n} bits is more than one codeword: choose a smaller --n")
    for i in range(frames):
        a, b = _frame(qber, n, seed0 + i)
        alice, bob = asyncio.run(_stage(a, b, qber, params, seed0 + i))
        if not np.array_equal(bob.key, a):
            raise SystemExit(f"frame {i}: the decoded key differs (a wrong codeword passed the check parities)")
        print(json.dumps({"qber": qber, "n": n, "e": float(np.mean(a != b)), "step": step, "rate": plan.rate,
                          "lift": plan.lift, "needed": alice.syndrome_bits + alice.revealed_bits,
                          "check_bits": alice.check_bits, "round_trips": alice.round_trips}), flush=True)


def replay(points: list[dict], params: ldpc.LdpcParams) -> dict | None:
    """Mean f and round trips of ``params``' schedule on measured decode points (one codeword per frame).

    None when ``params`` choose another mother code or lift than the measurement used (another f_start can):
    the decode points in bits hold only for the code they were measured on.
    """
    first = points[0]
    qber, n = first["qber"], first["n"]
    plan = ldpc.make_plan(n, qber, params)
    if (plan.rate, plan.lift) != (first["rate"], first["lift"]):
        return None
    thresholds = [plan.syndrome_bits]
    for r in range(1, params.max_blind_rounds + 1):
        thresholds.append(thresholds[-1] + math.ceil(plan.step * (1.0 + plan.growth * (r - 1))))
    limits = np.array(thresholds)
    fs, trips, given_up = [], [], 0
    for p in points:
        r = int(np.searchsorted(limits, p["needed"]))
        if r >= limits.size:
            given_up += 1
            continue
        leaked = limits[r] + p["check_bits"] + (r + 1)
        fs.append(leaked / (n * ldpc.binary_entropy(p["e"])))
        trips.append(r + 1)
    if not fs:
        return {"f": None, "round_trips": None, "round_trips_max": None, "given_up": given_up}
    return {"f": round(float(np.mean(fs)), 4), "round_trips": round(float(np.mean(trips)), 2),
            "round_trips_max": int(max(trips)), "given_up": given_up}


def evaluate(files: list[str], f_start: float) -> None:
    data = {}
    for name in files:
        with open(name) as fh:
            data[name] = [json.loads(line) for line in fh if line.startswith("{")]
    for step in STEPS:
        for growth in GROWTHS:
            params = ldpc.LdpcParams(f_start=f_start, blind_step=step, blind_growth=growth)
            row = {"blind_step": step, "blind_growth": growth}
            row.update({name: replay(points, params) for name, points in data.items() if points})
            print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    m = sub.add_parser("measure")
    m.add_argument("qber", type=float)
    m.add_argument("frames", type=int)
    m.add_argument("--n", type=int, default=100_000)
    m.add_argument("--step", type=float, default=0.004)
    m.add_argument("--seed", type=int, default=6000)
    e = sub.add_parser("evaluate")
    e.add_argument("files", nargs="+")
    e.add_argument("--f-start", type=float, default=ldpc.LdpcParams().f_start)
    args = parser.parse_args()
    if args.action == "measure":
        measure(args.qber, args.frames, args.n, args.step, args.seed)
    else:
        evaluate(args.files, args.f_start)


if __name__ == "__main__":
    main()
