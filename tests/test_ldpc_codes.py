"""Quasi-cyclic lifts of the PEG codes (ldpc_codes.lift_code) and the choice of the lift per frame (ldpc.lift_for)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from qkdstack.protocol import ldpc, ldpc_codes
from qkdstack.protocol.channel import channel_pair

N_BASE = 2048
"""Small base codes keep the tests fast (PEG codes are built once per test session)."""


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QKDSTACK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ldpc-cache"))


def _base(rate: float = 0.5) -> ldpc_codes.LdpcCode:
    return ldpc_codes.get_code(rate, N_BASE)


@pytest.mark.parametrize("z", [2, 4, 7])
def test_lift_keeps_the_degree_distribution_and_projects_onto_the_base(z):
    base = _base()
    lifted = ldpc_codes.lift_code(base, z)
    assert (lifted.n, lifted.m, lifted.edges) == (z * base.n, z * base.m, z * base.edges)
    assert lifted.rate == base.rate and lifted.name.startswith(f"qc{z}l")
    # every copy of a variable / check has the base node's degree
    assert np.array_equal(np.diff(lifted.var_ptr), np.repeat(np.diff(base.var_ptr), z))
    assert np.array_equal(np.diff(lifted.row_ptr), np.repeat(np.diff(base.row_ptr), z))
    # check c·z + i joins exactly one copy of every variable of base check c, and each copy i differently
    for c in (0, 1, base.m // 2, base.m - 1):
        row = base.col_idx[base.row_ptr[c] : base.row_ptr[c + 1]]
        seen = np.zeros((row.size, z), dtype=np.int64)
        for i in range(z):
            r = c * z + i
            got = lifted.col_idx[lifted.row_ptr[r] : lifted.row_ptr[r + 1]]
            assert np.all(np.diff(got) > 0)  # sorted, no repeated edge
            assert np.array_equal(np.sort(got // z), row)
            seen[np.searchsorted(row, got // z), got % z] += 1
        assert np.all(seen == 1)  # a permutation of the copies per base edge
    _assert_column_form_is_the_transpose(lifted)


def _assert_column_form_is_the_transpose(code: ldpc_codes.LdpcCode) -> None:
    cols = np.repeat(np.arange(code.n), np.diff(code.var_ptr))
    rows = np.repeat(np.arange(code.m), np.diff(code.row_ptr))
    a, b = np.lexsort((code.col_idx, rows)), np.lexsort((cols, code.var_chk))
    assert np.array_equal(rows[a], code.var_chk[b]) and np.array_equal(code.col_idx[a], cols[b])


def test_lift_is_deterministic_and_seeded():
    base = _base()
    one, two = ldpc_codes.lift_code(base, 4), ldpc_codes.lift_code(base, 4)
    assert np.array_equal(one.col_idx, two.col_idx) and np.array_equal(one.row_ptr, two.row_ptr)
    other = ldpc_codes.lift_code(base, 4, seed=1)
    assert not np.array_equal(one.col_idx, other.col_idx)
    assert ldpc_codes.lift_code(base, 1) is base
    via_cache = ldpc_codes.get_code(0.5, N_BASE, lift=4)
    assert via_cache.name == one.name and np.array_equal(via_cache.col_idx, one.col_idx)
    assert ldpc_codes.code_rows(0.5, N_BASE, 4) == via_cache.m


def _random_lift(base, z, seed):
    shifts = np.random.default_rng(seed).integers(0, z, base.edges)
    row_ptr, col_idx = ldpc_codes._lift_csr(base.row_ptr, base.col_idx, shifts, z)
    col_idx = ldpc_codes._sorted_rows(row_ptr, col_idx)
    var_ptr, var_chk = ldpc_codes._columns(row_ptr, col_idx, base.n * z)
    return ldpc_codes.LdpcCode("random", base.rate, base.n * z, base.m * z, row_ptr, col_idx, var_ptr, var_chk)


def test_lift_shifts_avoid_four_cycles():
    """A base 4-cycle lifts to 4-cycles only when its shifts cancel: the greedy shifts avoid that where they
    can. The small base codes have many 4-cycles (high degrees on few checks): the lift keeps well under a
    third of the base's z copies of them, random shifts about a quarter of the copies (1/z), and a 4-cycle-free
    base gives a 4-cycle-free lift (its girth never drops)."""
    base = _base(0.5)
    four = ldpc_codes.four_cycles(base)
    assert four > 100
    z = 8
    greedy = ldpc_codes.four_cycles(ldpc_codes.lift_code(base, z))
    random = ldpc_codes.four_cycles(_random_lift(base, z, 3))
    assert greedy < 0.5 * random and greedy < 0.5 * four
    # a base of girth 6 (three checks on a 6-cycle, a fourth sharing one variable with each): a lift has
    # no 4-cycle, whatever the shifts
    row_ptr = np.array([0, 2, 4, 6, 9], np.int64)
    col_idx = np.array([0, 1, 1, 2, 0, 2, 0, 3, 4], np.int32)
    var_ptr, var_chk = ldpc_codes._columns(row_ptr, col_idx, 5)
    girth6 = ldpc_codes.LdpcCode("g6", 0.2, 5, 4, row_ptr, col_idx, var_ptr, var_chk)
    assert ldpc_codes.four_cycles(girth6) == 0
    assert ldpc_codes.four_cycles(ldpc_codes.lift_code(girth6, 5)) == 0
    assert ldpc_codes.four_cycles(_random_lift(girth6, 5, 1)) == 0


def test_four_cycle_count():
    # two checks sharing variables {0, 1, 2}: three 4-cycles; a third check sharing one variable: none more
    row_ptr = np.array([0, 3, 6, 8], np.int64)
    col_idx = np.array([0, 1, 2, 0, 1, 2, 2, 3], np.int32)
    var_ptr, var_chk = ldpc_codes._columns(row_ptr, col_idx, 4)
    code = ldpc_codes.LdpcCode("t", 0.25, 4, 3, row_ptr, col_idx, var_ptr, var_chk)
    assert ldpc_codes.four_cycles(code) == 3


def test_lift_for_prefers_long_codewords_with_little_shortening():
    params = ldpc.LdpcParams()  # base n = 16384, max_lift 8
    assert ldpc.lift_for(100_000, params) == 7  # one codeword of 114688 bits, 13 % shortened
    # 37 codewords of 65536 (0.4 % shortened), not 19 of 131072 (3 %): about as good, and faster
    assert ldpc.lift_for(2_415_143, params) == 4
    assert ldpc.lift_for(500_000, params) == 8  # 4 codewords of 131072 (5 % shortened), not 31 of 16384
    assert ldpc.lift_for(3_000, params) == 1  # no codeword longer than the first that holds the frame
    assert ldpc.lift_for(131_072, params) == 8  # exactly one codeword, nothing shortened
    assert ldpc.lift_for(100_000, replace(params, max_lift=1)) == 1
    plan = ldpc.make_plan(100_000, 0.03, params)
    assert plan.lift == 7 and plan.codewords == 1 and plan.m == ldpc_codes.code_rows(plan.rate, 16384, 7)


def test_reconciliation_on_a_lifted_code():
    """The protocol on lifted codes: keys identical, and the code named on the wire is the lift."""
    params = ldpc.LdpcParams(code_n=N_BASE, f_start=1.3, blind_step=0.1, max_blind_rounds=12)
    n = 3 * N_BASE - 300
    assert ldpc.lift_for(n, params) == 3
    rng = np.random.default_rng(4)
    a = rng.integers(0, 2, n, dtype=np.uint8)
    b = a ^ (rng.random(n) < 0.03).astype(np.uint8)

    async def run():
        ca, cb = channel_pair(timeout=60)
        return await asyncio.gather(ldpc.alice(ca, a, 0.03, params, seed=2), ldpc.bob(cb, b, 0.03, params))

    ra, rb = asyncio.run(run())
    assert rb.code == ra.code and rb.code.startswith("qc3l") and rb.codewords == 1
    assert np.array_equal(rb.key, a)


def test_unmerging_retraces_the_plans_of_larger_first_syndromes():
    """After u un-merges the merged pairs are exactly those of a plan with u fewer merged pairs (nested codes):
    the blind rounds walk back along the codes a larger f_start would start from, not to another subset."""
    params = ldpc.LdpcParams(code_n=N_BASE, max_lift=1, max_merged=0.5)
    tight = ldpc.make_plan(40_000, 0.05, replace(params, f_start=1.05))
    loose = ldpc.make_plan(40_000, 0.05, replace(params, f_start=1.12))
    assert (tight.rate, tight.m) == (loose.rate, loose.m) and tight.merged > loose.merged > 0
    code = ldpc_codes.get_code(tight.rate, N_BASE)
    order = ldpc._unmerge_order(code, tight, params)
    u = tight.merged - loose.merged
    still = {tuple(p) for p in order[u:]}
    assert still == {tuple(p) for p in ldpc._unmerge_order(code, loose, params)}


def test_high_rate_codes_shorten_their_lowest_degree_variables_first():
    """On the rate-0.95 code the shortened positions (the layout's tail) are the lowest-degree variables;
    on the others (the redesigned 0.9 code included) the layout is a plain seeded permutation."""
    high = ldpc_codes.get_code(0.95, N_BASE)
    layout = ldpc._layout(7, high)
    assert np.array_equal(np.sort(layout), np.arange(high.n))
    deg = np.diff(high.var_ptr)[layout]
    assert np.all(np.diff(deg) <= 0) and deg[-1] == 2 and deg[0] > 2
    assert not np.array_equal(layout, ldpc._layout(8, high))  # random within a degree
    for rate in (0.8, 0.9):
        low = ldpc_codes.get_code(rate, N_BASE)
        assert np.array_equal(ldpc._layout(7, low), np.random.default_rng(7).permutation(low.n))


@pytest.mark.parametrize("rate", ldpc_codes.RATES)
def test_codes_realise_their_degree_distribution(rate):
    """Each code has its distribution's variable degrees (at most m − 1 of degree 2, the excess made degree 3),
    every check ⌊E/m⌋ or ⌈E/m⌉ edges, and a column form that is the row form's transpose. The redesigned
    rate-0.9 profile has no degree-2 variable: PEG once laid an empty chain from variable −1 there and
    corrupted memory. Redesigned profiles carry their revision in the code's name, so an older cache file
    is not read for them."""
    code = _base(rate)
    dist = ldpc_codes.DISTRIBUTIONS[rate]
    var_deg = np.diff(code.var_ptr)
    counts = {int(d): int(c) for d, c in zip(*np.unique(var_deg, return_counts=True), strict=True)}
    assert set(counts) <= set(dist) | {3}
    assert counts.get(2, 0) <= code.m - 1
    total = sum(dist.values())
    for d, frac in dist.items():
        if d not in (2, 3):
            assert abs(counts.get(d, 0) - frac / total * code.n) <= 1
    chk_deg = np.diff(code.row_ptr)
    assert chk_deg.min() >= code.edges // code.m and chk_deg.max() <= -(-code.edges // code.m)
    _assert_column_form_is_the_transpose(code)
    revision = ldpc_codes.DISTRIBUTION_REVISIONS.get(rate)
    digits = f"{rate * 100:g}".replace(".", "")  # 0.9 → r90, 0.915 → r915
    assert code.name.split("-")[1] == (f"r{digits}d{revision}" if revision else f"r{digits}")
    if rate == 0.9:
        assert 2 not in counts
