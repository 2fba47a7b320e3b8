"""A node keeps serving keys while it distils (issue 11, item 2), and reports its real-time factor (issue 12).

The device half and the rounds run on the node's distillation loop (its own thread); the ETSI GS QKD 014
server, in-unit delivery and the KME peer link keep the serving loop. The test holds a frame's detection
at node B until an ETSI 014 status request to B has been answered: with both on one loop the request
could never be answered while the detection waits (the detection gives up after 20 s and the test fails),
so the test does not depend on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx

from _node_support import deploy, run_nodes, status
from qkdstack.apps.keysource import _tls_context
from qkdstack.node.rate import RealTimeMeter
from qkdstack.physics.split import Receiver


async def test_etsi014_status_answered_while_a_frame_is_being_detected(tmp_path, monkeypatch):
    layouts = deploy(tmp_path / "dep", "psk", rounds=3)
    blocked, release = threading.Event(), threading.Event()
    released_by_request: list[bool] = []
    detect = Receiver.detect

    def held_detect(self, light):  # the first frame's detection waits until B has answered a request
        if not blocked.is_set():
            blocked.set()
            released_by_request.append(release.wait(20))
        return detect(self, light)

    monkeypatch.setattr(Receiver, "detect", held_detect)
    answered: dict = {}

    async def probe() -> None:
        while not blocked.is_set():
            await asyncio.sleep(0.05)
        lay = layouts["B"]
        cert, key = lay.sae_cert("SAE_B")
        try:  # before the first round the KME peer link is down: 503 with an ETSI Error body is an answer too
            async with httpx.AsyncClient(verify=_tls_context(str(cert), str(key), str(lay.ca)), timeout=15) as c:
                r = await c.get(f"{lay.etsi_url}/api/v1/keys/SAE_A/status")
                answered["status"] = (r.status_code, r.json())
        finally:
            release.set()

    task = asyncio.create_task(probe())
    nodes = await run_nodes([layouts["A"].config, layouts["B"].config], timeout=120)
    await task
    assert released_by_request == [True], "B's ETSI 014 server did not answer while B was detecting a frame"
    code, body = answered["status"]
    before_first_key = code == 503 and ("peer KME" in body["message"] or "no key exists yet" in body["message"])
    assert (code, "SAE_A") == (200, body.get("slave_SAE_ID")) or before_first_key, body
    assert all(n.finished for n in nodes)
    for site in "AB":  # the rounds went on after the held frame, and the factor is reported
        st = status(tmp_path / "dep" / site)
        assert st["rounds_accepted"] == 3, st
        assert st["real_time_factor"] > 0 and st["device_seconds_distilled"] > 0, st


def test_real_time_factor_over_a_sliding_window():
    meter = RealTimeMeter(window_s=60.0, start=1000.0)
    assert meter.factor(1000.0) == 0.0
    meter.add(0.1, at=1001.0)
    meter.add(0.1, at=1002.0)
    assert meter.factor(1002.0) == 0.2 / 2.0  # shorter than the window: since the start
    for i in range(600):  # one round of 0.1 s device time every 0.5 s: factor 0.2
        meter.add(0.1, at=1002.5 + 0.5 * i)
    assert abs(meter.factor(1002.0 + 0.5 * 600) - 0.2) < 0.01
    assert meter.factor(1302.0 + 120) == 0.0  # nothing in the last minute
    assert abs(meter.total_device_s - 60.2) < 1e-9
    meter.restart(start=2000.0)
    assert meter.factor(2030.0) == 0.0
    assert "RealTimeMeter" in repr(meter) and json.dumps(meter.factor(2031.0))
