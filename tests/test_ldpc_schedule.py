"""scripts/ldpc_schedule.py, the replay behind the blind-round schedule: it steps as the protocol steps and
counts what the protocol counts."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from qkdstack.protocol import ldpc

_SPEC = importlib.util.spec_from_file_location(
    "ldpc_schedule", Path(__file__).resolve().parents[1] / "scripts" / "ldpc_schedule.py")
schedule = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(schedule)

N, QBER = 100_000, 0.03


def _point(needed: int, e: float = QBER) -> dict:
    plan = ldpc.make_plan(N, QBER, ldpc.LdpcParams())
    return {"qber": QBER, "n": N, "e": e, "needed": needed, "check_bits": 16, "rate": plan.rate, "lift": plan.lift}


def test_replay_stops_each_codeword_at_the_first_step_past_its_decode_point():
    params = ldpc.LdpcParams(blind_step=0.01, blind_growth=0.5, max_blind_rounds=4)
    plan = ldpc.make_plan(N, QBER, params)
    m0, step = plan.syndrome_bits, plan.step
    after = [m0, m0 + step, m0 + step + math.ceil(1.5 * step), m0 + step + math.ceil(1.5 * step) + 2 * step]
    points = [_point(m0 - 5), _point(after[1]), _point(after[1] + 1), _point(after[3] + 10 * step)]
    got = schedule.replay(points, params)
    # the first decodes with the syndrome (1 round trip), the second at round 1, the third needs round 2
    assert got["round_trips_max"] == 3 and got["round_trips"] == pytest.approx((1 + 2 + 3) / 3)
    assert got["given_up"] == 1
    h = ldpc.binary_entropy(QBER)
    expected = np.mean([(after[0] + 16 + 1), (after[1] + 16 + 2), (after[2] + 16 + 3)]) / (N * h)
    assert got["f"] == pytest.approx(expected, abs=1e-4)


def test_replay_counts_f_in_units_of_the_frames_own_error_rate():
    params = ldpc.LdpcParams()
    m0 = ldpc.make_plan(N, QBER, params).syndrome_bits
    low, high = (schedule.replay([_point(m0, e)], params)["f"] for e in (0.028, 0.032))
    assert low > high  # the same bits are more f for a frame with fewer errors
    assert low == pytest.approx((m0 + 17) / (N * ldpc.binary_entropy(0.028)), abs=1e-4)


def test_replay_declines_a_schedule_on_another_mother_code():
    """Another f_start can move the frame to another code, where the measured decode points do not hold."""
    m0 = ldpc.make_plan(N, QBER, ldpc.LdpcParams()).syndrome_bits
    assert schedule.replay([_point(m0)], ldpc.LdpcParams(f_start=1.3)) is None
