"""Cascade benchmark: efficiency f, round trips, frame error rate and throughput.

For each schedule ("original", "optimized" = Martinez-Mateo et al. opt. (8), "batched"),
QBER 1, 2, 3, 5, 8 % and key length n = 10^4, 10^5, 10^6, it runs whole frames of Cascade
(Alice and Bob over the in-memory channel pair, one process, one core) on i.i.d. errors:

* ``f`` = Alice's disclosed parities / (n h(e)), with e the frame's ACTUAL error fraction (mean
  over frames): the usual Cascade efficiency, comparable with the literature. The round's
  strict λ also counts Bob's decision bits (one per parity), so it is about 2 f n h(e);
* round trips (mean and max), from the channel counters;
* frame errors = frames where Bob's key still differs from Alice's (count / frames, and
  the rule-of-three 95 % upper bound 3/frames when there are none);
* throughput = n / wall time of the frame (both parties; input bits per second): over all
  frames of the configuration (``throughput_bit_per_s``), of its fastest frame
  (``throughput_best_bit_per_s``) and per second of this process's CPU time
  (``throughput_cpu_bit_per_s``). The machine is shared, so the best frame and the CPU time
  are the steadier figures.

Frames per configuration: ``FRAMES`` (n=10^4: 8, 10^5: 8, 10^6: 3), plus ``FER_FRAMES`` = 400
frames at n=10^4, QBER 3 % for "original" and "batched" to bound the frame error rate; set
the environment variable ``QKDSTACK_BENCH_CASCADE_SCALE`` to multiply all of them. Timings on a shared machine
are noisy. Run: ``.venv/bin/python benchmarks/run_all.py cascade``.

The slow ``long`` mode (not part of ``make bench``) demonstrates frame error rates and round-trip
tails over thousands of frames: ``.venv/bin/python benchmarks/bench_cascade.py long --frames 3000
--n 10000 100000 --qber 0.01 0.02 0.03 0.05 --seed 3`` (one JSON line per configuration on stderr
as it goes, the whole result on stdout; ~10 min on the shared 2-core machine).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time

import numpy as np

from qkdstack.protocol import cascade
from qkdstack.protocol.channel import channel_pair

SCHEDULES = ("original", "optimized", "batched")
QBERS = (0.01, 0.02, 0.03, 0.05, 0.08)
FRAMES = {10_000: 8, 100_000: 8, 1_000_000: 3}
FER_FRAMES = 400  # extra frames for the frame error rate: n = 10^4, QBER 3 %, per schedule below
FER_SCHEDULES = ("original", "batched")


def _h(q: float) -> float:
    return 0.0 if q <= 0 or q >= 1 else -q * math.log2(q) - (1 - q) * math.log2(1 - q)


async def _frame(n: int, qber: float, schedule: str, rng: np.random.Generator) -> dict:
    a = rng.integers(0, 2, n, dtype=np.uint8)
    b = a ^ (rng.random(n) < qber).astype(np.uint8)
    errors = int(np.count_nonzero(a != b))
    ca, cb = channel_pair()
    t0, c0 = time.perf_counter(), time.process_time()
    ra, rb = await asyncio.gather(
        cascade.alice(ca, a, qber, schedule, seed_rng=rng), cascade.bob(cb, b, qber, schedule)
    )
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    assert ra.leaked_bits == rb.leaked_bits == cb.stats.disclosed_bits("cascade")
    assert ra.parity_bits == rb.parity_bits == ca.stats.disclosed_bits("cascade", "sent")
    return {
        "f": ra.parity_bits / (n * _h(errors / n)) if errors else float("nan"),
        "round_trips": rb.round_trips,
        "failed": not np.array_equal(rb.key, a),
        "seconds": dt,
        "cpu_seconds": dc,
    }


def _warm_up() -> None:
    """Compile the Numba kernels (cached on disk) outside the timed frames."""
    rng = np.random.default_rng(0)
    asyncio.run(_frame(2000, 0.05, "optimized", rng))


def run() -> dict:
    scale = float(os.environ.get("QKDSTACK_BENCH_CASCADE_SCALE", "1"))
    _warm_up()
    rng = np.random.default_rng(20260101)
    rows = []
    for n, frames in FRAMES.items():
        frames = max(1, round(frames * scale))
        for schedule in SCHEDULES:
            for qber in QBERS:
                res = [asyncio.run(_frame(n, qber, schedule, rng)) for _ in range(frames)]
                failed = sum(r["failed"] for r in res)
                secs = sum(r["seconds"] for r in res)
                rows.append(
                    {
                        "schedule": schedule,
                        "n_bits": n,
                        "qber": qber,
                        "frames": frames,
                        "f_mean": round(float(np.nanmean([r["f"] for r in res])), 4),
                        "round_trips_mean": round(float(np.mean([r["round_trips"] for r in res])), 1),
                        "round_trips_max": int(max(r["round_trips"] for r in res)),
                        "frame_errors": failed,
                        "frame_error_rate_95pct_upper": round(3.0 / frames, 4) if failed == 0 else failed / frames,
                        "throughput_bit_per_s": round(n * frames / secs),
                        "throughput_best_bit_per_s": round(n / min(r["seconds"] for r in res)),
                        "throughput_cpu_bit_per_s": round(n * frames / sum(r["cpu_seconds"] for r in res)),
                    }
                )
    fer = {}
    fer_frames = max(1, round(FER_FRAMES * scale))
    for schedule in FER_SCHEDULES:
        failed = sum(asyncio.run(_frame(10_000, 0.03, schedule, rng))["failed"] for _ in range(fer_frames))
        fer[schedule] = {
            "n_bits": 10_000,
            "qber": 0.03,
            "frames": fer_frames,
            "frame_errors": failed,
            "frame_error_rate": failed / fer_frames,
            "frame_error_rate_95pct_upper": round(3.0 / fer_frames, 4) if failed == 0 else None,
        }
    best = max((r for r in rows if r["n_bits"] == 1_000_000), key=lambda r: r["throughput_bit_per_s"])
    batched = [r for r in rows if r["schedule"] == "batched" and r["n_bits"] >= 100_000 and r["qber"] <= 0.05]
    return {
        "batched_n1e5_1e6_qber1_5pct": {
            "f_max": max(r["f_mean"] for r in batched),
            "round_trips_max": max(r["round_trips_max"] for r in batched),
            "throughput_bit_per_s_min_n1e6": min(r["throughput_bit_per_s"] for r in batched if r["n_bits"] == 10**6),
            "throughput_best_bit_per_s_min_n1e6": min(
                r["throughput_best_bit_per_s"] for r in batched if r["n_bits"] == 10**6
            ),
            "throughput_cpu_bit_per_s_min_n1e6": min(
                r["throughput_cpu_bit_per_s"] for r in batched if r["n_bits"] == 10**6
            ),
        },
        "frames_per_config": {str(n): max(1, round(f * scale)) for n, f in FRAMES.items()},
        "results": rows,
        "frame_error_rate_runs": fer,
        "throughput_bit_per_s_n1e6_best": best["throughput_bit_per_s"],
        "throughput_config_n1e6_best": f"{best['schedule']} at QBER {best['qber']}",
    }


def long_run(n_bits: list[int], qbers: list[float], frames: int, schedule: str = "batched", seed: int = 1) -> dict:
    """Frame error rate and round-trip tail from many frames (the slow option; not part of ``run()``).

    For each (n, QBER) it runs ``frames`` independent frames (fresh key, i.i.d. errors, fresh
    permutation seed) and reports the frames whose corrected key still differs from Alice's,
    the rule-of-three 95 % upper bound 3/frames when there are none, and the mean and maximum
    round trips and f. Run: ``.venv/bin/python benchmarks/bench_cascade.py long --frames 3000``.
    """
    _warm_up()
    out = []
    for n in n_bits:
        for qber in qbers:
            rng = np.random.default_rng([seed, n, round(qber * 1e6)])
            t0 = time.perf_counter()
            res = [asyncio.run(_frame(n, qber, schedule, rng)) for _ in range(frames)]
            failed = sum(r["failed"] for r in res)
            rts = [r["round_trips"] for r in res]
            fs = [r["f"] for r in res]
            out.append(
                {
                    "schedule": schedule,
                    "n_bits": n,
                    "qber": qber,
                    "frames": frames,
                    "frame_errors": failed,
                    "frame_error_rate": failed / frames,
                    "frame_error_rate_95pct_upper": round(3.0 / frames, 6) if failed == 0 else None,
                    "round_trips_mean": round(float(np.mean(rts)), 1),
                    "round_trips_max": int(max(rts)),
                    "frames_over_100_round_trips": int(sum(r > 100 for r in rts)),
                    "f_mean": round(float(np.nanmean(fs)), 4),
                    "f_max": round(float(np.nanmax(fs)), 4),
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return {"long_runs": out}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["run", "long"], default="run")
    parser.add_argument("--frames", type=int, default=3000, help="frames per (n, QBER) in the long run")
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000], help="key lengths (long run)")
    parser.add_argument("--qber", type=float, nargs="+", default=[0.02, 0.05], help="QBERs (long run)")
    parser.add_argument("--schedule", default="batched")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = long_run(args.n, args.qber, args.frames, args.schedule, args.seed) if args.mode == "long" else run()
    print(json.dumps(result, indent=1))
