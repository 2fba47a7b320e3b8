"""Speed of the key-rate theory: the secret-length formula a round calls, and the optimiser the CLI runs.

``lim2014_secret_length`` runs once per distilled block (microseconds matter little but should
stay negligible); ``optimize_lim2014`` runs once per distance and bisection step of
``qkdstack keyrate --optimize`` (it sets the CLI's latency).
"""

from __future__ import annotations

import time

from qkdstack.physics.params import ChannelParams, DeviceParams, ReceiverParams, SourceParams
from qkdstack.theory.finite import DecoyCounts, lim2014_secret_length
from qkdstack.theory.keyrate import expected_key_rate, max_distance_km, optimize_lim2014


def _device(length_km: float) -> DeviceParams:
    return DeviceParams(
        source=SourceParams(intensities=(0.45, 0.2, 2e-4), intensity_probs=(0.5, 0.3, 0.2), p_z=0.7),
        channel=ChannelParams(length_km=length_km, attenuation_db_per_km=0.2, misalignment=5e-3),
        receiver=ReceiverParams(p_z=0.7, efficiency=0.1, dark_count=1.2e-6, afterpulse=0.04),
    )


def run() -> dict[str, float]:
    counts = DecoyCounts(
        (0.45, 0.2, 2e-4), (0.5, 0.3, 0.2), (7886670, 2111650, 1680), (1448572, 387854, 309), (34880, 9359, 31)
    )
    n = 20_000
    t = time.perf_counter()
    for _ in range(n):
        lim2014_secret_length(counts, 50_000, 1e-10, 1e-15)
    per_call = (time.perf_counter() - t) / n

    t = time.perf_counter()
    reps = 5
    for _ in range(reps):
        optimize_lim2014(_device(100.0), 1e6, 1.16)
    per_opt = (time.perf_counter() - t) / reps

    t = time.perf_counter()
    d = max_distance_km(lambda L: expected_key_rate(_device(L), "lim2014", block_size=1e6).rate_per_pulse)
    t_bisect = time.perf_counter() - t
    return {
        "lim2014_secret_length_us": per_call * 1e6,
        "optimize_lim2014_s": per_opt,
        "max_distance_bisection_s": t_bisect,
        "max_distance_km_n1e6_fixed_params": d or 0.0,
    }
