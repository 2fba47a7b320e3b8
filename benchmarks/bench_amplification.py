"""Throughput of privacy amplification (Toeplitz hashing) and error verification (Poly1305).

Input bits per second, best of a few repetitions (the machine is shared, so the best run is
the least disturbed one); ``*_cpu_s`` is the smallest process CPU time (both threads
summed), a figure less disturbed by other users of the machine than wall time. Toeplitz at
n = 10^6 and 10^7 input bits with m = n/2 and n/10 output bits, by each exact method
(``fft``, ``clmul``; ``toeplitz_hash`` uses clmul where the CPU has it); the amplification stage
(both parties over the in-memory channel) at n = 10^7, m = n/2; verification (both parties,
one 128-bit tag, eps_cor = 1e-15) at n = 10^7.
Run: ``.venv/bin/python benchmarks/run_all.py amplification``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from qkdstack.protocol import amplification, toeplitz_clmul, verification
from qkdstack.protocol.channel import channel_pair
from qkdstack.protocol.toeplitz import seed_length, toeplitz_hash

METHODS = ("fft", "clmul") if toeplitz_clmul.AVAILABLE else ("fft",)


def _best_of(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best wall-clock and best process CPU time (all threads) over ``repeats`` runs."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


async def _both(stage, key: np.ndarray, arg) -> None:
    a, b = channel_pair()
    await asyncio.gather(stage.alice(a, key, arg), stage.bob(b, key, arg))


def run() -> dict:
    rng = np.random.default_rng(2024)
    out: dict[str, float] = {}
    for n, repeats in ((10**6, 5), (10**7, 3)):
        key = rng.integers(0, 2, n, dtype=np.uint8)
        seed = rng.integers(0, 2, seed_length(n), dtype=np.uint8)
        for div in (2, 10):
            m = n // div
            for method in METHODS:
                t, cpu = _best_of(lambda key=key, seed=seed, m=m, f=method: toeplitz_hash(key, seed, m, f), repeats)
                tag = f"toeplitz_{method}_n1e{len(str(n)) - 1}_m_n_over_{div}"
                out[f"{tag}_s"] = round(t, 4)
                out[f"{tag}_cpu_s"] = round(cpu, 4)
                out[f"{tag}_throughput_bit_per_s"] = round(n / t)
    n = 10**7
    key = rng.integers(0, 2, n, dtype=np.uint8)
    t, _ = _best_of(lambda: asyncio.run(_both(amplification, key, n // 2)), 1)
    out["amplification_stage_n1e7_m_n_over_2_both_parties_s"] = round(t, 3)
    t, _ = _best_of(lambda: asyncio.run(_both(verification, key, 1e-15)), 3)
    out["verification_stage_n1e7_both_parties_s"] = round(t, 4)
    out["verification_stage_n1e7_throughput_bit_per_s"] = round(n / t)
    return out
