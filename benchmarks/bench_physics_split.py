"""Cost per frame of the split device (transmitter | light | receiver) against the combined device.

For each distance (25 and 50 km, default device, 1 GHz source) and frame size (1e8 and 4e8
pulses) it times, per frame: ``Transmitter.emit``, the quantum channel's encoding and
decoding of the light (:func:`qkdstack.node.quantum.encode_light` / ``decode_light``, the
message fields without the socket), ``Receiver.detect``, and Alice's look-up of Bob's
detected indices (``TransmitterRecord.lookup``, what sifting does), beside
``SimulatedDevice.run_frame`` on the same parameters. Best of a few frames after a warm-up
(Numba kernels load from their cache on first use); a shared machine is noisy.
"""

from __future__ import annotations

import time

from qkdstack.node.quantum import TransmitterRecord, decode_light, encode_light
from qkdstack.physics.device import SimulatedDevice
from qkdstack.physics.params import ChannelParams, DeviceParams, SourceParams
from qkdstack.physics.split import Receiver, Transmitter

REPEATS = 3
CASES = ((25, 100_000_000), (25, 400_000_000), (50, 100_000_000), (50, 400_000_000))


def _best(fn, repeats: int = REPEATS):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def case(km: float, n_pulses: int, repeats: int = REPEATS) -> dict:
    params = DeviceParams(source=SourceParams(rep_rate_hz=1e9), channel=ChannelParams(length_km=km))
    tx = Transmitter(params, seed=1)
    rx = Receiver(params.receiver, params.channel.misalignment, params.source.rep_rate_hz, seed=2)
    combined = SimulatedDevice(params, seed=3, afterpulse_mode="next-gate")
    t_emit, light = _best(lambda: tx.emit(n_pulses), repeats)
    t_enc, fields = _best(lambda: encode_light(light, 1), repeats)
    t_dec, (_, light2) = _best(lambda: decode_light(fields), repeats)
    t_det, bob = _best(lambda: rx.detect(light2), repeats)
    record = TransmitterRecord(tx, n_pulses)
    t_look, _ = _best(lambda: record.lookup(bob.pulse_index), repeats)
    t_comb, frame = _best(lambda: combined.run_frame(n_pulses), repeats)
    split_total = t_emit + t_enc + t_dec + t_det + t_look
    return {
        "pulses": n_pulses,
        "arriving_light": len(light),
        "detections_split": len(bob),
        "detections_combined": len(frame.bob),
        "emit_s": round(t_emit, 4),
        "encode_light_s": round(t_enc, 4),
        "decode_light_s": round(t_dec, 4),
        "detect_s": round(t_det, 4),
        "lookup_s": round(t_look, 4),
        "split_total_s": round(split_total, 4),
        "combined_run_frame_s": round(t_comb, 4),
        "split_over_combined": round(split_total / t_comb, 2),
        "device_seconds_per_wall_s_split": round(n_pulses / 1e9 / split_total, 2),
    }


def run() -> dict:
    case(25, 1_000_000, repeats=1)  # warm-up: compile or load the kernels
    return {f"split_{km}km_{n:.0e}".replace("+0", ""): case(km, n) for km, n in CASES}


if __name__ == "__main__":
    import json
    import sys

    cases = CASES if len(sys.argv) < 2 else tuple((float(a), int(float(b))) for a, b in
                                                  (arg.split(":") for arg in sys.argv[1:]))
    case(25, 1_000_000, repeats=1)
    print(json.dumps({f"{km}km_{n:.0e}": case(km, n) for km, n in cases}, indent=2))
