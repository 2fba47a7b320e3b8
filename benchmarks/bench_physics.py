"""Throughput of the simulated decoy-state BB84 device (qkdstack.physics).

Figures: detection events per second and simulated pulses per second of wall time at 10,
50 and 100 km for a 1 GHz source (default device: μ = 0.5/0.1/0, η_Bob = 0.1, Y0 = 1e-6,
0.2 dB/km), the wall time to simulate one second of a 2.5 GHz source at 50 km, and the
split (transmitter | receiver) form at 50 km for reference. Frames are timed a few times
after a warm-up (Numba's compiled kernels load from its cache on first use); rates use the
best time (``wall_s_best``, the usual figure on a shared machine), and the median is
reported beside it. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import statistics
import time

from qkdstack.physics.device import SimulatedDevice
from qkdstack.physics.params import ChannelParams, DeviceParams, SourceParams
from qkdstack.physics.split import SplitDevice

REPEATS = 5
TARGET_EVENTS = 5_000_000


def _time_frames(device, n_pulses: int, repeats: int = REPEATS) -> tuple[float, float, int]:
    """(best, median) wall time of ``repeats`` frames and the detections of the last one."""
    times = []
    detections = 0
    for _ in range(repeats):
        start = time.perf_counter()
        frame = device.run_frame(n_pulses)
        times.append(time.perf_counter() - start)
        detections = len(frame.bob)
    return min(times), statistics.median(times), detections


def run() -> dict:
    results: dict[str, object] = {}
    SimulatedDevice(DeviceParams(), seed=0).run_frame(1_000_000)  # warm-up: load compiled kernels
    for km in (10, 50, 100):
        params = DeviceParams(source=SourceParams(rep_rate_hz=1e9), channel=ChannelParams(length_km=km))
        device = SimulatedDevice(params, seed=km)
        n_pulses = int(min(1e11, TARGET_EVENTS / device.detection_probability))
        wall, median, detections = _time_frames(device, n_pulses)
        results[f"{km}km_1GHz"] = {
            "pulses": n_pulses,
            "detections": detections,
            "wall_s_best": round(wall, 4),
            "wall_s_median": round(median, 4),
            "detection_events_per_s": round(detections / wall),
            "detection_events_per_s_median": round(detections / median),
            "simulated_pulses_per_s": round(n_pulses / wall),
            "simulated_source_seconds_per_wall_s": round(n_pulses / 1e9 / wall, 3),
        }
    params = DeviceParams(source=SourceParams(rep_rate_hz=2.5e9), channel=ChannelParams(length_km=50))
    wall, median, detections = _time_frames(SimulatedDevice(params, seed=1), int(2.5e9))
    results["one_second_2.5GHz_50km"] = {
        "pulses": int(2.5e9),
        "detections": detections,
        "wall_s_best": round(wall, 4),
        "wall_s_median": round(median, 4),
        "detection_events_per_s": round(detections / wall),
    }
    split = SplitDevice(DeviceParams(channel=ChannelParams(length_km=50)), seed=2)
    split.run_frame(1_000_000)
    wall, _, detections = _time_frames(split, 100_000_000, repeats=1)
    results["split_form_50km_1GHz"] = {
        "pulses": 100_000_000,
        "detections": detections,
        "wall_s_best": round(wall, 4),
        "detection_events_per_s": round(detections / wall),
        "simulated_pulses_per_s": round(1e8 / wall),
    }
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
