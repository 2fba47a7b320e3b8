"""Messages that told a user the wrong story (issue 14, "Misleading messages fixed").

* An ETSI 014 (or SKIP) request before the link's first round said "the peer KME is not connected" although both
  nodes were up: the KME peer link starts only with the first accepted round, so the truth is that no
  key exists yet.
* An abort caused by a block too small for the finite-key bound hinted at an eavesdropper ("too few
  single photons or an eavesdropper", 50 km with 10^8-pulse frames); it now says that the block is too
  small and how much to raise the frame size, and that advice is checked by following it.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from qkdstack.kms.kme import KME, KMEConfig, KMEError
from qkdstack.kms.store import open_store
from qkdstack.physics.device import SimulatedDevice
from qkdstack.physics.eve import parse_eve
from qkdstack.physics.params import DeviceParams
from qkdstack.protocol.keyblock import Abort, KeyBlock
from qkdstack.protocol.round import RoundConfig, run_in_memory

# --- ETSI 014 before the first round ---------------------------------------------------------------


@pytest.fixture
def kme(tmp_path):
    store = open_store(str(tmp_path / "keys.db"))
    yield KME(KMEConfig("KME_A", "KME_B", frozenset({"SAE_A"})), store)
    store.close()


async def test_before_the_first_block_no_key_exists_yet(kme):
    for call in (kme.enc_keys("SAE_A", "SAE_B"), kme.status("SAE_A", "SAE_B")):
        with pytest.raises(KMEError) as err:
            await call
        assert err.value.status == 503
        assert "no key exists yet" in err.value.message and "not connected" not in err.value.message


async def test_with_keys_stored_but_no_peer_link_the_peer_is_not_connected(kme):
    await kme.add_block("block-1", bytes(range(64)))  # two 256-bit keys, no peer link attached
    with pytest.raises(KMEError) as err:
        await kme.enc_keys("SAE_A", "SAE_B")
    assert err.value.status == 503 and "the peer KME is not connected" in err.value.message


async def test_skip_before_the_first_block_says_no_key_exists_yet(kme):
    """The SKIP provider (kms/skip.py) tells the same story as ETSI 014."""
    import asyncio

    from qkdstack.kms.skip import SkipError, SkipService

    service = SkipService(kme, asyncio.get_running_loop())
    for path, query in (("/capabilities", {}), ("/key", {"remoteSystemID": ["SAE_B"]})):
        with pytest.raises(SkipError) as err:
            await asyncio.to_thread(service.answer, "SAE_A", path, query)
        assert err.value.status == 503 and "no key exists yet" in str(err.value), str(err.value)


# --- a block too small for the finite-key bound ----------------------------------------------------


def _round(distance_km: float, pulses: int, eve: str = "none") -> KeyBlock | Abort:
    import asyncio

    params = DeviceParams()
    params = replace(params, channel=replace(params.channel, length_km=distance_km))
    frame = SimulatedDevice(params, parse_eve(eve), seed=1).run_frame(pulses)
    alice, _bob = asyncio.run(run_in_memory(frame, RoundConfig.for_source(params.source)))
    return alice


def test_a_too_small_block_says_so_and_what_to_raise():
    """50 km, 10^8 pulses (the issue's case): the phase-error bound fails on the statistics, not the errors."""
    pulses = 100_000_000
    outcome = _round(50, pulses)
    assert isinstance(outcome, Abort) and outcome.stage == "estimation"
    assert "too small for the finite-key bound" in outcome.reason and "eavesdropper" not in outcome.reason
    assert "pulses_per_frame" in outcome.reason and "--pulses-per-frame" in outcome.reason
    factor = float(re.search(r"at least ([0-9.]+)-fold", outcome.reason).group(1))
    assert 1 < factor < 10
    # The advice holds: "better twice that" gives a key.
    bigger = _round(50, int(2 * factor * pulses))
    assert isinstance(bigger, KeyBlock) and bigger.length > 0


def test_too_many_errors_still_point_at_the_errors():
    """An intercept-resend attack on every third photon: no block size would help, and the message says so."""
    outcome = _round(50, 100_000_000, "intercept-resend:0.3")
    assert isinstance(outcome, Abort) and outcome.stage == "estimation"
    assert "too small" not in outcome.reason
    assert "eavesdropper" in outcome.reason or "QBER" in outcome.reason
