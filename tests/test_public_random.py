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


def _distill(capsys, *flags: str) -> tuple[int, str, str]:
    from qkdstack.cli import main

    code = main(["distill", "--distance-km", "5", "--pulses", "2e7", "--seed", "3", *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_distill_reproducible_repeats_a_run_bit_for_bit_and_warns(capsys) -> None:
    import json

    runs = [_distill(capsys, "--rounds", "2", "--reproducible", "5", "--json") for _ in range(2)]
    (code, first, err), (_, second, _) = runs
    assert code == 0 and "keys are predictable and not secret" in err
    a, b = json.loads(first), json.loads(second)
    assert [r["block_id"] for r in a["rounds"]] == [r["block_id"] for r in b["rounds"]]
    assert a["summary"]["secret_bits"] == b["summary"]["secret_bits"] and a["summary"]["reproducible_seed"] == 5
    assert a["rounds"][0]["block_id"] != a["rounds"][1]["block_id"]  # one stream across the rounds


def test_distill_prints_a_row_per_round_and_no_progress_bar_off_a_terminal(capsys) -> None:
    code, out, err = _distill(capsys, "--rounds", "3")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split()[:3] == ["round", "outcome", "QBER"]
    assert [line.split()[0] for line in lines[1:4]] == ["1", "2", "3"] and "accepted" in lines[1]
    assert lines[-1].startswith("3/3 rounds accepted")
    assert "[#" not in err  # stderr is not a terminal here
