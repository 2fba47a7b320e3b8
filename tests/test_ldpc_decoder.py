"""The lane kernel (ldpc_decoder.decode_lanes_warm) against the per-codeword kernel it replaces in Bob's decoder."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from qkdstack.protocol import ldpc, ldpc_codes
from qkdstack.protocol.ldpc_decoder import (
    LANES,
    PHI_TABLE,
    _row_groups,
    decode_batch,
    decode_batch_warm,
    decode_lanes_warm,
    decode_rows_warm,
)

N_CODE = 2048


@pytest.fixture(scope="module")
def code():
    return ldpc_codes.get_code(0.5, N_CODE)


def _problem(code, rates, seed=0):
    """Error patterns at the given per-codeword rates, their syndromes and the channel LLRs (as Bob has them)."""
    rng = np.random.default_rng(seed)
    count = len(rates)
    err = np.zeros((count, code.n), np.uint8)
    llr = np.empty((count, code.n), np.float32)
    for i, q in enumerate(rates):
        err[i] = rng.random(code.n) < q
        llr[i] = np.log((1 - min(q, 0.11)) / min(q, 0.11))
    synd = np.ascontiguousarray(np.stack([code.syndrome(e) for e in err]))
    return err, llr, synd


def _run(kernel, code, llr, synd, r_state=None, max_iter=60, alpha=0.0):
    count = llr.shape[0]
    out = np.full((count, code.n), 7, np.uint8)
    iters = np.full(count, -7, np.int32)
    r = np.zeros((count, code.edges), np.float32) if r_state is None else r_state
    kernel(code.row_ptr, code.col_idx, llr, synd, max_iter, alpha, out, iters, r, PHI_TABLE)
    return out, iters, r


def test_lanes_match_the_per_codeword_kernel(code):
    """More codewords than one block (a full block and a partial one), some that decode and some that fail:
    the same outcome, iterations, decoded words and final check messages as decode_batch_warm."""
    rates = [0.02, 0.14, 0.03, 0.015, 0.16, 0.04, 0.025, 0.13, 0.03, 0.02, 0.15]
    assert len(rates) > LANES
    err, llr, synd = _problem(code, rates)
    ref_out, ref_it, ref_r = _run(decode_batch_warm, code, llr, synd)
    out, it, r = _run(decode_lanes_warm, code, llr, synd)
    assert (ref_it > 0).any() and (ref_it == -1).any()  # both outcomes are present
    assert np.array_equal(it, ref_it)
    assert np.array_equal(out, ref_out)
    assert np.allclose(r, ref_r, atol=1e-3)
    decoded = it > 0
    assert np.array_equal(out[decoded], err[decoded])
    assert (it[np.array(rates) > 0.12] == -1).all()  # beyond the rate-1/2 code's reach: -1


def test_one_codeword_and_min_sum_fallback(code):
    """One codeword (the row-lane path): the per-codeword kernel's result exactly, messages included."""
    err, llr, synd = _problem(code, [0.03], seed=1)
    out, it, r = _run(decode_lanes_warm, code, llr, synd)
    assert it[0] > 0 and np.array_equal(out, err)
    ref_out, ref_it, ref_r = _run(decode_batch_warm, code, llr, synd)
    assert np.array_equal(it, ref_it) and np.array_equal(out, ref_out) and np.array_equal(r, ref_r)
    ref_out, ref_it, _ = _run(decode_batch_warm, code, llr, synd, alpha=0.8)
    out, it, _ = _run(decode_lanes_warm, code, llr, synd, alpha=0.8)
    assert np.array_equal(it, ref_it) and np.array_equal(out, ref_out)


def test_a_finished_lane_is_not_changed_later(code):
    """A lane that decodes in a few iterations beside lanes that run to the stall limit: its outputs are
    those of decoding it alone (the block kept iterating, its lane did not write them again)."""
    err, llr, synd = _problem(code, [0.01, 0.15, 0.16, 0.14], seed=2)
    out, it, r = _run(decode_lanes_warm, code, llr, synd)
    alone_out, alone_it, alone_r = _run(decode_lanes_warm, code, llr[:1].copy(), synd[:1].copy())
    assert 0 < it[0] < 10 and (it[1:] == -1).all()
    assert it[0] == alone_it[0]
    assert np.array_equal(out[0], alone_out[0]) and np.array_equal(out[0], err[0])
    assert np.array_equal(r[0], alone_r[0])  # the messages of its last iteration, not of the block's


