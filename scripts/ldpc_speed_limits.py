#!/usr/bin/env python3
"""Measure how far the LDPC decoder can go on this CPU (outside CI; docs/ldpc.md, "Why the 30 Mbit/s
target is blocked here").

Three measurements on 10⁵-bit frames (the benchmark's frames, ``benchmarks/bench_reconciliation.py``),
each printed as one JSON line:

* ``minsum``: the mother code's whole syndrome at QBER 3 % and 5 % (f ≈ 1.18–1.20, which sum-product
  decodes in 11–12 iterations) with layered normalised min-sum (α) and offset min-sum (β), 300
  iterations, no early stop: the checks left unsatisfied. On the binary symmetric channel every key
  position has the same |LLR|, so a check's minimum is the channel LLR itself, while sum-product's
  message from a check of degree 31 is about a tenth of it.
* ``ceiling``: the lane kernels timed with φ replaced by a multiply (results wrong, timing only: a fixed
  10 iterations), against the kernels as they are: what removing the φ lookups entirely could give.
* ``threads``: one decoding of the mother code's whole syndrome at 3 % (the most favourable reading of
  "decoder throughput": one attempt that succeeds), four frames, on one thread and on two.

Usage: ``.venv/bin/python scripts/ldpc_speed_limits.py [minsum] [ceiling] [threads]`` (about a minute).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
from numba import njit
from numba import types as nb_types
from numba.extending import intrinsic

from qkdstack.protocol import ldpc_decoder as decoder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_reconciliation as bench  # the benchmark's frames and first decoding problems

ITERATIONS = 300


@njit(cache=True)
def _min_sum(row_ptr, col_idx, llr0, synd, iterations, alpha, beta):
    """Layered min-sum, R = sign · max(α·min − β, 0), ``iterations`` in full; the unsatisfied checks after
    the last one (counted as the rows are read, like the decoder's own). The min-sum branch of
    ``ldpc_decoder._decode_one`` with an offset added and its stall stop removed: a failing rule is
    measured at a fixed iteration count, not where it gives up."""
    m = row_ptr.size - 1
    L = llr0.copy()
    R = np.zeros(col_idx.size, np.float32)
    tmp = np.empty(np.max(row_ptr[1:] - row_ptr[:-1]), np.float32)
    unsatisfied = m  # no iteration run: every check counts as unsatisfied
    for _ in range(iterations):
        unsatisfied = 0
        for c in range(m):
            start, end = row_ptr[c], row_ptr[c + 1]
            sign, hard = synd[c], synd[c]
            min1, min2, at = np.float32(1e30), np.float32(1e30), -1
            for e in range(start, end):
                lv = L[col_idx[e]]
                hard ^= lv < 0
                t = lv - R[e]
                tmp[e - start] = t
                sign ^= t < 0
                a = abs(t)
                if a < min1:
                    min1, min2, at = a, min1, e
                elif a < min2:
                    min2 = a
            m1, m2 = max(alpha * min1 - beta, 0.0), max(alpha * min2 - beta, 0.0)
            for e in range(start, end):
                t = tmp[e - start]
                mag = m2 if e == at else m1
                r = -mag if sign ^ (t < 0) else mag
                R[e] = r
                L[col_idx[e]] = t + r
            unsatisfied += hard
    return unsatisfied


def minsum() -> None:
    for q in (0.03, 0.05):
        a, b = bench._frame(q, 7)
        _params, _plan, (row_ptr, col_idx), llr, target, err = bench._first_attempt(a, b, q, 7, mother=True)
        out, it = np.empty(llr.shape, np.uint8), np.empty(1, np.int32)
        decoder.decode_batch(row_ptr, col_idx, llr, target, 200, 0.0, out, it)
        rules = [("alpha", x, x, 0.0) for x in (0.1, 0.15, 0.2, 0.6, 0.7, 0.8)]
        rules += [("beta", x, 1.0, x) for x in (0.2, 0.5, 2.8, 3.1, 3.3)]
        left = {f"{kind} {x}": int(_min_sum(row_ptr, col_idx, llr[0], target[0], ITERATIONS, np.float32(al),
                                            np.float32(be))) for kind, x, al, be in rules}
        print(json.dumps({"measure": "minsum", "qber": q, "checks": int(row_ptr.size - 1),
                          "sum_product_iterations": int(it[0]), "sum_product_right": bool((out == err).all()),
                          f"min_sum_unsatisfied_after_{ITERATIONS}": left}))


@intrinsic
def _no_phi(typingctx, table, x):
    """|x|/2 in every lane: as cheap as an arithmetic step gets, standing in for the φ lookups."""
    w = x.count

    def codegen(context, builder, sig, args):
        vf, vi = decoder._vf(w), decoder._vi(w)
        a = builder.bitcast(builder.and_(decoder._bits(builder, decoder._unpack(builder, args[1], w), w),
                                         decoder._splat(vi, 2**31 - 1)), vf)
        return decoder._pack(context, builder, builder.fmul(a, decoder._splat(vf, 0.5)), sig.return_type)
    return nb_types.UniTuple(nb_types.float32, w)(table, x), codegen


def _rebuilt(fn, **replace):
    """``fn`` (a Numba dispatcher) compiled again with some of its globals replaced."""
    py = fn.py_func
    return njit(nogil=True)(types.FunctionType(py.__code__, {**py.__globals__, **replace}, py.__name__,
                                               py.__defaults__, py.__closure__))


def _best_of(runs, fn) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ceiling() -> None:
    a, b = bench._frame(0.03, 3)
    _params, _plan, (row_ptr, col_idx), llr, target, _err = bench._first_attempt(a, b, 0.03, 3)
    z = np.float32(0.0)
    eight = (z,) * 8
    lane_rows = _rebuilt(decoder._lane_rows, _vphi=_no_phi)
    kernels = {"table": (decoder._rows_one, decoder._lane_block),
               "no_phi": (_rebuilt(decoder._rows_one, _vphi=_no_phi),
                          _rebuilt(decoder._lane_block, _lane_rows=lane_rows))}
    groups = decoder._row_groups(row_ptr, col_idx, llr.shape[1], 8)
    llr8, target8 = np.repeat(llr, 8, axis=0), np.repeat(target, 8, axis=0)
    result = {"measure": "ceiling", "qber": 0.03, "edges": int(col_idx.size), "iterations": 10}
    for name, (rows_one, lane_block) in kernels.items():
        def rows(rows_one=rows_one):
            out, it = np.empty(llr.shape, np.uint8), np.empty(1, np.int32)
            rows_one(row_ptr, col_idx, llr, target, 10, out, it, np.zeros((1, col_idx.size), np.float32),
                     decoder.PHI_TABLE, 0, groups, eight)

        def lanes(lane_block=lane_block):
            out, it = np.empty(llr8.shape, np.uint8), np.empty(8, np.int32)
            lane_block(row_ptr, col_idx, llr8, target8, 10, out, it, np.zeros((8, col_idx.size), np.float32),
                       decoder.PHI_TABLE, 0, 8, eight)
        rows()
        lanes()
        result[f"{name}_row_lanes_ns_per_edge"] = round(_best_of(3, rows) / (10 * col_idx.size) * 1e9, 2)
        result[f"{name}_codeword_lanes_ns_per_edge"] = round(_best_of(2, lanes) / (80 * col_idx.size) * 1e9, 2)
    print(json.dumps(result))


def threads() -> None:
    problems = [bench._first_attempt(*bench._frame(0.03, s), 0.03, s, mother=True) for s in range(3, 7)]

    def decode(problem) -> int:
        _params, _plan, (row_ptr, col_idx), llr, target, err = problem
        out, it = np.empty(llr.shape, np.uint8), np.empty(llr.shape[0], np.int32)
        decoder.decode_lanes_warm(row_ptr, col_idx, llr, target, 100, 0.0, out, it,
                                  np.zeros((llr.shape[0], col_idx.size), np.float32), decoder.PHI_TABLE)
        assert (out == err).all()
        return int(it[0])

    decode(problems[0])
    t0 = time.perf_counter()
    iterations = [decode(p) for p in problems]
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    workers = [threading.Thread(target=lambda k=k: [decode(p) for p in problems[k::2]]) for k in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    two = time.perf_counter() - t0
    print(json.dumps({"measure": "threads", "qber": 0.03, "frames": len(problems), "iterations": iterations,
                      "one_thread_bit_per_s": round(len(problems) * bench.N / one),
                      "two_threads_bit_per_s": round(len(problems) * bench.N / two)}))


if __name__ == "__main__":
    for part in sys.argv[1:] or ["minsum", "ceiling", "threads"]:
        {"minsum": minsum, "ceiling": ceiling, "threads": threads}[part]()
