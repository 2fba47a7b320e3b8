"""Sifting, estimation and the amplification stage wrapper, each timed on its own (both parties).

bench_distill times stages with Alice's clock, so a stage's figure there also holds Bob's
work that happens to fall inside it (Bob's half of sifting lands in "estimation"). Here
each stage runs alone over the in-memory channel, both parties included, on a 4e8-pulse
frame at 25 km (about 3.8e6 detections): the input bits per second of sifting (Bob's
detections) and estimation (sifted bits), and the amplification stage's cost over
``toeplitz_hash`` on the same key and output length. Best of REPEATS (the development
machine is shared, so medians are noisy).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np

from qkdstack.physics.device import SimulatedDevice
from qkdstack.physics.params import ChannelParams, DeviceParams
from qkdstack.protocol import amplification, estimation, sifting
from qkdstack.protocol.channel import channel_pair
from qkdstack.protocol.round import RoundConfig
from qkdstack.protocol.toeplitz import seed_length, toeplitz_hash

PULSES = 400_000_000
REPEATS = 7
OUTPUT_FRACTION = 0.36  # secret bits per key-basis bit the round reaches at 25 km


def _timed(make_coro) -> float:
    start = time.perf_counter()
    asyncio.run(make_coro())
    return time.perf_counter() - start


def run() -> dict:
    params = DeviceParams(channel=ChannelParams(length_km=25.0))
    policy = RoundConfig.for_source(params.source).policy
    frame = SimulatedDevice(params, seed=2026).run_frame(PULSES)
    out: dict[str, float | int] = {"pulses": PULSES, "detections": len(frame.bob)}

    async def sift():
        a, b = channel_pair()
        return await asyncio.gather(sifting.alice(a, frame.alice), sifting.bob(b, frame.bob))

    sa, sb = asyncio.run(sift())  # warm-up (Numba caches)
    times = [_timed(sift) for _ in range(REPEATS)]
    out["sifting_s_best"] = min(times)
    out["sifting_s_median"] = statistics.median(times)
    out["sifting_detection_bit_per_s"] = len(frame.bob) / min(times)

    n_sifted = sa.key_bits.size + sa.test_bits.size

    async def estimate():
        a, b = channel_pair()
        await asyncio.gather(estimation.alice(a, sa, policy), estimation.bob(b, sb, policy))

    asyncio.run(estimate())
    times = [_timed(estimate) for _ in range(REPEATS)]
    out["sifted_bits"] = n_sifted
    out["estimation_s_best"] = min(times)
    out["estimation_sifted_bit_per_s"] = n_sifted / min(times)

    key = sa.key_bits
    m = int(OUTPUT_FRACTION * key.size)
    seed = np.random.default_rng(1).integers(0, 2, seed_length(key.size), dtype=np.uint8)

    async def amplify():
        a, _ = channel_pair()
        await amplification.alice(a, key, m)

    def bare() -> float:
        start = time.perf_counter()
        toeplitz_hash(key, seed, m)
        return time.perf_counter() - start

    asyncio.run(amplify())
    bare()
    stage, hashes = [], []
    for _ in range(REPEATS):  # interleaved, so both see the same load
        stage.append(_timed(amplify))
        hashes.append(bare())
    out["amplification_key_bits"] = int(key.size)
    out["amplification_stage_s_best"] = min(stage)
    out["toeplitz_hash_s_best"] = min(hashes)
    out["amplification_wrapper_overhead_pct"] = 100 * (min(stage) / min(hashes) - 1)
    return out
