"""The reproducible mode: the post-processing's public randomness seeded, the same key twice, and labelled."""

from __future__ import annotations

import asyncio

from qkdstack.physics.device import SimulatedDevice
from qkdstack.physics.params import ChannelParams, DeviceParams
from qkdstack.protocol import public_random
from qkdstack.protocol.round import RoundConfig, run_in_memory


def _round(seed: int | None) -> object:
    params = DeviceParams(channel=ChannelParams(length_km=5.0))
    frame = SimulatedDevice(params, seed=7).run_frame(20_000_000)
    config = RoundConfig.for_source(params.source)
    if seed is None:
        return asyncio.run(run_in_memory(frame, config))[0]
    with public_random.reproducible(seed):
        return asyncio.run(run_in_memory(frame, config))[0]


def test_the_same_seed_gives_the_same_block_and_key_and_says_it_is_not_secret() -> None:
    first, second = _round(11), _round(11)
    assert first.block_id == second.block_id and first.key == second.key and first.length > 0
    assert first.stats["public_randomness"] == public_random.SEEDED_LABEL
    assert _round(12).key != first.key


def test_by_default_every_round_draws_fresh_public_randomness_from_the_os() -> None:
    a, b = _round(None), _round(None)
    assert a.block_id != b.block_id and a.key != b.key
    assert "public_randomness" not in a.stats
    assert not public_random.is_seeded()
