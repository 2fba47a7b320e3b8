"""Numba kernels of the LDPC decoder: layered belief propagation on the error pattern e = x ⊕ y.

Bob (:func:`qkdstack.protocol.ldpc.bob`) looks for the e with H·e = t (t = H·x ⊕ H·y, the syndrome
difference) from the channel log-likelihood ratios llr0 (log((1 − q)/q) on key positions,
:data:`KNOWN_LLR` on shortened ones). Two kernels with the same semantics:

* :func:`decode_batch` / :func:`decode_batch_warm`: one codeword at a time (``_decode_one``), scalar.
* :func:`decode_lanes_warm`: the codewords of a call share one matrix (a frame is several codewords of
  one mother code; only the targets and the LLRs differ), so it decodes :data:`LANES` of them together,
  the codeword index being the innermost, contiguous, branch-free loop (L[n, LANES], R[edges, LANES]):
  LLVM turns each of those loops into SIMD instructions (the φ lookups into gathers).

Both run layered sum-product (Gallager's φ form, φ(x) = −ln tanh(x/2) from a table; or normalised
min-sum when alpha > 0, Chen & Fossorier 2002), row by row: for a check c with variables V(c),
t_v = L_v − R_cv, R_cv = (−1)^(t_c ⊕ ⊕_{u≠v} [t_u < 0]) · φ(Σ_{u≠v} φ(|t_u|)), L_v = t_v + R_cv
(the layered schedule of Hocevar, IEEE SIPS 2004). A decoding ends when the syndrome is met (the
iterations used), or with −1 when it was not met within ``max_iter`` iterations or stalled: its count of
unsatisfied checks reached no new minimum for :data:`STALL_ITERATIONS` iterations.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

STALL_ITERATIONS = 12
"""A decoding whose count of unsatisfied checks has not reached a new minimum for this many iterations is
declared failed (it would almost never converge later; failures otherwise cost all ``max_iterations``)."""

PHI_SCALE = 256.0
PHI_MAX = 24.0
LANES = 8
"""Codewords :func:`decode_lanes_warm` decodes together: 8 float32 = one 256-bit vector (AVX2). A
literal trip count, so LLVM vectorises the lane loops completely (no scalar remainder)."""


def _phi_table() -> np.ndarray:
    """phi(x) = −ln tanh(x/2) at the midpoints of [i/PHI_SCALE, (i+1)/PHI_SCALE), i < PHI_MAX·PHI_SCALE,
    then one 0 (phi beyond PHI_MAX: below 1e-10).

    A table instead of two transcendental calls per edge and iteration (phi is its own inverse, so
    the same table serves both directions). The step matters: at 1/64 a round test with n = 2048
    codes converged to a wrong codeword that verification caught; 1/256 did not. The final 0 lets the
    lane kernel clamp its index instead of branching (the scalar kernel returns 0 past the end).
    """
    x = (np.arange(int(PHI_MAX * PHI_SCALE), dtype=np.float64) + 0.5) / PHI_SCALE
    return np.append(-np.log(np.tanh(x / 2)), 0.0).astype(np.float32)


PHI_TABLE = _phi_table()


@njit(cache=True, nogil=True, inline="always")
def _phi(x, table):
    i = int(x * np.float32(PHI_SCALE))
    if i >= table.size:
        return np.float32(0.0)
    return table[i]


@njit(cache=True, nogil=True, fastmath=True)
def _decode_one(row_ptr, col_idx, llr0, synd, max_iter, alpha, L, R, tmp, phis, table, warm=False):
    """Layered BP on one codeword (sum-product, or normalised min-sum when alpha > 0).

    L holds the posteriors. Returns the iterations used, or −1 when the syndrome was not met
    within ``max_iter`` iterations or the decoding stalled (:data:`STALL_ITERATIONS`). Each row
    also checks its parity under the current hard decisions as it is read; only when a whole
    iteration saw every row satisfied is the exact check pass run. ``warm``: R holds check messages
    to start from (a previous attempt's, 0 on rows that are new), and L starts at llr0 + ΣR, the
    posteriors those messages imply; otherwise every message starts at 0.
    """
    n = llr0.size
    m = row_ptr.size - 1
    for v in range(n):
        L[v] = llr0[v]
    if warm:
        for e in range(col_idx.size):
            L[col_idx[e]] += R[e]
    else:
        for e in range(col_idx.size):
            R[e] = 0.0
    best = m + 1
    best_it = 0
    for it in range(max_iter):
        unsatisfied = 0
        for c in range(m):
            start = row_ptr[c]
            end = row_ptr[c + 1]
            sgn = synd[c]
            hard = synd[c]
            if alpha > 0:
                min1 = np.float32(1e30)
                min2 = np.float32(1e30)
                idx = -1
                for e in range(start, end):
                    lv = L[col_idx[e]]
                    if lv < 0:
                        hard ^= 1
                    t = lv - R[e]
                    tmp[e - start] = t
                    a = t
                    if t < 0:
                        sgn ^= 1
                        a = -t
                    if a < min1:
                        min2 = min1
                        min1 = a
                        idx = e
                    elif a < min2:
                        min2 = a
                m1 = alpha * min1
                m2 = alpha * min2
                for e in range(start, end):
                    t = tmp[e - start]
                    mag = m2 if e == idx else m1
                    s = sgn
                    if t < 0:
                        s ^= 1
                    r = -mag if s else mag
                    R[e] = r
                    L[col_idx[e]] = t + r
            else:  # sum-product: phi(x) = -log tanh(x/2) is its own inverse (Gallager)
                total = np.float32(0.0)
                for e in range(start, end):
                    lv = L[col_idx[e]]
                    if lv < 0:
                        hard ^= 1
                    t = lv - R[e]
                    tmp[e - start] = t
                    a = t
                    if t < 0:
                        sgn ^= 1
                        a = -t
                    ph = _phi(a, table)
                    phis[e - start] = ph
                    total += ph
                for e in range(start, end):
                    t = tmp[e - start]
                    d = total - phis[e - start]
                    mag = _phi(d if d > 0 else np.float32(0.0), table)
                    s = sgn
                    if t < 0:
                        s ^= 1
                    r = -mag if s else mag
                    R[e] = r
                    L[col_idx[e]] = t + r
            unsatisfied += hard
        if unsatisfied == 0:  # every row looked satisfied as it was read: check exactly
            exact = 0
            for c in range(m):
                p = synd[c]
                for e in range(row_ptr[c], row_ptr[c + 1]):
                    if L[col_idx[e]] < 0:
                        p ^= 1
                exact += p
            if exact == 0:
                return it + 1
        if unsatisfied < best:
            best = unsatisfied
            best_it = it
        elif it - best_it >= STALL_ITERATIONS:  # no progress for a while: a failure, stop early
            return -1
    return -1


@njit(cache=True, nogil=True)
def decode_batch(row_ptr, col_idx, llr0, synd, max_iter, alpha, err_out, iters_out, table=PHI_TABLE):
    """Decode every row of ``llr0`` (error-pattern LLRs) against the matching row of ``synd``.

    ``err_out[i]`` receives the hard decision of codeword i's error pattern and
    ``iters_out[i]`` the iterations used, or −1 when the syndrome was never satisfied.
    """
    count, n = llr0.shape
    L = np.empty(n, dtype=np.float32)
    R = np.empty(col_idx.size, dtype=np.float32)
    maxdeg = 0
    for c in range(row_ptr.size - 1):
        d = row_ptr[c + 1] - row_ptr[c]
        if d > maxdeg:
            maxdeg = d
    tmp = np.empty(maxdeg, dtype=np.float32)
    phis = np.empty(maxdeg, dtype=np.float32)
    a = np.float32(alpha)
    for i in range(count):
        iters_out[i] = _decode_one(row_ptr, col_idx, llr0[i], synd[i], max_iter, a, L, R, tmp, phis, table)
        for v in range(n):
            err_out[i, v] = 1 if L[v] < 0 else 0


@njit(cache=True, nogil=True)
def decode_batch_warm(row_ptr, col_idx, llr0, synd, max_iter, alpha, err_out, iters_out, r_state, table=PHI_TABLE):
    """:func:`decode_batch` starting from the check messages ``r_state[i]`` (codewords × edges, float32;
    0 on new rows) and leaving the final messages there, so a blind round continues a failed decoding
    instead of starting it again."""
    count, n = llr0.shape
    L = np.empty(n, dtype=np.float32)
    maxdeg = 0
    for c in range(row_ptr.size - 1):
        d = row_ptr[c + 1] - row_ptr[c]
        if d > maxdeg:
            maxdeg = d
    tmp = np.empty(maxdeg, dtype=np.float32)
    phis = np.empty(maxdeg, dtype=np.float32)
    a = np.float32(alpha)
    for i in range(count):
        iters_out[i] = _decode_one(row_ptr, col_idx, llr0[i], synd[i], max_iter, a, L, r_state[i], tmp, phis,
                                   table, True)
        for v in range(n):
            err_out[i, v] = 1 if L[v] < 0 else 0


# --------------------------------------------------------------------------------------------
# The lane kernel: up to LANES codewords of one matrix at a time, in explicit SIMD vectors
#
# Numba runs LLVM's loop vectoriser but not its SLP vectoriser, and cannot tell LLVM that two arrays do
# not overlap: a loop over 8 lanes came out scalar (measured: 1.3x the scalar kernel at best, slower at
# 16 lanes). So the lane kernel works on vectors of W float32 (W = 4 or 8) through the few intrinsics
# below: on the Python side a vector is a Numba UniTuple(float32, W), and every intrinsic takes its width
# from that type (``like``: a tuple of the width wanted), so one kernel is compiled per width; inside an
# intrinsic it is an LLVM <W x float> (the pack/unpack pairs between intrinsics fold away). Arrays are
# flat, lane-innermost: lane j of variable v is L[v * W + j]. The φ lookups stay one scalar load per
# lane: llvm.masked.gather (vgatherqps) was measured slower (2.1 against 2.5 Mbit/s).

_F32 = ir.FloatType()
_I32 = ir.IntType(32)


def _vf(w):
    return ir.VectorType(_F32, w)


def _vi(w):
    return ir.VectorType(_I32, w)


def _splat(ty, value):
    return ir.Constant(ty, [value] * ty.count)


def _unpack(builder, tup, w):
    vec = ir.Constant(_vf(w), ir.Undefined)
    for i in range(w):
        vec = builder.insert_element(vec, builder.extract_value(tup, i), ir.Constant(_I32, i))
    return vec


def _pack(context, builder, vec, tupty):
    return context.make_tuple(builder, tupty,
                              [builder.extract_element(vec, ir.Constant(_I32, i)) for i in range(tupty.count)])


def _vptr(context, builder, arrty, arr, off, w):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [off]), _vf(w).as_pointer())


@intrinsic
def _vload(typingctx, arr, off, like):
    """arr[off : off + W] (float32) as one vector, W = len(like)."""
    w = like.count

    def codegen(context, builder, sig, args):
        vec = builder.load(_vptr(context, builder, sig.args[0], args[0], args[1], w), align=4)
        return _pack(context, builder, vec, sig.return_type)
    return types.UniTuple(types.float32, w)(arr, off, like), codegen


@intrinsic
def _vstore(typingctx, arr, off, v):
    """arr[off : off + W] = v."""
    w = v.count

    def codegen(context, builder, sig, args):
        builder.store(_unpack(builder, args[2], w), _vptr(context, builder, sig.args[0], args[0], args[1], w), align=4)
        return context.get_dummy_value()
    return types.void(arr, off, v), codegen


def _binop(fn):
    @intrinsic
    def op(typingctx, a, b):
        w = a.count

        def codegen(context, builder, sig, args):
            out = fn(builder, _unpack(builder, args[0], w), _unpack(builder, args[1], w), w)
            return _pack(context, builder, out, sig.return_type)
        return types.UniTuple(types.float32, w)(a, b), codegen
    return op


def _bits(builder, v, w):
    return builder.bitcast(v, _vi(w))


_vadd = _binop(lambda b, x, y, w: b.fadd(x, y))
_vsub = _binop(lambda b, x, y, w: b.fsub(x, y))
_vxorsign = _binop(  # x with its sign flipped in the lanes where y's sign bit is set
    lambda b, x, y, w: b.bitcast(b.xor(_bits(b, x, w), b.and_(_bits(b, y, w), _splat(_vi(w), -(2**31)))), _vf(w)))
_vsubpos = _binop(  # max(x − y, 0)
    lambda b, x, y, w: b.select(b.fcmp_ordered(">", b.fsub(x, y), _splat(_vf(w), 0.0)), b.fsub(x, y),
                                _splat(_vf(w), 0.0)))
_vcountneg = _binop(  # x + 1 in the lanes where y's sign bit is set
    lambda b, x, y, w: b.fadd(x, b.select(b.icmp_signed("<", _bits(b, y, w), _splat(_vi(w), 0)),
                                          _splat(_vf(w), 1.0), _splat(_vf(w), 0.0))))


@intrinsic
def _vphi(typingctx, table, x):
    """table[min(int(|x|·PHI_SCALE), table.size − 1)] in every lane (the last entry of PHI_TABLE is 0)."""
    w = x.count

    def codegen(context, builder, sig, args):
        vf, vi = _vf(w), _vi(w)
        tarr = context.make_array(sig.args[0])(context, builder, args[0])
        a = builder.bitcast(builder.and_(_bits(builder, _unpack(builder, args[1], w), w), _splat(vi, 2**31 - 1)), vf)
        a = builder.fmul(a, _splat(vf, PHI_SCALE))
        top = builder.sitofp(builder.sub(builder.extract_value(tarr.shape, 0), ir.Constant(ir.IntType(64), 1)), _F32)
        lim = builder.shuffle_vector(builder.insert_element(ir.Constant(vf, ir.Undefined), top, ir.Constant(_I32, 0)),
                                     ir.Constant(vf, ir.Undefined), _splat(vi, 0))
        idx = builder.fptosi(builder.select(builder.fcmp_ordered("<", a, lim), a, lim), vi)
        out = ir.Constant(vf, ir.Undefined)
        for i in range(w):
            p = builder.gep(tarr.data, [builder.extract_element(idx, ir.Constant(_I32, i))])
            out = builder.insert_element(out, builder.load(p), ir.Constant(_I32, i))
        return _pack(context, builder, out, sig.return_type)
    return types.UniTuple(types.float32, w)(table, x), codegen


@njit(cache=True, nogil=True)
def _lane_rows(row_ptr, col_idx, S, L, R, T, P, table, acc, like):
    """One layered sum-product iteration over every row for all W = len(like) lanes (the rule of
    :func:`_decode_one`).

    ``S``: (−1)^target per row and lane; ``acc``: scratch of 5·W floats, of which acc[0:W] counts the
    rows each lane saw unsatisfied as it read them (a row's accumulators live in acc too: the loop over
    its edges carries them through memory, which the CPU store-forwards).
    """
    W = len(like)
    m = row_ptr.size - 1
    zero = _vload(acc, 4 * W, like)
    _vstore(acc, 0, zero)
    for c in range(m):
        start = row_ptr[c]
        end = row_ptr[c + 1]
        s = _vload(S, c * W, like)
        _vstore(acc, W, zero)  # Σ φ(|t|)
        _vstore(acc, 2 * W, s)  # sign: target ⊕ signs of t
        _vstore(acc, 3 * W, s)  # hard decisions' parity ⊕ target
        for k in range(end - start):
            e = start + k
            lv = _vload(L, col_idx[e] * W, like)
            t = _vsub(lv, _vload(R, e * W, like))
            _vstore(T, k * W, t)
            ph = _vphi(table, t)
            _vstore(P, k * W, ph)
            _vstore(acc, W, _vadd(_vload(acc, W, like), ph))
            _vstore(acc, 2 * W, _vxorsign(_vload(acc, 2 * W, like), t))
            _vstore(acc, 3 * W, _vxorsign(_vload(acc, 3 * W, like), lv))
        total = _vload(acc, W, like)
        sgn = _vload(acc, 2 * W, like)
        for k in range(end - start):
            e = start + k
            t = _vload(T, k * W, like)
            mag = _vphi(table, _vsubpos(total, _vload(P, k * W, like)))
            r = _vxorsign(_vxorsign(mag, sgn), t)
            _vstore(R, e * W, r)
            _vstore(L, col_idx[e] * W, _vadd(t, r))
        _vstore(acc, 0, _vcountneg(_vload(acc, 0, like), _vload(acc, 3 * W, like)))


@njit(cache=True, nogil=True)
def _lane_finish(j, i, it, W, L, R, err_out, iters_out, r_state):
    """Lane j (codeword i) is done: its hard decisions, iterations and check messages out; never touched again."""
    iters_out[i] = it
    for v in range(err_out.shape[1]):
        err_out[i, v] = 1 if L[v * W + j] < 0 else 0
    for e in range(r_state.shape[1]):
        r_state[i, e] = R[e * W + j]


@njit(cache=True, nogil=True)
def _lane_load(j, i, W, col_idx, llr0, synd, r_state, L, R, S):
    """Codeword i into lane j: its messages r_state[i], posteriors llr0[i] + ΣR (summed in the order of
    :func:`_decode_one`, so the lane starts from the same floats), targets as ±1."""
    for v in range(llr0.shape[1]):
        L[v * W + j] = llr0[i, v]
    for e in range(col_idx.size):
        R[e * W + j] = r_state[i, e]
        L[col_idx[e] * W + j] += r_state[i, e]
    for c in range(synd.shape[1]):
        S[c * W + j] = -1.0 if synd[i, c] else 1.0


@njit(cache=True, nogil=True)
def _lane_block(row_ptr, col_idx, llr0, synd, max_iter, err_out, iters_out, r_state, table, b0, b1, like):
    """Codewords b0 … b1 − 1 through W = len(like) lanes; see :func:`decode_lanes_warm`."""
    W = len(like)
    n = llr0.shape[1]
    m = row_ptr.size - 1
    edges = col_idx.size
    maxdeg = 0
    for c in range(m):
        maxdeg = max(maxdeg, row_ptr[c + 1] - row_ptr[c])
    L = np.full(n * W, np.float32(64.0), np.float32)  # idle lanes: every bit known, target 0, decoded at once
    R = np.zeros(edges * W, np.float32)
    S = np.ones(m * W, np.float32)
    T = np.empty(maxdeg * W, np.float32)
    P = np.empty(maxdeg * W, np.float32)
    acc = np.zeros(5 * W, np.float32)
    lane_cw = np.full(W, -1, np.int64)  # the codeword in each lane, −1: idle
    first = np.zeros(W, np.int64)  # the block iteration at which the lane's codeword started
    best = np.empty(W, np.int64)
    best_it = np.empty(W, np.int64)
    nxt = b0
    for j in range(W):
        if nxt < b1:
            _lane_load(j, nxt, W, col_idx, llr0, synd, r_state, L, R, S)
            lane_cw[j] = nxt
            best[j] = m + 1
            best_it[j] = 0
            nxt += 1
    busy = nxt - b0
    it = 0
    while busy > 0:
        _lane_rows(row_ptr, col_idx, S, L, R, T, P, table, acc, like)
        for j in range(W):
            i = lane_cw[j]
            if i < 0:
                continue
            k = it - first[j]  # this codeword's iteration (0-based), as in _decode_one
            unsat = int(acc[j])
            result = 0
            if unsat == 0:  # every row looked satisfied as it was read: check exactly
                exact = 0
                for c in range(m):
                    p = 1 if S[c * W + j] < 0 else 0
                    for e in range(row_ptr[c], row_ptr[c + 1]):
                        if L[col_idx[e] * W + j] < 0:
                            p ^= 1
                    exact += p
                if exact == 0:
                    result = k + 1
            if result == 0:
                if unsat < best[j]:
                    best[j] = unsat
                    best_it[j] = k
                elif k - best_it[j] >= STALL_ITERATIONS:  # no progress for a while: a failure, stop early
                    result = -1
                if result == 0 and k + 1 >= max_iter:
                    result = -1
            if result != 0:
                _lane_finish(j, i, result, W, L, R, err_out, iters_out, r_state)
                lane_cw[j] = -1
                busy -= 1
                if nxt < b1:  # the next codeword takes the lane over
                    _lane_load(j, nxt, W, col_idx, llr0, synd, r_state, L, R, S)
                    lane_cw[j] = nxt
                    first[j] = it + 1
                    best[j] = m + 1
                    best_it[j] = 0
                    nxt += 1
                    busy += 1
        it += 1


@njit(cache=True, nogil=True)
def decode_lanes_warm(row_ptr, col_idx, llr0, synd, max_iter, alpha, err_out, iters_out, r_state, table):
    """:func:`decode_batch_warm` (same arguments, same results per codeword), up to LANES codewords at a time.

    W = 8 lanes (4 for up to 4 codewords: a 4-lane block costs about 0.6 of an 8-lane one, measured),
    laid out lane-innermost (L[n·W], R[edges·W], the targets as ±1 in S[m·W]). A lane stops when its
    syndrome is met (iterations used), after ``max_iter`` iterations or when it stalls (−1;
    :data:`STALL_ITERATIONS`), counted per lane as in :func:`_decode_one`; its hard decisions and check
    messages are written out then and never changed again, and the next codeword not yet started takes
    the lane over (so a block never waits for its slowest codeword while others are queued). Idle lanes
    hold a dummy word (all bits known) or a finished lane's copy, computed but never read. A single
    codeword runs with row lanes (:func:`decode_rows_warm`, measured 1.2–4.6× the per-codeword kernel
    there, where a block of 4 codeword lanes with one in use was 0.9–1.2×). Normalised min-sum
    (alpha > 0) has no lane form: those calls, and ``max_iter`` ≤ 0, run :func:`decode_batch_warm`.
    """
    if alpha > 0 or max_iter <= 0:
        decode_batch_warm(row_ptr, col_idx, llr0, synd, max_iter, alpha, err_out, iters_out, r_state, table)
        return
    z = np.float32(0.0)
    count = llr0.shape[0]
    if count == 1:  # no second codeword to share the lanes with: lanes over its checks instead
        decode_rows_warm(row_ptr, col_idx, llr0, synd, max_iter, alpha, err_out, iters_out, r_state, table)
    elif count <= 4:
        _lane_block(row_ptr, col_idx, llr0, synd, max_iter, err_out, iters_out, r_state, table, 0, count,
                    (z, z, z, z))
    else:
        _lane_block(row_ptr, col_idx, llr0, synd, max_iter, err_out, iters_out, r_state, table, 0, count,
                    (z, z, z, z, z, z, z, z))


# --------------------------------------------------------------------------------------------
# Row lanes: one codeword, W consecutive checks that share no variable at a time
#
# A frame of one long codeword (a quasi-cyclic lift: the z copies c·z + i of a base check touch the
# variables v·z + (i + s) mod z, all different) has no second codeword to fill the lanes with, but its
# consecutive checks are mostly variable-disjoint, and a layered decoder may update variable-disjoint
# checks in any order, or at once, with the same floats: so the lanes take W consecutive disjoint checks
# of the one codeword (the posteriors gathered and scattered by variable index, the messages laid out by
# group, slot and lane). Results are those of the per-codeword kernel exactly.


@intrinsic
def _vgather(typingctx, arr, idx, off, like):
    """arr[idx[off + j]] for j < W (float32; idx int64)."""
    w = like.count

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ix = context.make_array(sig.args[1])(context, builder, args[1])
        out = ir.Constant(_vf(w), ir.Undefined)
        for j in range(w):
            k = builder.load(builder.gep(ix.data, [builder.add(args[2], ir.Constant(args[2].type, j))]))
            out = builder.insert_element(out, builder.load(builder.gep(a.data, [k])), ir.Constant(_I32, j))
        return _pack(context, builder, out, sig.return_type)
    return types.UniTuple(types.float32, w)(arr, idx, off, like), codegen


@intrinsic
def _vscatter(typingctx, arr, idx, off, v):
    """arr[idx[off + j]] = v[j] for j < W, in lane order."""
    w = v.count

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ix = context.make_array(sig.args[1])(context, builder, args[1])
        vec = _unpack(builder, args[3], w)
        for j in range(w):
            k = builder.load(builder.gep(ix.data, [builder.add(args[2], ir.Constant(args[2].type, j))]))
            builder.store(builder.extract_element(vec, ir.Constant(_I32, j)), builder.gep(a.data, [k]))
        return context.get_dummy_value()
    return types.void(arr, idx, off, v), codegen


@njit(cache=True, nogil=True)
def _row_groups(row_ptr, col_idx, n, W):
    """Consecutive checks in groups of at most W that share no variable (greedy, in row order); the slots
    of each group: (group offsets, degrees, the variable of every slot — n, a dummy, where a lane has no
    edge —, the edge of every slot or −1)."""
    m = row_ptr.size - 1
    stamp = np.full(n, -1, np.int64)
    starts = np.empty(m + 1, np.int64)
    g = 0
    starts[0] = 0
    size = 0
    for c in range(m):
        clash = size >= W
        if not clash:
            for e in range(row_ptr[c], row_ptr[c + 1]):
                if stamp[col_idx[e]] == g:
                    clash = True
                    break
        if clash and size > 0:
            g += 1
            starts[g] = c
            size = 0
        for e in range(row_ptr[c], row_ptr[c + 1]):
            stamp[col_idx[e]] = g
        size += 1
    groups = g + 1 if m > 0 else 0
    starts[groups] = m
    deg = np.zeros(groups, np.int64)
    off = np.zeros(groups + 1, np.int64)
    for g in range(groups):
        for c in range(starts[g], starts[g + 1]):
            deg[g] = max(deg[g], row_ptr[c + 1] - row_ptr[c])
        off[g + 1] = off[g] + deg[g] * W
    slot_var = np.full(off[groups], n, np.int64)
    slot_edge = np.full(off[groups], -1, np.int64)
    for g in range(groups):
        for j in range(starts[g + 1] - starts[g]):
            c = starts[g] + j
            for k in range(row_ptr[c + 1] - row_ptr[c]):
                slot_var[off[g] + k * W + j] = col_idx[row_ptr[c] + k]
                slot_edge[off[g] + k * W + j] = row_ptr[c] + k
    return starts[: groups + 1].copy(), off, deg, slot_var, slot_edge


@njit(cache=True, nogil=True)
def _rows_one(row_ptr, col_idx, llr0, synd, max_iter, err_out, iters_out, r_state, table, i, groups, like):
    """Codeword i by row lanes (:func:`_decode_one`'s rule and stopping, warm, same floats)."""
    W = len(like)
    starts, off, deg, slot_var, slot_edge = groups
    ng = deg.size
    n = llr0.shape[1]
    m = row_ptr.size - 1
    L = np.empty(n + 1, np.float32)
    for v in range(n):
        L[v] = llr0[i, v]
    for e in range(col_idx.size):
        L[col_idx[e]] += r_state[i, e]
    L[n] = 1e30  # the dummy variable: φ(|t|) = 0 and a positive sign whatever messages it receives
    R = np.zeros(off[ng], np.float32)
    for s in range(off[ng]):
        if slot_edge[s] >= 0:
            R[s] = r_state[i, slot_edge[s]]
    S = np.ones(ng * W, np.float32)
    for g in range(ng):
        for j in range(starts[g + 1] - starts[g]):
            if synd[i, starts[g] + j]:
                S[g * W + j] = -1.0
    maxdeg = 1
    for g in range(ng):
        maxdeg = max(maxdeg, deg[g])
    T = np.empty(maxdeg * W, np.float32)
    P = np.empty(maxdeg * W, np.float32)
    acc = np.zeros(5 * W, np.float32)
    zero = _vload(acc, 4 * W, like)
    best = m + 1
    best_it = 0
    result = -1
    for it in range(max_iter):
        _vstore(acc, 0, zero)
        for g in range(ng):
            base = off[g]
            s = _vload(S, g * W, like)
            _vstore(acc, W, zero)
            _vstore(acc, 2 * W, s)
            _vstore(acc, 3 * W, s)
            for k in range(deg[g]):
                o = base + k * W
                lv = _vgather(L, slot_var, o, like)
                t = _vsub(lv, _vload(R, o, like))
                _vstore(T, k * W, t)
                ph = _vphi(table, t)
                _vstore(P, k * W, ph)
                _vstore(acc, W, _vadd(_vload(acc, W, like), ph))
                _vstore(acc, 2 * W, _vxorsign(_vload(acc, 2 * W, like), t))
                _vstore(acc, 3 * W, _vxorsign(_vload(acc, 3 * W, like), lv))
            total = _vload(acc, W, like)
            sgn = _vload(acc, 2 * W, like)
            for k in range(deg[g]):
                o = base + k * W
                t = _vload(T, k * W, like)
                mag = _vphi(table, _vsubpos(total, _vload(P, k * W, like)))
                r = _vxorsign(_vxorsign(mag, sgn), t)
                _vstore(R, o, r)
                _vscatter(L, slot_var, o, _vadd(t, r))
            _vstore(acc, 0, _vcountneg(_vload(acc, 0, like), _vload(acc, 3 * W, like)))
        unsatisfied = 0
        for j in range(W):
            unsatisfied += int(acc[j])
        if unsatisfied == 0:  # every row looked satisfied as it was read: check exactly
            exact = 0
            for c in range(m):
                p = synd[i, c]
                for e in range(row_ptr[c], row_ptr[c + 1]):
                    if L[col_idx[e]] < 0:
                        p ^= 1
                exact += p
            if exact == 0:
                result = it + 1
                break
        if unsatisfied < best:
            best = unsatisfied
            best_it = it
        elif it - best_it >= STALL_ITERATIONS:
            break
    iters_out[i] = result
    for v in range(n):
        err_out[i, v] = 1 if L[v] < 0 else 0
    for s in range(off[ng]):
        if slot_edge[s] >= 0:
            r_state[i, slot_edge[s]] = R[s]


@njit(cache=True, nogil=True)
def decode_rows_warm(row_ptr, col_idx, llr0, synd, max_iter, alpha, err_out, iters_out, r_state, table):
    """:func:`decode_batch_warm` (same arguments, same results) with 8 variable-disjoint consecutive checks of
    one codeword at a time (row lanes, see above), codeword after codeword. Min-sum (alpha > 0) and
    ``max_iter`` ≤ 0 run :func:`decode_batch_warm`."""
    if alpha > 0 or max_iter <= 0:
        decode_batch_warm(row_ptr, col_idx, llr0, synd, max_iter, alpha, err_out, iters_out, r_state, table)
        return
    z = np.float32(0.0)
    eight = (z, z, z, z, z, z, z, z)
    groups = _row_groups(row_ptr, col_idx, llr0.shape[1], 8)
    for i in range(llr0.shape[0]):
        _rows_one(row_ptr, col_idx, llr0, synd, max_iter, err_out, iters_out, r_state, table, i, groups, eight)
