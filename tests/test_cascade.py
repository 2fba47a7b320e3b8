"""Cascade: corrects errors, counts every disclosed bit both ways, keeps Alice's key, rejects bad input."""

from __future__ import annotations

import asyncio
import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdstack.errors import ConfigError, ProtocolAbort
from qkdstack.protocol import cascade
from qkdstack.protocol import cascade_kernels as K  # noqa: N812
from qkdstack.protocol.cascade import MIN_QBER, CascadeSchedule, block_sizes, get_schedule
from qkdstack.protocol.channel import RECEIVED, SENT, channel_pair


def _frame(n: int, qber: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Test oracle: Alice's key and Bob's noisy copy (i.i.d. flips with probability qber)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, n, dtype=np.uint8)
    return a, a ^ (rng.random(n) < qber).astype(np.uint8)


async def _run(a, b, qber, schedule="optimized", seed=0, log=None):
    ca, cb = channel_pair(timeout=30)
    if log is not None:
        cb.add_observer(lambda d, frame: log.append((d, frame)))
    ra, rb = await asyncio.gather(
        cascade.alice(ca, a, qber, schedule, seed_rng=np.random.default_rng(seed)),
        cascade.bob(cb, b, qber, schedule),
    )
    return ra, rb, ca, cb


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(100, 20000),
    qber=st.sampled_from([0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.11]),
    schedule=st.sampled_from(["original", "optimized", "batched"]),
    seed=st.integers(0, 2**32),
)
def test_corrects_all_errors(n, qber, schedule, seed):
    a, b = _frame(n, qber, seed)
    a0, b0 = a.copy(), b.copy()
    ra, rb, _ca, cb = asyncio.run(_run(a, b, qber, schedule, seed))
    assert np.array_equal(a, a0) and np.array_equal(b, b0)  # inputs untouched
    assert np.array_equal(ra.key, a0)  # Alice's key never changes
    # Bob reports exactly the flips he made, so a residual error is never hidden.
    assert rb.errors_corrected == int(np.count_nonzero(rb.key != b0))
    residual = int(np.count_nonzero(rb.key != a0))
    errors = int(np.count_nonzero(a0 != b0))
    # The 4-pass original schedule has a visible frame error rate on short keys at 11 %;
    # the 14-pass schedules must correct everything at these sizes.
    if schedule != "original" or (n >= 2000 and qber <= 0.05):
        assert residual == 0, f"{residual} of {errors} errors left (n={n}, qber={qber}, {schedule})"
    assert rb.leaked_bits == ra.leaked_bits == cb.stats.disclosed_bits("cascade")
    assert rb.decision_bits == ra.decision_bits == rb.parity_bits == ra.parity_bits == rb.leaked_bits // 2


@pytest.mark.parametrize("schedule", ["original", "optimized", "batched"])
async def test_leakage_is_alice_parities_plus_one_decision_bit_of_bob_each(schedule):
    """Both directions count: Alice's parities, and one disclosed decision bit of Bob per parity."""
    a, b = _frame(20000, 0.03, 7)
    log: list[tuple[str, bytes]] = []
    ra, rb, ca, cb = await _run(a, b, 0.03, schedule, log=log)
    assert np.array_equal(rb.key, a)
    from qkdstack.transport.codec import decode_message

    sent_by_alice = sent_by_bob = 0
    last_answer = None
    for direction, frame in log:
        kind, fields, disclosed = decode_message(frame)
        assert kind.startswith("cascade.")
        if direction == SENT:  # Bob's frames: range descriptors in public, decision bits disclosed
            assert kind in ("cascade.ask", "cascade.done") and set(fields) <= {"q", "passes"}
            assert disclosed is not None
            if last_answer is not None:  # the decisions on every parity of the previous answer, at least
                assert len(disclosed) >= last_answer
            sent_by_bob += len(disclosed)
        else:
            assert direction == RECEIVED and kind in ("cascade.start", "cascade.parities")
            # Alice's public fields are protocol parameters only; key-dependent bits are all disclosed
            assert set(fields) <= {"seed", "n", "block_sizes", "schedule"}
            sent_by_alice += len(disclosed)
            last_answer = len(disclosed) if kind == "cascade.parities" else None
    assert sent_by_alice == sent_by_bob == ra.parity_bits == rb.parity_bits == ra.decision_bits == rb.decision_bits
    assert rb.leaked_bits == ra.leaked_bits == sent_by_alice + sent_by_bob
    assert ca.stats.disclosed_bits("cascade") == cb.stats.disclosed_bits("cascade") == rb.leaked_bits
    assert ca.stats.counters[("cascade", SENT)].disclosed_bits == sent_by_alice
    assert cb.stats.counters[("cascade", SENT)].disclosed_bits == sent_by_bob
    assert rb.round_trips == ra.round_trips == cb.stats.messages("cascade", SENT)


