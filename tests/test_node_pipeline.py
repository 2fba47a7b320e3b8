"""A pipelined node (issue 12): frame k+1 is emitted while round k is distilled, and never more than one ahead.

The transmitter's rounds are wrapped so that each, once distilled, waits (up to 20 s, on an event, not
a timer) for the transmitter to have emitted the next frame. A node that makes a frame only when a
round needs it never emits it meanwhile, and the test fails after 20 s; the pipelined node has done so
long before. The count at that moment also shows the bound: one frame ahead, not more.
"""

from __future__ import annotations

import asyncio
import threading

from _node_support import deploy, run_nodes, status
from qkdstack.physics import split
from qkdstack.protocol import round as distill


async def test_next_frame_is_emitted_while_a_round_is_distilled(tmp_path, monkeypatch):
    layouts = deploy(tmp_path / "dep", "psk", rounds=3)
    emitted = 0
    lock = threading.Lock()
    changed = threading.Condition(lock)
    emit, alice = split.Transmitter.emit, distill.alice

    def counting_emit(self, n_pulses):
        nonlocal emitted
        light = emit(self, n_pulses)
        with changed:
            emitted += 1
            changed.notify_all()
        return light

    def wait_for_emits(count: int) -> int:
        with changed:
            changed.wait_for(lambda: emitted >= count, timeout=20)
            return emitted

    seen: list[tuple[int, int]] = []

    async def waiting_alice(channel, record, config):
        outcome = await alice(channel, record, config)
        k = len(seen) + 1
        seen.append((k, await asyncio.to_thread(wait_for_emits, k + 1)))
        return outcome

    monkeypatch.setattr(split.Transmitter, "emit", counting_emit)
    monkeypatch.setattr(distill, "alice", waiting_alice)
    await run_nodes([layouts["A"].config, layouts["B"].config], timeout=120)
    # After round k: exactly k + 1 frames, i.e. frame k + 1 made during round k, and no further ahead.
    assert seen == [(1, 2), (2, 3), (3, 4)], seen
    for site in "AB":
        assert status(tmp_path / "dep" / site)["rounds_accepted"] == 3