def test_warm_start_continues(code):
    """Decoding again from the converged messages takes one iteration; a failed lane continues from its
    messages (a cold restart with as many iterations is not the same decoding)."""
    err, llr, synd = _problem(code, [0.03, 0.035, 0.02], seed=3)
    out, it, r = _run(decode_lanes_warm, code, llr, synd)
    assert (it > 0).all() and np.array_equal(out, err)
    out2, it2, _ = _run(decode_lanes_warm, code, llr, synd, r_state=r)
    assert (it2 == 1).all() and np.array_equal(out2, err)
    # a warm start from zero messages is the cold decoder exactly
    cold_out = np.empty_like(out)
    cold_it = np.empty(3, np.int32)
    decode_batch(code.row_ptr, code.col_idx, llr, synd, 60, 0.0, cold_out, cold_it, PHI_TABLE)
    assert np.array_equal(cold_it, it) and np.array_equal(cold_out, out)
    # too few iterations: -1, then continuing from those messages finishes what a cold start of the same
    # length cannot
    few = max(1, int(it.max()) // 2)
    _o, it_a, r_a = _run(decode_lanes_warm, code, llr, synd, max_iter=few)
    assert (it_a == -1).any()
    out_b, it_b, _ = _run(decode_lanes_warm, code, llr, synd, r_state=r_a, max_iter=few + 2)
    assert (it_b > 0).all() and np.array_equal(out_b, err)


def test_undecodable_input_gives_minus_one(code):
    _err, llr, synd = _problem(code, [0.2, 0.2], seed=4)
    out, it, _r = _run(decode_lanes_warm, code, llr, synd)
    assert (it == -1).all()
    assert ((out == 0) | (out == 1)).all()  # every hard decision written


def test_decode_threads_splits_blocks_like_one_call(code):
    """Bob's thread split (blocks of LANES over DECODER_THREADS threads) gives what one call gives."""
    rates = [0.02, 0.03, 0.15] * 6 + [0.025]
    _err, llr, synd = _problem(code, rates, seed=5)
    out, it, r = _run(decode_lanes_warm, code, llr, synd)
    r_state = np.zeros((len(rates), code.edges), np.float32)
    params = ldpc.LdpcParams(code_n=N_CODE)
    t_out, t_it = asyncio.run(ldpc._decode_threads(code.row_ptr, code.col_idx, llr, synd, params, r_state))
    assert np.array_equal(t_it, it) and np.array_equal(t_out, out) and np.array_equal(r_state, r)


def test_row_groups_are_consecutive_disjoint_checks(code):
    starts, off, deg, slot_var, slot_edge = _row_groups(code.row_ptr, code.col_idx, code.n, 8)
    assert starts[0] == 0 and starts[-1] == code.m and (np.diff(starts) >= 1).all() and (np.diff(starts) <= 8).all()
    assert np.diff(starts).mean() > 2  # lanes are actually shared
    seen = np.zeros(code.edges, bool)
    for g in range(deg.size):
        rows = range(starts[g], starts[g + 1])
        cols = np.concatenate([code.col_idx[code.row_ptr[c] : code.row_ptr[c + 1]] for c in rows])
        assert np.unique(cols).size == cols.size  # no variable in two checks of a group
        slots = slice(off[g], off[g + 1])
        real = slot_edge[slots] >= 0
        assert np.array_equal(slot_var[slots][real], code.col_idx[slot_edge[slots][real]])
        assert (slot_var[slots][~real] == code.n).all()  # the dummy variable where a lane has no edge
        seen[slot_edge[slots][real]] = True
    assert seen.all()


def test_row_lanes_match_the_per_codeword_kernel(code):
    """Row lanes update variable-disjoint checks together: the same floats as one by one, so the same outcome,
    iterations, words and messages, bit for bit, for codewords that decode and that fail, cold and warm."""
    rates = [0.02, 0.14, 0.035, 0.16, 0.03]
    _err, llr, synd = _problem(code, rates, seed=6)
    ref_out, ref_it, ref_r = _run(decode_batch_warm, code, llr, synd)
    out, it, r = _run(decode_rows_warm, code, llr, synd)
    assert (ref_it > 0).any() and (ref_it == -1).any()
    assert np.array_equal(it, ref_it) and np.array_equal(out, ref_out) and np.array_equal(r, ref_r)
    ref2 = _run(decode_batch_warm, code, llr, synd, r_state=ref_r.copy(), max_iter=7)
    got2 = _run(decode_rows_warm, code, llr, synd, r_state=r.copy(), max_iter=7)
    for a, b in zip(ref2, got2, strict=True):
        assert np.array_equal(a, b)