async def test_first_decision_bits_are_the_pass1_block_disagreements():
    """Oracle: Bob's first decision bits are Alice's pass-1 parity XOR his own, i.e. the parity of a ⊕ b per block."""
    from qkdstack.transport.codec import decode_message

    a, b = _frame(20000, 0.03, 4)
    log: list[tuple[str, bytes]] = []
    await _run(a, b, 0.03, "batched", seed=4, log=log)
    k1 = block_sizes("batched", 0.03, a.size)[0]
    diff = a ^ b
    expected = np.array([int(diff[s : s + k1].sum()) & 1 for s in range(0, a.size, k1)], np.uint8)
    first_ask = next(decode_message(f) for d, f in log if d == SENT)
    assert first_ask[0] == "cascade.ask"
    assert np.array_equal(first_ask[2].to_bits()[: expected.size], expected)
    assert expected.any()  # the frame has odd blocks, so the check is not vacuous


async def test_alice_refuses_a_wrong_number_of_decision_bits():
    from qkdstack.bits import BitArray

    a, _ = _frame(1000, 0.02, 2)
    for bits in (0, 1):  # far too few at the end; then more than she disclosed
        ca, cb = channel_pair(timeout=5)
        task = asyncio.create_task(cascade.alice(ca, a, 0.02))
        start = await cb.recv(expect="cascade.start")
        n = len(start.disclosed)
        if bits == 0:
            await cb.send("cascade.done", disclosed=BitArray.zeros(n - 1), passes=14)
            with pytest.raises(ProtocolAbort, match="decision bits"):
                await task
        else:
            await cb.send("cascade.ask", disclosed=BitArray.zeros(n + 1), q=np.array([[0, 0, 2]], np.int32))
            with pytest.raises(ProtocolAbort, match="more decision bits"):
                await task


async def test_answers_are_alice_parities_of_the_asked_ranges():
    """Replay Bob's questions against an oracle: every disclosed bit is a parity of Alice's key."""
    from qkdstack.transport.codec import decode_message

    a, b = _frame(5000, 0.05, 3)
    log: list[tuple[str, bytes]] = []
    await _run(a, b, 0.05, "optimized", seed=11, log=log)
    msgs = [(d, *decode_message(f)) for d, f in log]
    assert msgs[0][1] == "cascade.start"
    checked = 0
    for passes, disclosed, expected in _answers_against_oracle(msgs, a, block_sizes("optimized", 0.05, a.size)):
        assert np.array_equal(disclosed.to_bits(), expected)
        checked += passes.size
    assert checked > 0


def _answers_against_oracle(msgs: list, a: np.ndarray, sizes: np.ndarray):
    """For every ask/answer pair of a logged run: (asked passes, Alice's disclosed bits, the oracle's parities).

    The oracle recomputes each asked range's parity from Alice's key and the permutations the
    logged ``cascade.start`` seed derives (prefix XORs of the key in each pass's order).
    """
    params, _ = cascade._derive_permutations(int(msgs[0][2]["seed"]), a.size, 14, sizes)
    prefix = [K.prefix_parity(a, params[j]) for j in range(14)]
    for (_d1, k1, f1, _), (_d2, k2, _f2, disc) in itertools.pairwise(msgs):
        if k1 == "cascade.ask" and k2 == "cascade.parities":
            p, s, e = f1["q"].T.astype(int)
            yield p, disc, np.array([prefix[j][y] ^ prefix[j][x] for j, x, y in zip(p, s, e, strict=True)], np.uint8)


async def test_permutations_agree_and_are_bijections():
    for n in (1, 2, 3, 1000, 4097):
        params, _ = cascade._derive_permutations(1234, n, 4)
        for j in range(4):
            pos = np.arange(n, dtype=np.int64)
            orig = K.originals(params, np.full(n, j, dtype=np.int64), pos)
            assert np.array_equal(np.sort(orig), pos)
        again, _ = cascade._derive_permutations(1234, n, 4)
        assert np.array_equal(params, again)


