"""LDPC reconciliation: keys agree after reconciliation + verification, every crossing bit is counted,
frames beyond the codes' reach fail cleanly, codes are deterministic, rounds work end to end."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdstack.errors import ConfigError, ProtocolAbort
from qkdstack.protocol import ldpc, ldpc_codes, verification
from qkdstack.protocol.channel import RECEIVED, SENT, channel_pair
from qkdstack.protocol.keyblock import Abort, KeyBlock
from qkdstack.protocol.round import RoundConfig, run_in_memory

N_CODE = 2048
"""Small codes keep the tests fast (each is built once per process, a second or two)."""

# Generous parameters: small codes are far from capacity, and the tests check correctness, not f.
EASY = ldpc.LdpcParams(code_n=N_CODE, f_start=1.4, blind_step=0.15, max_blind_rounds=12)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QKDSTACK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ldpc-cache"))


def _frame(n: int, qber: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Alice's key and Bob's copy with exactly round(qber·n) flipped positions."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, n, dtype=np.uint8)
    flips = rng.choice(n, size=round(qber * n), replace=False)
    b = a.copy()
    b[flips] ^= 1
    return a, b


async def _reconcile(a, b, qber, params=EASY, log=None):
    ca, cb = channel_pair(timeout=60)
    if log is not None:
        cb.add_observer(lambda direction, frame: log.append((direction, frame)))
    ra, rb = await asyncio.gather(ldpc.alice(ca, a, qber, params, seed=1), ldpc.bob(cb, b, qber, params))
    return ra, rb, ca, cb


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    qber=st.floats(0.005, 0.10),
    n=st.integers(1500, 6000),
    seed=st.integers(0, 2**32),
)
def test_keys_identical_after_reconciliation_and_verification(qber, n, seed):
    a, b = _frame(n, qber, seed)

    async def run():
        ra, rb, ca, cb = await _reconcile(a, b, qber)
        va, vb = await asyncio.gather(verification.alice(ca, ra.key, 1e-12), verification.bob(cb, rb.key, 1e-12))
        return ra, rb, va, vb

    ra, rb, _va, _vb = asyncio.run(run())  # verification raises ProtocolAbort on any residual error
    assert np.array_equal(ra.key, a)  # Alice's key never changes
    assert np.array_equal(rb.key, a)
    assert rb.errors_corrected == int(np.count_nonzero(a != b))


def test_disclosed_bits_equal_what_crossed():
    a, b = _frame(5000, 0.03, 3)
    log = []
    # A tight start forces blind rounds, so reveal and repeated status messages are counted too.
    params = dataclasses.replace(EASY, f_start=1.0, blind_step=0.1)
    ra, rb, ca, cb = asyncio.run(_reconcile(a, b, 0.03, params, log))
    assert rb.blind_rounds >= 1 and rb.revealed_bits > 0
    from qkdstack.transport.codec import decode_message

    crossed = {SENT: 0, RECEIVED: 0}
    for direction, frame in log:
        _kind, _fields, disclosed = decode_message(frame)
        crossed[direction] += len(disclosed) if disclosed is not None else 0
    # Bob's view: he received the syndromes, check parities and revealed bits, sent one status bit per open
    # codeword.
    assert rb.check_bits == ra.check_bits == params.check_bits * rb.codewords
    assert crossed[RECEIVED] == rb.syndrome_bits + rb.check_bits + rb.revealed_bits
    assert crossed[SENT] == rb.status_bits >= rb.codewords
    assert rb.leaked_bits == ra.leaked_bits == sum(crossed.values()) == cb.stats.disclosed_bits("ldpc")
    assert ca.stats.disclosed_bits("ldpc", SENT) == cb.stats.disclosed_bits("ldpc", RECEIVED)
    assert rb.round_trips == ra.round_trips == rb.blind_rounds + 1


def test_frame_beyond_reach_fails_cleanly_and_is_counted():
    # The estimate says 1 %, the frame has 12 %: no number of small blind rounds saves it.
    a, b = _frame(4000, 0.12, 5)
    params = dataclasses.replace(EASY, f_start=1.1, blind_step=0.02, max_blind_rounds=2)
    with pytest.raises(ProtocolAbort, match=r"codewords failed to decode after 2 blind rounds") as info:
        asyncio.run(_reconcile(a, b, 0.01, params))
    assert info.value.stage == "ldpc"


def test_estimate_beyond_any_code_is_refused():
    with pytest.raises(ProtocolAbort, match="beyond the reach"):
        ldpc.make_plan(10_000, 0.3, EASY)
    with pytest.raises(ConfigError):
        ldpc.make_plan(0, 0.03, EASY)


@pytest.mark.parametrize("qber", [0.01, 0.03, 0.08])
def test_plan_sizes_the_first_syndrome_by_merging_rows(qber):
    """As few codewords as hold the frame, and a first syndrome of exactly ⌈f_start·h(q)·k⌉ bits per codeword
    (merged row pairs of a mother code), not the whole m rows of a shortened code."""
    params = dataclasses.replace(EASY, f_start=1.1, max_lift=1)  # the base codes (lifts: test_ldpc_codes.py)
    plan = ldpc.make_plan(100_000, qber, params)
    assert sum(plan.payloads) == 100_000 and max(plan.payloads) - min(plan.payloads) <= 1
    assert plan.codewords == -(-100_000 // N_CODE)
    assert plan.m == round(N_CODE * (1 - plan.rate)) and 0 <= plan.merged <= plan.m // 2
    assert plan.syndrome_bits == math.ceil(params.f_start * ldpc.binary_entropy(qber) * max(plan.payloads))
    # the mother code leaves room for the blind rounds to un-merge rows, without merging too much of it;
    # else the fewest rows that leave that room; else the fewest rows that reach the first syndrome
    roomy = plan.m >= plan.syndrome_bits * params.merge_headroom and plan.merged <= params.max_merged * plan.m
    rows = [round(N_CODE * (1 - r)) for r in ldpc_codes.RATES]
    with_room = [m for m in rows if m >= plan.syndrome_bits * params.merge_headroom]
    assert roomy or plan.m == min(with_room or [m for m in rows if m >= plan.syndrome_bits])
    # a syndrome longer than the lowest-rate code has rows: shorter payloads (more codewords), still exact
    steep = ldpc.make_plan(100_000, 0.08, dataclasses.replace(EASY, max_lift=1))
    assert steep.codewords > plan.codewords and steep.syndrome_bits <= steep.m


def test_plan_keeps_rows_to_unmerge_when_the_first_syndrome_fills_a_code():
    """An unshortened frame at QBER 2 % needs 305 syndrome bits per 2048-bit codeword: the rate-0.85 code
    (307 rows) would leave 2 rows to un-merge, and the blind rounds would be extra parities (f = 1.22 against
    1.13 measured on 114688-bit codewords). The rate-0.8 code leaves the headroom, with more than
    ``max_merged`` of its rows merged."""
    params = dataclasses.replace(EASY, f_start=1.05, max_lift=1)
    plan = ldpc.make_plan(4 * N_CODE, 0.02, params)
    assert plan.syndrome_bits == 305 and plan.codewords == 4
    assert plan.rate == 0.8 and plan.m >= params.merge_headroom * plan.syndrome_bits
    assert plan.merged > params.max_merged * plan.m


def test_a_code_listed_in_f_start_by_rate_starts_higher_with_the_same_code():
    """``f_start_by_rate`` lengthens the first syndrome of frames on the listed codes (fewer pairs merged) and
    changes nothing else: the code, its lift and the codewords are the ones f_start chooses; a listed f
    below f_start, or a rate not listed, leaves the plan as it was. Both parties plan alike, so a frame
    reconciles with it."""
    base = dataclasses.replace(EASY, f_start=1.05, max_lift=1, f_start_by_rate=())
    plan = ldpc.make_plan(20_000, 0.01, base)
    higher = ldpc.make_plan(20_000, 0.01, dataclasses.replace(base, f_start_by_rate=((plan.rate, 1.2),)))
    h, k = ldpc.binary_entropy(0.01), max(plan.payloads)
    assert (higher.rate, higher.m, higher.lift, higher.payloads) == (plan.rate, plan.m, plan.lift, plan.payloads)
    assert plan.syndrome_bits == math.ceil(1.05 * h * k) and higher.syndrome_bits == math.ceil(1.2 * h * k)
    assert higher.merged == plan.merged - (higher.syndrome_bits - plan.syndrome_bits) and higher.step == plan.step
    for same in (((plan.rate, 1.0),), ((0.123, 1.3),)):
        assert ldpc.make_plan(20_000, 0.01, dataclasses.replace(base, f_start_by_rate=same)) == plan
    a, b = _frame(20_000, 0.01, 5)
    params = dataclasses.replace(base, f_start_by_rate=((plan.rate, 1.2),), blind_step=0.1)
    ra, rb, _ca, _cb = asyncio.run(_reconcile(a, b, 0.01, params))
    assert np.array_equal(rb.key, a) and ra.syndrome_bits == higher.codewords * higher.syndrome_bits


def test_merge_pairs_are_disjoint_rows():
    code = ldpc_codes.get_code(0.7, N_CODE)
    pairs = ldpc_codes.merge_pairs(code)
    assert pairs.shape[0] >= 0.4 * code.m and np.unique(pairs).size == pairs.size
    for c1, c2 in pairs:
        r1 = code.col_idx[code.row_ptr[c1] : code.row_ptr[c1 + 1]]
        r2 = code.col_idx[code.row_ptr[c2] : code.row_ptr[c2 + 1]]
        assert np.intersect1d(r1, r2).size == 0
    # a merged state's rows are the unions, and its syndrome is the XOR of the two rows' syndromes
    st = ldpc._state(code, pairs, 100, 40)
    assert st.row_ptr.size - 1 == code.m - 60
    word = np.random.default_rng(1).integers(0, 2, code.n, dtype=np.uint8)
    full = code.syndrome(word)
    mine = np.empty((1, st.row_ptr.size - 1), np.uint8)
    ldpc._syndromes(st.row_ptr, st.col_idx, word[None, :], mine)
    assert np.array_equal(mine[0], np.concatenate([full[st.c1] ^ full[st.c2], full[st.singles]]))


@pytest.mark.parametrize("weight, count", [(5, 40), (1000, 4)])
def test_extra_and_check_rows_are_sorted_draws_of_the_public_seed(weight, count):
    """Both parties derive the same rows: ``weight`` distinct key positions per row, drawn in order from the
    (seed, round, k) stream and sorted; the dense rows (the check parities) take another path to the same
    rows, which must stay the rows a peer derives by sorting."""
    n, k = 4096, 3000
    positions = np.random.default_rng(3).permutation(n).astype(np.int64)
    rows = ldpc._extension(7, 2, k, count, weight, positions)
    rng = np.random.default_rng([7, 2, k])
    expected = [np.sort(positions[rng.choice(k, size=weight, replace=False)]) for _ in range(count)]
    assert np.array_equal(rows, np.array(expected))
    assert np.isin(rows, positions[:k]).all()


def test_codes_are_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QKDSTACK_CACHE_DIR", str(tmp_path))
    one = ldpc_codes.build_code(0.8, 1024)
    two = ldpc_codes.build_code(0.8, 1024)
    assert np.array_equal(one.col_idx, two.col_idx) and np.array_equal(one.row_ptr, two.row_ptr)
    ldpc_codes.get_code.cache_clear()
    cached = ldpc_codes.get_code(0.8, 1024)
    assert np.array_equal(cached.col_idx, one.col_idx)
    assert list(tmp_path.glob("ldpc/*.npz"))
    # Degrees follow the distribution: at most m − 1 degree-2 variables, no repeated edge in a check.
    deg = np.diff(one.var_ptr)
    assert np.count_nonzero(deg == 2) <= one.m - 1 and deg.min() >= 2
    for c in range(one.m):
        row = one.col_idx[one.row_ptr[c] : one.row_ptr[c + 1]]
        assert np.unique(row).size == row.size
    rows = np.diff(one.row_ptr)
    assert rows.max() - rows.min() <= 1  # concentrated check degrees
    ldpc_codes.get_code.cache_clear()


def test_decoder_corrects_a_known_error_pattern():
    code = ldpc_codes.get_code(0.5, N_CODE)
    rng = np.random.default_rng(0)
    err = (rng.random((3, code.n)) < 0.03).astype(np.uint8)
    synd = np.stack([code.syndrome(e) for e in err])
    llr = np.full((3, code.n), np.log(0.97 / 0.03), dtype=np.float32)
    out = np.zeros_like(err)
    iters = np.zeros(3, dtype=np.int32)
    ldpc.decode_batch(code.row_ptr, code.col_idx, llr, synd, 50, 0.0, out, iters)
    assert (iters > 0).all() and np.array_equal(out, err)


def test_mismatched_key_length_aborts():
    a, _ = _frame(3000, 0.02, 1)

    async def run():
        ca, cb = channel_pair(timeout=10)
        return await asyncio.gather(ldpc.alice(ca, a, 0.02, EASY, seed=1), ldpc.bob(cb, a[:2999], 0.02, EASY),
                                    return_exceptions=True)

    _ra, rb = asyncio.run(run())
    assert isinstance(rb, ProtocolAbort) and "length mismatch" in str(rb)


def test_round_in_memory_with_ldpc():
    from qkdstack.physics.device import SimulatedDevice
    from qkdstack.physics.eve import parse_eve
    from qkdstack.physics.params import ChannelParams, DeviceParams, ReceiverParams, SourceParams

    params = DeviceParams(
        source=SourceParams(intensities=(0.5, 0.25, 0.0), intensity_probs=(0.4, 0.4, 0.2), p_z=0.8),
        channel=ChannelParams(length_km=25),
        receiver=ReceiverParams(p_z=0.8),
    )
    frame = SimulatedDevice(params, eve=parse_eve("none"), seed=7).run_frame(60_000_000)
    # A whole frame is ~100 codewords: with 2048-bit codes one of them decodes to a wrong codeword (same
    # syndrome; the verification stage then rejects the frame) in about one run in six; 8192-bit codes make
    # that rare enough for a test (the node's default codes have 16384 bits).
    config = RoundConfig.for_source(params.source, reconciliation="ldpc", ldpc=replace(EASY, code_n=8192))
    a, b = asyncio.run(run_in_memory(frame, config))
    assert isinstance(a, KeyBlock) and isinstance(b, KeyBlock), (a, b)
    assert a.key == b.key and a.length > 0
    assert set(a.leakage_bits) == {"ldpc", "verification"}
    assert a.stats["reconciliation"] == "ldpc" and a.stats["ldpc_efficiency"] > 1.0
    assert a.leakage_accounting["lambda_bits"] == a.finite_key["leakage_bits"]
    assert "ldpc" in a.stage_seconds


def test_round_gives_up_a_frame_cleanly():
    """A first attempt far below capacity and no blind rounds: the round aborts in the LDPC stage."""
    from qkdstack.physics.device import SimulatedDevice
    from qkdstack.physics.eve import parse_eve
    from qkdstack.physics.params import ChannelParams, DeviceParams, ReceiverParams, SourceParams

    params = DeviceParams(
        source=SourceParams(intensities=(0.5, 0.25, 0.0), intensity_probs=(0.4, 0.4, 0.2), p_z=0.8),
        channel=ChannelParams(length_km=25),
        receiver=ReceiverParams(p_z=0.8),
    )
    frame = SimulatedDevice(params, eve=parse_eve("none"), seed=8).run_frame(60_000_000)
    hopeless = dataclasses.replace(EASY, f_start=0.5, max_blind_rounds=0)
    config = RoundConfig.for_source(params.source, reconciliation="ldpc", ldpc=hopeless)
    a, b = asyncio.run(run_in_memory(frame, config))
    for outcome in (a, b):
        assert isinstance(outcome, Abort) and outcome.stage == "ldpc", outcome
        assert "failed to decode after 0 blind rounds; the frame is given up" in outcome.reason


def test_round_parties_must_agree_on_reconciliation():
    from qkdstack.physics.params import SourceParams
    from qkdstack.protocol import round as round_mod

    source = SourceParams(intensities=(0.5, 0.25, 0.0), intensity_probs=(0.4, 0.4, 0.2), p_z=0.8)
    alice_cfg = RoundConfig.for_source(source, reconciliation="ldpc")
    bob_cfg = RoundConfig.for_source(source)
    assert alice_cfg.public_parameters()["reconciliation"] == "ldpc"

    async def run():
        ca, cb = channel_pair(timeout=10)
        await ca.send("round.start", block_id="x", parameters=alice_cfg.public_parameters())
        return await round_mod.bob(cb, None, bob_cfg)  # type: ignore[arg-type]

    outcome = asyncio.run(run())
    assert isinstance(outcome, Abort) and "reconciliation" in outcome.reason
    with pytest.raises(ConfigError, match="reconciliation"):
        RoundConfig.for_source(source, reconciliation="turbo")


def test_warm_start_carries_messages_of_unchanged_rows():
    """Blind rounds continue a failed decoding: rows kept across the un-merge keep their check messages,
    the rows just un-merged start at 0, and a warm start from zero messages is the cold decoder exactly."""
    code = ldpc_codes.get_code(0.7, N_CODE)
    pairs = ldpc_codes.merge_pairs(code)
    t = 60
    before, after = ldpc._state(code, pairs, t, 0), ldpc._state(code, pairs, t, 20)
    keys = [np.concatenate([-(np.arange(j, t) + 1), st.singles]) for j, st in ((0, before), (20, after))]
    old = np.random.default_rng(2).standard_normal((3, before.col_idx.size)).astype(np.float32)
    new = np.full((2, after.col_idx.size), np.nan, dtype=np.float32)
    old_rows = np.array([2, 0])  # the codewords still open: the last attempt's third and first
    ldpc._carry(keys[0], before.row_ptr, old, old_rows, keys[1], after.row_ptr, t + 1, new)
    assert not np.isnan(new).any()
    for r, key in enumerate(keys[1]):
        got = new[:, after.row_ptr[r] : after.row_ptr[r + 1]]
        if key < 0 or key not in set(pairs[:20].ravel().tolist()):  # still merged, or a single row all along
            o = int(np.flatnonzero(keys[0] == key)[0])
            assert np.array_equal(got, old[old_rows, before.row_ptr[o] : before.row_ptr[o + 1]])
        else:  # un-merged just now
            assert not got.any()
    rng = np.random.default_rng(3)
    err = (rng.random((2, code.n)) < 0.025).astype(np.uint8)
    synd = np.stack([code.syndrome(e) for e in err])
    llr = np.full((2, code.n), np.log(0.975 / 0.025), dtype=np.float32)
    cold_out, warm_out = np.zeros_like(err), np.zeros_like(err)
    cold_it, warm_it = np.zeros(2, np.int32), np.zeros(2, np.int32)
    ldpc.decode_batch(code.row_ptr, code.col_idx, llr, synd, 50, 0.0, cold_out, cold_it)
    r_state = np.zeros((2, code.edges), np.float32)
    ldpc.decode_batch_warm(code.row_ptr, code.col_idx, llr, synd, 50, 0.0, warm_out, warm_it, r_state)
    assert np.array_equal(cold_out, warm_out) and np.array_equal(cold_it, warm_it) and (cold_it > 0).all()
    # continuing from the converged messages needs a single iteration
    ldpc.decode_batch_warm(code.row_ptr, code.col_idx, llr, synd, 50, 0.0, warm_out, warm_it, r_state)
    assert (warm_it == 1).all() and np.array_equal(warm_out, err)
