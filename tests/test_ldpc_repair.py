"""Repair of a decoding stalled on a run of wrong degree-2 variables (protocol/ldpc_repair.py)."""

from __future__ import annotations

import numpy as np
import pytest

from qkdstack.protocol import ldpc_codes
from qkdstack.protocol.ldpc_repair import MAX_PATH, MAX_UNSATISFIED, repair_batch


def _csr(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    row_ptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    return row_ptr, np.array([v for r in rows for v in r], dtype=np.int64)


def _chain_code(m: int = 40, extra: int = 60, seed: int = 1):
    """m checks; variables 0 … m − 2 a degree-2 chain (variable i joins checks i and i + 1), then ``extra``
    degree-3 variables on random checks (the layout of ldpc_codes.build_code, in miniature)."""
    rng = np.random.default_rng(seed)
    rows: list[list[int]] = [[] for _ in range(m)]
    for v in range(m - 1):
        rows[v].append(v)
        rows[v + 1].append(v)
    for j in range(extra):
        for c in rng.choice(m, size=3, replace=False):
            rows[int(c)].append(m - 1 + j)
    return (*_csr(rows), m - 1 + extra)


def _syndrome(row_ptr, col_idx, word) -> np.ndarray:
    return np.array([np.bitwise_xor.reduce(word[col_idx[row_ptr[c]:row_ptr[c + 1]]])
                     for c in range(row_ptr.size - 1)], dtype=np.uint8)


def _repair(row_ptr, col_idx, target, words, iters, max_unsatisfied=MAX_UNSATISFIED, max_path=MAX_PATH, skip=None):
    skip = np.zeros(len(iters), dtype=np.bool_) if skip is None else skip
    return repair_batch(row_ptr, col_idx, target, words, iters, skip, max_unsatisfied, max_path)


def test_a_run_of_wrong_degree2_variables_is_flipped_back():
    row_ptr, col_idx, n = _chain_code()
    rng = np.random.default_rng(7)
    truth = (rng.random(n) < 0.1).astype(np.uint8)
    target = _syndrome(row_ptr, col_idx, truth)[None, :]
    stuck = truth.copy()
    stuck[10:14] ^= 1  # four consecutive chain variables: checks 10 and 14 unsatisfied, the rest met
    assert np.count_nonzero(_syndrome(row_ptr, col_idx, stuck) ^ target[0]) == 2
    words = stuck[None, :].copy()
    iters = np.array([-1], dtype=np.int32)
    assert _repair(row_ptr, col_idx, target, words, iters) == 1
    assert iters[0] == 0 and np.array_equal(words[0], truth)


def test_two_runs_are_both_repaired_and_good_words_are_left_alone():
    row_ptr, col_idx, n = _chain_code()
    truth = np.zeros(n, dtype=np.uint8)
    truth[[3, 50, 70]] = 1
    target = np.stack([_syndrome(row_ptr, col_idx, truth)] * 2)
    words = np.stack([truth, truth])
    words[0, 5:8] ^= 1
    words[0, 25:27] ^= 1
    words[1, 30] ^= 1  # a decoded word (iters ≥ 0) is never touched, whatever it holds
    iters = np.array([-1, 17], dtype=np.int32)
    assert _repair(row_ptr, col_idx, target, words, iters) == 1
    assert np.array_equal(words[0], truth) and iters[0] == 0
    assert words[1, 30] != truth[30] and iters[1] == 17


def test_runs_meeting_at_a_wrong_degree3_variable_are_repaired():
    """Three unsatisfied checks (an odd count, which degree-2 paths alone cannot pair): a wrong degree-3
    variable (the hub) and a run of wrong degree-2 variables from one of its checks."""
    row_ptr, col_idx, n = _chain_code()
    hub = n - 1
    hub_checks = [c for c in range(row_ptr.size - 1) if hub in col_idx[row_ptr[c]:row_ptr[c + 1]]]
    a = min(hub_checks)
    truth = np.zeros(n, dtype=np.uint8)
    target = _syndrome(row_ptr, col_idx, truth)[None, :]
    words = truth[None, :].copy()
    words[0, hub] ^= 1
    words[0, a:a + 3] ^= 1  # chain variables a, a + 1, a + 2: checks a (again) and a + 3 toggled
    u = np.count_nonzero(_syndrome(row_ptr, col_idx, words[0]) ^ target[0])
    assert u % 2 == 1
    iters = np.array([-1], dtype=np.int32)
    assert _repair(row_ptr, col_idx, target, words, iters) == 1
    assert iters[0] == 0 and not np.any(_syndrome(row_ptr, col_idx, words[0]) ^ target[0])


@pytest.mark.parametrize("case", ["too many unsatisfied", "path too long"])
def test_a_word_the_repair_cannot_fix_is_left_as_it_was(case):
    row_ptr, col_idx, n = _chain_code()
    truth = np.zeros(n, dtype=np.uint8)
    target = _syndrome(row_ptr, col_idx, truth)[None, :]
    stuck = truth.copy()
    max_unsatisfied, max_path = MAX_UNSATISFIED, MAX_PATH
    if case == "too many unsatisfied":
        stuck[[1, 5, 9, 13, 17, 21]] ^= 1  # 12 unsatisfied checks
        max_unsatisfied = 10
    else:
        stuck[5:15] ^= 1
        max_path = 9
    words = stuck[None, :].copy()
    iters = np.array([-1], dtype=np.int32)
    assert _repair(row_ptr, col_idx, target, words, iters, max_unsatisfied, max_path) == 0
    assert iters[0] == -1 and np.array_equal(words[0], stuck)


def test_a_failed_word_that_already_meets_the_syndrome_counts_as_decoded():
    row_ptr, col_idx, n = _chain_code()
    truth = np.zeros(n, dtype=np.uint8)
    target = _syndrome(row_ptr, col_idx, truth)[None, :]
    words = truth[None, :].copy()
    iters = np.array([-1], dtype=np.int32)
    assert _repair(row_ptr, col_idx, target, words, iters) == 0
    assert iters[0] == 0


def test_repairs_a_run_on_the_degree2_chain_of_a_real_peg_code(tmp_path, monkeypatch):
    """The same on a code of the family (its degree-2 variables form the chain of build_code)."""
    monkeypatch.setenv("QKDSTACK_CACHE_DIR", str(tmp_path))
    code = ldpc_codes.get_code(0.5, 2048)
    row_ptr, col_idx = code.row_ptr.astype(np.int64), code.col_idx.astype(np.int64)
    degree = np.bincount(col_idx, minlength=code.n)
    checks_of = {}
    for c in range(code.m):
        for v in col_idx[row_ptr[c]:row_ptr[c + 1]]:
            checks_of.setdefault(int(v), []).append(c)
    # a run of three degree-2 variables along the chain: v1 (· – b), v2 (b – c), v3 (c – ·)
    two = [v for v in range(code.n) if degree[v] == 2]
    by_check = {}
    for v in two:
        for c in checks_of[v]:
            by_check.setdefault(c, []).append(v)
    v1 = two[100]
    _, b = checks_of[v1]
    v2 = next(v for v in by_check[b] if v != v1)
    c = next(x for x in checks_of[v2] if x != b)
    v3 = next(v for v in by_check[c] if v != v2)
    rng = np.random.default_rng(3)
    truth = (rng.random(code.n) < 0.05).astype(np.uint8)
    target = _syndrome(row_ptr, col_idx, truth)[None, :]
    words = truth[None, :].copy()
    words[0, [v1, v2, v3]] ^= 1
    assert np.count_nonzero(_syndrome(row_ptr, col_idx, words[0]) ^ target[0]) == 2
    iters = np.array([-1], dtype=np.int32)
    assert _repair(row_ptr, col_idx, target, words, iters) == 1
    assert np.array_equal(words[0], truth)


def test_bobs_decoder_repairs_what_belief_propagation_leaves_on_degree2_runs(tmp_path, monkeypatch):
    """Real stalls, not planted ones: of 2000 error patterns at 7 % on the n = 2048 rate-0.5 code, those
    that BP alone leaves with a few unsatisfied checks; Bob's decoder path (kernel, then repair) turns at
    least one into the true pattern and never returns a word that misses the syndrome."""
    import asyncio
    import math

    from qkdstack.protocol import ldpc

    monkeypatch.setenv("QKDSTACK_CACHE_DIR", str(tmp_path))
    code = ldpc_codes.get_code(0.5, 2048)
    q = 0.07
    params = ldpc.LdpcParams(code_n=2048)
    llr = np.full((1, code.n), math.log((1 - q) / q), np.float32)
    stalled = repaired = 0
    for seed in range(2000):
        truth = (np.random.default_rng(seed).random(code.n) < q).astype(np.uint8)
        target = _syndrome(code.row_ptr, code.col_idx, truth)[None, :]
        alone = np.empty((1, code.n), np.uint8)
        iters = np.empty(1, np.int32)
        ldpc.decode_batch(code.row_ptr, code.col_idx, llr, target, params.max_iterations, 0.0, alone, iters)
        unsatisfied = np.count_nonzero(_syndrome(code.row_ptr, code.col_idx, alone[0]) ^ target[0])
        if iters[0] >= 0 or unsatisfied > MAX_UNSATISFIED:
            continue
        stalled += 1
        r_state = np.zeros((1, code.col_idx.size), np.float32)
        err, it = asyncio.run(ldpc._decode_threads(code.row_ptr, code.col_idx, llr, target, params, r_state))
        if it[0] >= 0:
            assert not np.any(_syndrome(code.row_ptr, code.col_idx, err[0]) ^ target[0])
            repaired += int(np.array_equal(err[0], truth))
    assert stalled >= 1 and repaired >= 1


def test_no_repair_when_two_shortest_paths_lead_to_the_check():
    """Merged rows can join two degree-2 variables to the same two checks (a weight-2 codeword): flipping
    either meets the syndrome and one of the two words is wrong, so neither is chosen."""
    row_ptr, col_idx, n = _chain_code()
    rows = [list(col_idx[row_ptr[c]:row_ptr[c + 1]]) for c in range(row_ptr.size - 1)]
    twin = n  # a second degree-2 variable beside chain variable 12 (checks 12 and 13)
    rows[12].append(twin)
    rows[13].append(twin)
    row_ptr, col_idx = _csr(rows)
    truth = np.zeros(n + 1, dtype=np.uint8)
    target = _syndrome(row_ptr, col_idx, truth)[None, :]
    stuck = truth.copy()
    stuck[10:13] ^= 1  # chain variables 10, 11, 12: checks 10 and 13 unsatisfied; 12 or the twin would do
    words = stuck[None, :].copy()
    iters = np.array([-1], dtype=np.int32)
    assert _repair(row_ptr, col_idx, target, words, iters) == 0
    assert iters[0] == -1 and np.array_equal(words[0], stuck)
    stuck[12] ^= 1  # without the ambiguity (checks 10 and 12 unsatisfied) the same run is repaired
    stuck[10:12] = truth[10:12] ^ 1
    words = stuck[None, :].copy()
    assert _repair(row_ptr, col_idx, target, words, iters) == 1 and np.array_equal(words[0], truth)


def test_words_marked_skip_are_not_repaired():
    row_ptr, col_idx, n = _chain_code()
    truth = np.zeros(n, dtype=np.uint8)
    target = np.stack([_syndrome(row_ptr, col_idx, truth)] * 2)
    words = np.stack([truth, truth])
    words[:, 10:14] ^= 1
    iters = np.array([-1, -1], dtype=np.int32)
    assert _repair(row_ptr, col_idx, target, words, iters, skip=np.array([True, False])) == 1
    assert iters.tolist() == [-1, 0]
    assert np.array_equal(words[1], truth) and not np.array_equal(words[0], truth)
