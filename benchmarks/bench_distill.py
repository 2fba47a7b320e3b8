"""End-to-end distillation throughput, in memory: sifted bits in and secret bits out per second.

Frames of the simulated device at 25 km (defaults: μ 0.5/0.25/0, 1 GHz) run through the whole
round (sifting, estimation, Cascade, verification, amplification) over the in-memory channel.
Reports, per frame size, the throughput of each stage (its input bits per second) and of the
round as a whole. Frame simulation is excluded (see bench_physics).
"""

from __future__ import annotations

import asyncio
import statistics
import time

from qkdstack.physics.device import SimulatedDevice
from qkdstack.physics.params import ChannelParams, DeviceParams
from qkdstack.protocol.keyblock import KeyBlock
from qkdstack.protocol.round import RoundConfig, run_in_memory

FRAMES = {"1e8_pulses": 100_000_000, "4e8_pulses": 400_000_000}
REPEATS = 3


def _one(device: SimulatedDevice, pulses: int, config: RoundConfig) -> dict:
    frame = device.run_frame(pulses)
    start = time.perf_counter()
    alice, _ = asyncio.run(run_in_memory(frame, config))
    wall = time.perf_counter() - start
    if not isinstance(alice, KeyBlock):
        raise RuntimeError(f"benchmark round aborted: {alice}")
    n_key = int(sum(alice.counts["key_counts"]))
    n_sifted = n_key + int(sum(alice.counts["test_counts"]))
    return {"wall_s": wall, "stage_s": alice.stage_seconds, "detections": len(frame.bob), "sifted_bits": n_sifted,
            "key_basis_bits": n_key, "secret_bits": alice.length}


def run() -> dict:
    params = DeviceParams(channel=ChannelParams(length_km=25.0))
    config = RoundConfig.for_source(params.source)
    device = SimulatedDevice(params, seed=2026)
    _one(device, 100_000_000, config)  # warm-up: Numba compilation and caches
    out: dict[str, dict] = {}
    for name, pulses in FRAMES.items():
        runs = [_one(device, pulses, config) for _ in range(REPEATS)]
        best = min(runs, key=lambda r: r["wall_s"])
        stage_input = {
            "sifting": best["detections"],
            "estimation": best["sifted_bits"],
            "cascade": best["key_basis_bits"],
            "verification": best["key_basis_bits"],
            "amplification": best["key_basis_bits"],
        }
        out[name] = {
            "distance_km": 25.0,
            "detections": best["detections"],
            "sifted_bits": best["sifted_bits"],
            "secret_bits": best["secret_bits"],
            "round_wall_s_best": best["wall_s"],
            "round_wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "end_to_end_sifted_bit_per_s": best["sifted_bits"] / best["wall_s"],
            "end_to_end_secret_bit_per_s": best["secret_bits"] / best["wall_s"],
            "stage_input_bit_per_s": {s: stage_input[s] / max(t, 1e-9) for s, t in best["stage_s"].items()},
            "stage_s": best["stage_s"],
        }
    return out
