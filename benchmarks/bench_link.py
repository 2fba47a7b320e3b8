"""Link benchmark: post-processing rounds over the TCP transport on loopback versus the in-memory channel.

The same simulated frames (25 km and otherwise the node's ``[device]`` and ``[protocol]`` defaults, as
``qkdstack init`` writes them: 10⁸ pulses per frame, μ = 0.5/0.25/0 with probabilities 0.4/0.4/0.2, Z-basis
probability 0.8, the node's Cascade schedule) are distilled by
:func:`qkdstack.protocol.round.alice`/:func:`~qkdstack.protocol.round.bob`, once over an in-memory
channel pair and once over a :class:`~qkdstack.transport.tcp.TcpChannel` pair
(:func:`~qkdstack.transport.tcp.serve`/:func:`~qkdstack.transport.tcp.connect` on 127.0.0.1), both
parties in one event loop so the only difference is the transport (codec encoding happens in both).
The loop is uvloop's, as in ``qkdstack node``.
Runs are interleaved (memory, TCP, memory, TCP, ...) so that load from other processes hits both
alike; each figure is the median over the repetitions.

Figures:

* ``memory_round_s`` / ``tcp_round_s`` - median wall time of one round (post-processing only: the
  physics simulation is done beforehand and not timed);
* ``memory_rounds_per_s`` / ``tcp_rounds_per_s`` and ``memory_secret_bit_per_s`` /
  ``tcp_secret_bit_per_s`` - the corresponding round and secret-key rates of the post-processing;
* ``transport_overhead_pct`` - ``100 * (tcp_round_s / memory_round_s - 1)`` (target: under 20 %);
* ``memory_round_cpu_s`` / ``tcp_round_cpu_s`` and ``transport_overhead_cpu_pct`` - the same with the
  process's CPU time (user + system, so the kernel's loopback work counts), which load from other
  processes on a shared machine disturbs much less than wall time;
* ``classical_bytes_per_round`` - bytes both parties sent per round (codec frames, without the
  12-byte TCP frame header each) and ``frames_per_round``.

Not included: authentication (its cost is in ``bench_auth``) and the quantum-channel transfer of the
light (a simulation artefact standing in for the fibre).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import uvloop

from qkdstack.node.config import DeviceSection, ProtocolSection
from qkdstack.physics.device import SimulatedDevice
from qkdstack.physics.params import DeviceParams
from qkdstack.physics.records import Frame
from qkdstack.protocol import round as distill
from qkdstack.protocol.channel import Channel, channel_pair
from qkdstack.protocol.keyblock import KeyBlock
from qkdstack.protocol.round import RoundConfig
from qkdstack.transport.tcp import TcpChannel, connect, serve

DISTANCE_KM = 25.0
PULSES = DeviceSection().pulses_per_frame
FRAMES = 2
REPEATS = 5


def _params() -> DeviceParams:
    """The node's default device (``[device]`` section defaults) at 25 km."""
    return DeviceSection(distance_km=DISTANCE_KM, pulses_per_frame=PULSES).params()


async def _round(a: Channel, b: Channel, frame: Frame, config: RoundConfig) -> tuple[float, float, int, int, int]:
    """One round over (a, b): (wall seconds, CPU seconds, secret bits, bytes sent, frames sent)."""
    a.stats.reset()
    b.stats.reset()
    t, c = time.perf_counter(), time.process_time()
    out_a, out_b = await asyncio.gather(distill.alice(a, frame.alice, config), distill.bob(b, frame.bob, config))
    dt, dc = time.perf_counter() - t, time.process_time() - c
    if not isinstance(out_a, KeyBlock) or not isinstance(out_b, KeyBlock) or out_a.key != out_b.key:
        raise RuntimeError(f"benchmark round did not produce a matching key: {out_a!r} / {out_b!r}")
    sent = sum(c.wire_bytes for ch in (a, b) for (_s, d), c in ch.stats.counters.items() if d == "sent")
    return dt, dc, out_a.length, sent, a.stats.messages(direction="sent") + b.stats.messages(direction="sent")


