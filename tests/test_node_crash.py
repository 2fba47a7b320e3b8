"""kill -9 of a node at the points where a round's key moves between pending/, the authentication pool and
the key store (issue 10, item 5): after a restart keys are delivered at both sites under the same IDs and
the stores agree. The node dies by its own SIGKILL at a named point (``QKDSTACK_TEST_CRASH_AT``)."""

from __future__ import annotations

import asyncio
import time

import pytest

from _fault_proxy import TwoSites
from qkdstack.node.service import CRASH_POINT_ENV


@pytest.mark.parametrize(("site", "point"), [("A", "round-key-aside"), ("A", "round-verified"),
                                             ("B", "round-verified"), ("A", "block-stored")])
async def test_kill_at_each_key_handover_then_keys_flow(tmp_path, monkeypatch, site, point):
    sites = TwoSites(tmp_path / "dep", timeout_s=3.0)
    try:
        other = "B" if site == "A" else "A"
        sites.start(other)
        monkeypatch.setenv(CRASH_POINT_ENV, point)
        sites.start(site)
        monkeypatch.delenv(CRASH_POINT_ENV)
        deadline = time.monotonic() + 150
        while sites.alive(site):
            assert time.monotonic() < deadline, f"{site} never reached {point}: {sites.log(site)[-2000:]}"
            await asyncio.sleep(0.1)
        assert sites.procs[site].returncode == -9  # it died at the point, with no cleanup
        assert sites.alive(other)
        sites.start(site)
        await sites.wait_keys_flow(150, after={site: 0})  # enc_keys at A and dec_keys at B, same bytes
        await sites.wait_stores_agree()
    finally:
        codes = await sites.close()
    assert codes == {"A": 0, "B": 0}
    for s in "AB":
        assert "Traceback" not in sites.log(s), sites.log(s)[-3000:]