async def test_identical_keys_need_no_search():
    from qkdstack.transport.codec import decode_message

    a, _ = _frame(10000, 0.0, 1)
    log: list[tuple[str, bytes]] = []
    _ra, rb, _, _ = await _run(a, a.copy(), 0.02, log=log)
    assert rb.errors_corrected == 0 and np.array_equal(rb.key, a)
    # every decision bit says "agree": Bob's parities equal Alice's everywhere
    (done,) = [decode_message(f) for d, f in log if d == SENT]
    assert done[0] == "cascade.done" and done[2].popcount() == 0
    assert rb.round_trips == 1  # only the closing message: no parity question at all
    sizes = block_sizes("optimized", 0.02, a.size)
    nblocks = [-(-a.size // k) for k in sizes]
    tops = nblocks[0] + sum(nb - 1 for nb in nblocks[1:])
    assert rb.parity_bits == rb.decision_bits == tops and rb.leaked_bits == 2 * tops


def test_schedules_are_data():
    orig = get_schedule("original")
    assert orig.passes == 4
    assert block_sizes("original", 0.01, 10**6) == [73, 146, 292, 584]
    assert block_sizes("original", 0.05, 10**6)[0] == math.ceil(0.73 / 0.05)
    opt = get_schedule("optimized")
    assert opt.passes == 14
    # opt. (8): alpha = log2(1/Q) - 1/2; Q = 2 %: alpha = 5.14 -> k1 = 64, k2 = 2^ceil(8.57) = 512, k3 = 4096
    assert block_sizes(opt, 0.02, 10**6)[:4] == [64, 512, 4096, 500000]
    assert all(k & (k - 1) == 0 for k in block_sizes(opt, 0.03, 2**20))
    custom = CascadeSchedule("mine", 3, lambda q: 10, growth=3.0)
    assert custom.block_sizes(0.1, 1000) == [10, 30, 90]
    assert block_sizes("optimized", 0.02, 100) == [50] + [50] * 13  # clamped to n/2


async def test_custom_schedule_runs():
    a, b = _frame(3000, 0.04, 5)
    sched = CascadeSchedule("three", 6, lambda q: 16, growth=2.0)
    _ra, rb, _, _ = await _run(a, b, 0.04, sched)
    assert rb.passes == 6 and rb.block_sizes == [16, 32, 64, 128, 256, 512]


def test_bad_arguments():
    for q in (-0.1, 0.5, 0.7, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="qber_estimate"):
            block_sizes("optimized", q, 1000)
    with pytest.raises(ConfigError, match="schedule"):
        get_schedule("nonsense")
    # A zero estimate uses the floor instead of an unbounded block.
    assert block_sizes("optimized", 0.0, 10**6) == block_sizes("optimized", MIN_QBER, 10**6)

    async def bad_key():
        ca, _ = channel_pair()
        await cascade.alice(ca, np.array([0, 1, 2], dtype=np.uint8), 0.02)

    with pytest.raises(ConfigError, match="bits 0 and 1"):
        asyncio.run(bad_key())

    async def empty_key():
        _, cb = channel_pair()
        await cascade.bob(cb, np.zeros(0, dtype=np.uint8), 0.02)

    with pytest.raises(ConfigError, match="non-empty"):
        asyncio.run(empty_key())


async def test_tiny_keys():
    for n in (1, 2, 3, 7):
        a, b = _frame(n, 0.3, n)
        _ra, rb, _, _ = await _run(a, b, 0.3)
        assert rb.errors_corrected == int(np.count_nonzero(rb.key != b))
        assert np.array_equal(rb.key, a)  # these fixed frames end error-free (n/2 blocks, 14 passes)


async def test_zero_qber_estimate_still_corrects():
    a, b = _frame(20000, 0.01, 9)
    _, rb, _, _ = await _run(a, b, 0.0)
    assert np.array_equal(rb.key, a)


async def test_mismatched_schedules_abort():
    a, b = _frame(2000, 0.02, 2)
    ca, cb = channel_pair(timeout=5)
    alice_task = asyncio.create_task(cascade.alice(ca, a, 0.02, "original"))
    with pytest.raises(ProtocolAbort, match="schedule mismatch"):
        await cascade.bob(cb, b, 0.02, "optimized")
    alice_task.cancel()


async def test_mismatched_lengths_abort():
    a, b = _frame(2000, 0.02, 2)
    ca, cb = channel_pair(timeout=5)
    alice_task = asyncio.create_task(cascade.alice(ca, a, 0.02))
    with pytest.raises(ProtocolAbort, match="length"):
        await cascade.bob(cb, b[:-1], 0.02)
    alice_task.cancel()


async def test_alice_refuses_questions_outside_the_key():
    a, _ = _frame(1000, 0.02, 2)
    ca, cb = channel_pair(timeout=5)
    task = asyncio.create_task(cascade.alice(ca, a, 0.02))
    await cb.recv(expect="cascade.start")
    await cb.send("cascade.ask", q=np.array([[0, 5, 5000]], np.int32))
    with pytest.raises(ProtocolAbort, match="outside"):
        await task


async def test_alice_refuses_to_disclose_more_than_the_key():
    a, _ = _frame(1000, 0.02, 2)
    ca, cb = channel_pair(timeout=5)
    task = asyncio.create_task(cascade.alice(ca, a, 0.02))
    await cb.recv(expect="cascade.start")
    idx = np.tile(np.arange(1000), 4)
    await cb.send("cascade.ask", q=np.stack([np.zeros_like(idx), idx, idx + 1], axis=1))
    with pytest.raises(ProtocolAbort, match="more parities"):
        await task


async def test_two_block_passes_search_through_mask_shuffles():
    """Passes of two blocks read the key through mask shuffles; their searches must find the errors.

    A schedule of twelve two-block passes (every pass after the first is a mask shuffle) has
    to correct a few scattered errors, and every answer must be Alice's parity of the range.
    """
    from qkdstack.transport.codec import decode_message

    sched = CascadeSchedule("halves", 12, lambda q: 10**9)
    rng = np.random.default_rng(21)
    for n in (256, 1000, 4099):
        a = rng.integers(0, 2, n, dtype=np.uint8)
        b = a.copy()
        b[rng.choice(n, 4, replace=False)] ^= 1
        log: list[tuple[str, bytes]] = []
        _ra, rb, _, _ = await _run(a, b, 0.01, sched, seed=n, log=log)
        assert np.array_equal(rb.key, a)
        msgs = [(d, *decode_message(f)) for d, f in log]
        params, _ = cascade._derive_permutations(int(msgs[0][2]["seed"]), n, 12, sched.block_sizes(0.01, n))
        assert (params[1:, K.P_MODE] == 2).all()
        prefix = [K.prefix_parity(a, params[j]) for j in range(12)]
        asked_mask = 0
        for (_d1, k1, f1, _), (_d2, k2, _f2, disc) in itertools.pairwise(msgs):
            if k1 == "cascade.ask" and k2 == "cascade.parities":
                p, s, e = f1["q"].T.astype(int)
                expect = np.array([prefix[j][y] ^ prefix[j][x] for j, x, y in zip(p, s, e, strict=True)], np.uint8)
                assert np.array_equal(disc.to_bits(), expect)
                asked_mask += int(np.count_nonzero(p > 0))
        assert asked_mask > 0


def test_mask_shuffles_are_bijections_with_popcount_parities():
    rng = np.random.default_rng(5)
    for n in (1, 63, 64, 65, 1000, 4097):
        p = K.make_mask_params(np.random.default_rng(n), n)
        pos = np.arange(n, dtype=np.int64)
        orig = K.originals(p[None, :], np.zeros(n, dtype=np.int64), pos)
        assert np.array_equal(np.sort(orig), pos)
        assert all(K.perm_inv(int(x), p) == i for i, x in enumerate(orig[:200]))
        key = rng.integers(0, 2, n, dtype=np.uint8)
        ref = np.concatenate([[0], np.cumsum(key[orig]) % 2]).astype(np.uint8)
        assert np.array_equal(K.prefix_parity(key, p), ref)
        packed = K.pack_key(key)
        cum = np.zeros((n + 63) // 64 + 1, np.int64)
        K.mask_cum(p, cum)
        for y in {1, n // 2, -(-n // 2), int(p[K.P_B1]), n} - {0}:
            assert K.mask_range_parity(packed, p, cum, 0, y) == ref[y]


def test_mask_tables_rank_select_and_range_parities():
    """mask_cum/mask_rank/mask_select and word-level range parities agree with the materialised shuffle."""
    rng = np.random.default_rng(8)
    for n in (1, 63, 64, 65, 200, 4097, 70000):
        cum = np.zeros((n + 63) // 64 + 1, np.int64)
        p = K.make_mask_params(np.random.default_rng(n), n, cum)
        assert p[K.P_B1] == K.mask_count(p) == cum[-1]
        orig = K.originals(p[None, :], np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64))
        key = rng.integers(0, 2, n, dtype=np.uint8)
        ref = np.concatenate([[0], np.cumsum(key[orig]) % 2]).astype(np.uint8)
        packed = K.pack_key(key)
        for i in rng.integers(0, n, 60):
            assert K.mask_select(p, cum, i) == orig[i]
            assert K.mask_rank(p, cum, orig[i]) == i
        for _ in range(200):
            a, b = sorted(int(x) for x in rng.integers(0, n + 1, 2))
            if a < b:
                assert K.mask_range_parity(packed, p, cum, a, b) == ref[b] ^ ref[a]


def test_shuffled_rows_give_every_range_parity():
    """Packed shuffled rows (keyed permutations) answer range parities like the prefix-XOR oracle."""
    rng = np.random.default_rng(9)
    for n in (5, 64, 1000, 70001):
        key = rng.integers(0, 2, n, dtype=np.uint8)
        sizes = block_sizes("batched", 0.03, n)
        params, mcum = cascade._derive_permutations(77, n, 14, sizes)
        shuf = cascade._shuffled_rows(K.pack_key(key), params)
        for j in range(14):
            ref = K.prefix_parity(key, params[j])
            for _ in range(50):
                a, b = sorted(int(x) for x in rng.integers(0, n + 1, 2))
                if a < b:
                    assert K.range_parity(shuf, params, mcum, j, a, b) == ref[b] ^ ref[a]
            tops = np.empty(-(-n // sizes[j]), np.uint8)
            K.top_parities(shuf, params, mcum, j, sizes[j], tops.size, tops)
            starts = np.arange(tops.size) * sizes[j]
            assert np.array_equal(tops, ref[np.minimum(starts + sizes[j], n)] ^ ref[starts])


async def test_early_pass_activation_corrects_and_counts_every_parity():
    """Later passes started while searches are still open (early activation) keep Cascade exact.

    A schedule that starts every later pass as soon as at most 64 searches are open runs
    passes of all kinds (keyed permutations, mask shuffles) concurrently; the key must be
    corrected, every answer must be Alice's parity of the asked range, and the leakage must
    equal the parities Alice sent.
    """
    from qkdstack.transport.codec import decode_message

    sched = CascadeSchedule(
        "eager", 14, lambda q: 16, growth=math.inf, fixed_blocks=(lambda q: 64, lambda q: 1024),
        early_per_bit=64 / 20000, tail_round_trips=0, deep_lookahead=4,
    )  # fmt: skip
    for seed in (1, 2, 3):
        a, b = _frame(20000, 0.04, seed)
        log: list[tuple[str, bytes]] = []
        ra, rb, _ca, cb = await _run(a, b, 0.04, sched, seed=seed, log=log)
        assert np.array_equal(rb.key, a)
        msgs = [(d, *decode_message(f)) for d, f in log]
        sent = len(msgs[0][3])
        late = 0
        for passes, disclosed, expected in _answers_against_oracle(msgs, a, sched.block_sizes(0.04, a.size)):
            assert np.array_equal(disclosed.to_bits(), expected)
            sent += len(disclosed)
            late += int(np.count_nonzero(passes >= 3))
        assert sent == rb.parity_bits == ra.parity_bits == rb.decision_bits
        assert 2 * sent == rb.leaked_bits == ra.leaked_bits == cb.stats.disclosed_bits("cascade")
        assert late > 0  # the mask-shuffle passes did search


async def test_alice_rejects_malformed_questions():
    a, _ = _frame(1000, 0.02, 2)
    for bad in (np.zeros((4, 2), np.int32), np.zeros(6, np.int32), np.zeros((2, 3), np.float64), "nonsense"):
        ca, cb = channel_pair(timeout=5)
        task = asyncio.create_task(cascade.alice(ca, a, 0.02))
        await cb.recv(expect="cascade.start")
        await cb.send("cascade.ask", q=bad)
        with pytest.raises(ProtocolAbort, match="malformed"):
            await task