async def _tcp_pair() -> tuple[TcpChannel, TcpChannel, asyncio.Server, asyncio.Event]:
    accepted: asyncio.Queue[TcpChannel] = asyncio.Queue()
    done = asyncio.Event()

    async def handler(channel: TcpChannel) -> None:
        await accepted.put(channel)
        await done.wait()

    server = await serve("127.0.0.1", 0, handler)
    port = server.sockets[0].getsockname()[1]
    client = await connect("127.0.0.1", port)
    return client, await accepted.get(), server, done


async def _measure(frames: list[Frame], config: RoundConfig, repeats: int) -> dict[str, list[float]]:
    tcp_a, tcp_b, server, done = await _tcp_pair()
    res: dict[str, list[float]] = {k: [] for k in ("memory", "tcp", "memory_cpu", "tcp_cpu", "bits", "bytes", "frames")}
    try:
        for _ in range(repeats):
            for frame in frames:
                mem_a, mem_b = channel_pair()
                dt, dc, bits, _, n = await _round(mem_a, mem_b, frame, config)
                res["memory"].append(dt)
                res["memory_cpu"].append(dc)
                res["bits"].append(bits)
                dt, dc, _, sent_tcp, _ = await _round(tcp_a, tcp_b, frame, config)
                res["tcp"].append(dt)
                res["tcp_cpu"].append(dc)
                res["bytes"].append(sent_tcp)
                res["frames"].append(n)
    finally:
        done.set()
        await tcp_a.close()
        server.close()
    return res


def run(frames: int = FRAMES, repeats: int = REPEATS, pulses: int = PULSES) -> dict[str, Any]:
    params = _params()
    proto = ProtocolSection()
    config = RoundConfig.for_source(  # as the node builds it (qkdstack.node.service.Node)
        params.source,
        eps_sec=proto.eps_sec,
        eps_cor=proto.eps_cor,
        max_qber=proto.max_qber,
        max_phase_error=proto.max_phase_error,
        cascade_schedule=proto.cascade_schedule,
    )
    device = SimulatedDevice(params, seed=2026)
    t = time.perf_counter()
    made = [device.run_frame(pulses) for _ in range(frames)]
    sim_s = time.perf_counter() - t
    res = uvloop.run(_measure(made, config, repeats))  # the event loop `qkdstack node` runs on
    mem, tcp = statistics.median(res["memory"]), statistics.median(res["tcp"])
    mem_cpu, tcp_cpu = statistics.median(res["memory_cpu"]), statistics.median(res["tcp_cpu"])
    bits = statistics.mean(res["bits"])
    return {
        "distance_km": DISTANCE_KM,
        "pulses_per_frame": pulses,
        "cascade_schedule": proto.cascade_schedule,
        "frames": frames,
        "repeats": repeats,
        "simulation_s_per_frame": sim_s / frames,
        "secret_bits_per_round": bits,
        "memory_round_s": mem,
        "tcp_round_s": tcp,
        "memory_rounds_per_s": 1 / mem,
        "tcp_rounds_per_s": 1 / tcp,
        "memory_secret_bit_per_s": bits / mem,
        "tcp_secret_bit_per_s": bits / tcp,
        "transport_overhead_pct": 100 * (tcp / mem - 1),
        "memory_round_cpu_s": mem_cpu,
        "tcp_round_cpu_s": tcp_cpu,
        "transport_overhead_cpu_pct": 100 * (tcp_cpu / mem_cpu - 1),
        "classical_bytes_per_round": statistics.mean(res["bytes"]),
        "frames_per_round": statistics.mean(res["frames"]),
        "memory_round_s_all": res["memory"],
        "tcp_round_s_all": res["tcp"],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
