"""Reconciliation benchmark: LDPC (syndrome + blind rounds) beside Cascade and the PyPI ``ldpc`` decoder.

For QBER 1, 2, 3, 5, 8 % and frames of ``N`` = 10^5 bits with i.i.d. errors (the QBER estimate
handed to both parties is the true rate), it runs the whole LDPC stage (Alice and Bob over the
in-memory channel pair, one process) with the default :class:`~qkdstack.protocol.ldpc.LdpcParams`
(PEG base codes of n = 16384 bits, built once into the cache, lifted Z-fold by ``ldpc.lift_for``: one
codeword of 114688 bits for a 10⁵-bit frame; rate-adapted by merging row pairs) and
reports:

* ``f`` = *everything* the stage disclosed (syndromes, check parities, blind-round bits, Bob's status
  bits) / (N h(e)), e the frame's actual error fraction, the mean over the frames, with ``f_stderr``
  its standard error (a frame's f varies by about 0.02, so 4 frames could not tell 1.09 from 1.11);
  ``f_syndrome`` = the first syndrome alone;
* ``wrong_codewords_caught``: decodings that met the syndrome but failed the check parities;
* ``codeword_fer_first``: codewords whose first decoding failed / codewords;
  ``frame_fer_first``: frames with at least one such codeword; ``frame_fer_final``: frames given
  up after the blind rounds or with a residual error (with the rule-of-three 95 % bound 3/frames
  when none);
* round trips (mean, max), wall time of the stage and ``throughput_bit_per_s`` = N / wall time;
* ``cascade``: Cascade ("batched", the default reconciliation) on the same frames: ``f`` as the key length
  counts it (everything disclosed in both directions: Bob's decision bits as well, docs/cascade.md), and
  ``f_parities`` (Alice's parities alone, the figure the Cascade literature reports), round trips,
  throughput and frames left with a residual error;
* ``decoder_bit_per_s``: key bits per second of our decoder alone on the frame's first attempt
  (one thread, every codeword, failures included: at f_start = 1.05 most fail, by design);
  ``decoder_mother_bit_per_s``: the same on the mother code's whole syndrome (which decodes); the
  protocol itself decodes on ``ldpc.DECODER_THREADS`` threads;
  ``decoder_lanes_bit_per_s``, ``decoder_lanes_mother_bit_per_s``: the same two with the lane kernel
  (``ldpc.decode_lanes_warm``: the frame's codewords 8 at a time in SIMD lanes, or, for a frame of one
  codeword, its checks 8 at a time; one thread), which the protocol uses;
* ``ldpc_pkg``: the PyPI ``ldpc`` package's ``BpDecoder`` (product-sum, serial schedule, the same
  parity-check matrix, syndromes and channel probabilities, shortened bits at probability 1e-9) and
  ours on the first ``PKG_CODEWORDS`` codewords of the frame against the mother code's whole
  syndrome (a problem both decode; on the merged first attempt both mostly fail by design, and
  timing failures measures only when each gives up): key bits per second, failures, the ratio
  ours / theirs (``speedup``: our per-codeword kernel; ``speedup_lanes``: the lane kernel decoding those
  codewords in one call). Skipped (``null``) when the package is not installed.

``latency``: the whole reconciliation stage at QBER 3 % over a channel that delays every frame by
5 ms (10 ms round trip), LDPC and Cascade ("batched") side by side with their zero-delay times
(best of three runs each).

Frames per QBER: ``FRAMES`` (24) for f, frame errors and round trips, the decoders and the ``ldpc``
package timed on the first ``TIMED_FRAMES`` (4) of them (both multiplied by
``QKDSTACK_BENCH_RECON_SCALE``). The machine is shared: timings are noisy.
Run: ``.venv/bin/python benchmarks/run_all.py reconciliation``.
Frame error rates over more frames (not part of ``make bench``):
``.venv/bin/python benchmarks/bench_reconciliation.py fer 50`` (one JSON line per QBER on stderr).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time

import numpy as np

from qkdstack.errors import ProtocolAbort
from qkdstack.protocol import cascade, ldpc, ldpc_codes
from qkdstack.protocol.channel import InMemoryChannel

QBERS = (0.01, 0.02, 0.03, 0.05, 0.08)
N = 100_000
_SCALE = float(os.environ.get("QKDSTACK_BENCH_RECON_SCALE", "1"))
FRAMES = max(1, round(24 * _SCALE))
TIMED_FRAMES = min(FRAMES, max(1, round(4 * _SCALE)))
PKG_CODEWORDS = 2
DELAY_S = 0.005


class DelayedChannel(InMemoryChannel):
    """An in-memory channel end whose frames arrive ``delay`` seconds after they are sent."""

    def __init__(self, inbox, outbox, delay: float) -> None:
        super().__init__(inbox, outbox, 60.0)
        self._delay = delay

    async def _send_frame(self, frame: bytes) -> None:
        if self._delay:
            asyncio.get_running_loop().call_later(self._delay, self._outbox.put_nowait, frame)
        else:
            self._outbox.put_nowait(frame)


def _pair(delay: float = 0.0):
    a_to_b: asyncio.Queue[bytes] = asyncio.Queue()
    b_to_a: asyncio.Queue[bytes] = asyncio.Queue()
    return DelayedChannel(b_to_a, a_to_b, delay), DelayedChannel(a_to_b, b_to_a, delay)


def _frame(q: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, N, dtype=np.uint8)
    return a, a ^ (rng.random(N) < q).astype(np.uint8)


async def _ldpc(a, b, q, seed, delay=0.0):
    ca, cb = _pair(delay)
    return await asyncio.gather(ldpc.alice(ca, a, q, seed=seed), ldpc.bob(cb, b, q))


async def _cascade(a, b, q, delay=0.0):
    ca, cb = _pair(delay)
    return await asyncio.gather(cascade.alice(ca, a, q, "batched"), cascade.bob(cb, b, q, "batched"))


def _first_attempt(a, b, q, seed, mother=False):
    """The first decoding problem of a frame as Bob builds it: the merged checks (row_ptr, col_idx), llr,
    targets, and the true error patterns. ``mother``: every pair un-merged instead (the mother code's whole
    syndrome, f ≈ 1.15–1.3: the problem that decodes, where the first attempt mostly fails by design)."""
    params = ldpc.LdpcParams()
    plan = ldpc.make_plan(N, q, params)
    code = ldpc_codes.get_code(plan.rate, params.code_n, params.code_seed, plan.lift)
    st = ldpc._state(code, ldpc_codes.merge_pairs(code, params.code_seed), plan.merged,
                     plan.merged if mother else 0)
    positions = ldpc._layout(seed, code)
    wa, wb = ldpc._words(a, plan, positions, code.n), ldpc._words(b, plan, positions, code.n)
    sa = np.empty((plan.codewords, code.m), np.uint8)
    sb = np.empty_like(sa)
    ldpc._syndromes(code.row_ptr, code.col_idx, wa, sa)
    ldpc._syndromes(code.row_ptr, code.col_idx, wb, sb)
    d = sa ^ sb
    target = np.ascontiguousarray(np.concatenate([d[:, st.c1] ^ d[:, st.c2], d[:, st.singles]], axis=1))
    llr = np.full((plan.codewords, code.n), ldpc.KNOWN_LLR, np.float32)
    for i, k in enumerate(plan.payloads):
        llr[i, positions[:k]] = math.log((1 - q) / q)
    return params, plan, (st.row_ptr, st.col_idx), llr, target, wa ^ wb


def _decoder_rate(a, b, q, seed, mother=False, lanes=False) -> float:
    """Key bits per second of our decoder alone on a frame's first attempt (one thread, failures included);
    ``lanes``: the lane kernel (all the frame's codewords in one call), else the per-codeword kernel."""
    params, plan, (row_ptr, col_idx), llr, target, _err = _first_attempt(a, b, q, seed, mother)
    out = np.empty(llr.shape, np.uint8)
    iters = np.empty(plan.codewords, np.int32)
    r_state = np.zeros((plan.codewords, col_idx.size), np.float32)
    t0 = time.perf_counter()
    if lanes:
        ldpc.decode_lanes_warm(row_ptr, col_idx, llr, target, params.max_iterations, params.alpha, out, iters,
                               r_state, ldpc.PHI_TABLE)
    else:
        ldpc.decode_batch(row_ptr, col_idx, llr, target, params.max_iterations, params.alpha, out, iters)
    return N / (time.perf_counter() - t0)


def _pkg(a, b, q, seed) -> dict | None:
    """The PyPI ``ldpc`` package's BpDecoder and ours on the same codewords, side by side: the mother code's
    whole syndrome (both decode it; on the merged first attempt both mostly fail, and a comparison of
    failures measures only when each gives up)."""
    try:
        from ldpc import BpDecoder
    except ImportError:
        return None
    from scipy.sparse import csr_matrix

    params, plan, (row_ptr, col_idx), llr, target, err = _first_attempt(a, b, q, seed, mother=True)
    n = llr.shape[1]
    H = csr_matrix((np.ones(col_idx.size, np.uint8), col_idx, row_ptr), shape=(row_ptr.size - 1, n))
    bits = fails = ours_fails = 0
    ours_t = theirs_t = 0.0
    count = min(PKG_CODEWORDS, plan.codewords)
    for i in range(count):
        probs = np.where(llr[i] == ldpc.KNOWN_LLR, 1e-9, q)
        dec = BpDecoder(H, error_channel=probs, max_iter=params.max_iterations, bp_method="product_sum",
                        schedule="serial", input_vector_type="syndrome")
        t0 = time.perf_counter()
        est = dec.decode(target[i])
        theirs_t += time.perf_counter() - t0
        fails += int(not np.array_equal(np.asarray(est, dtype=np.uint8), err[i]))
        out = np.empty((1, n), np.uint8)
        iters = np.empty(1, np.int32)
        t0 = time.perf_counter()
        ldpc.decode_batch(row_ptr, col_idx, llr[i : i + 1], target[i : i + 1], params.max_iterations,
                          params.alpha, out, iters)
        ours_t += time.perf_counter() - t0
        ours_fails += int(not np.array_equal(out[0], err[i]))
        bits += plan.payloads[i]
    out = np.empty((count, n), np.uint8)
    iters = np.empty(count, np.int32)
    r_state = np.zeros((count, col_idx.size), np.float32)
    t0 = time.perf_counter()
    ldpc.decode_lanes_warm(row_ptr, col_idx, llr[:count], target[:count], params.max_iterations, params.alpha,
                           out, iters, r_state, ldpc.PHI_TABLE)
    lanes_t = time.perf_counter() - t0
    lanes_fails = int(sum(not np.array_equal(out[i], err[i]) for i in range(count)))
    return {"codewords": count, "failures": fails, "ours_failures": ours_fails,
            "bit_per_s": bits / theirs_t, "ours_same_codewords_bit_per_s": bits / ours_t,
            "speedup": theirs_t / ours_t, "ours_lanes_failures": lanes_fails,
            "ours_lanes_same_codewords_bit_per_s": bits / lanes_t, "speedup_lanes": theirs_t / lanes_t}


def _mean_and_stderr(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    spread = float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else None
    return float(np.mean(values)), spread


def _cascade_row(a, b, q, h) -> dict:
    """Cascade ("batched", the default schedule) on the same frame (h: the binary entropy of its error
    fraction): f counted as the key length counts it (everything disclosed, both directions), f of Alice's
    parities alone (the literature's figure), round trips, wall time, and whether an error was left."""
    nh = N * h
    t0 = time.perf_counter()
    _ra, rb = asyncio.run(_cascade(a, b, q))
    return {"f": rb.leaked_bits / nh, "f_parities": rb.parity_bits / nh, "round_trips": rb.round_trips,
            "wall": time.perf_counter() - t0, "residual": not np.array_equal(rb.key, a)}


def _one_qber(q: float) -> dict:
    fs, fsyn, cw_first, fr_first, rts, walls, decs, wrong, decs_m = [], [], [], [], [], [], [], [], []
    decs_l, decs_lm, cas = [], [], []
    final_fail = 0
    pkg = None
    for frame in range(FRAMES):
        seed = 1000 * frame + round(q * 1e4)
        a, b = _frame(q, seed)
        e = np.count_nonzero(a != b) / N
        h = ldpc.binary_entropy(e)
        cas.append(_cascade_row(a, b, q, h))
        t0 = time.perf_counter()
        try:
            _ra, rb = asyncio.run(_ldpc(a, b, q, seed))
        except ProtocolAbort:
            final_fail += 1
            continue
        walls.append(time.perf_counter() - t0)
        if not np.array_equal(rb.key, a):
            final_fail += 1
        fs.append(rb.leaked_bits / (N * h))
        fsyn.append(rb.syndrome_bits / (N * h))
        cw_first.append(rb.failed_first / rb.codewords)
        fr_first.append(rb.failed_first > 0)
        rts.append(rb.round_trips)
        wrong.append(rb.wrong_codewords)
        if frame >= TIMED_FRAMES:  # the decoders are timed on the first frames only
            continue
        decs.append(_decoder_rate(a, b, q, seed))
        decs_m.append(_decoder_rate(a, b, q, seed, mother=True))
        decs_l.append(_decoder_rate(a, b, q, seed, lanes=True))
        decs_lm.append(_decoder_rate(a, b, q, seed, mother=True, lanes=True))
        if pkg is None:
            pkg = _pkg(a, b, q, seed)
    code = ldpc.make_plan(N, q, ldpc.LdpcParams())
    f_mean, f_stderr = _mean_and_stderr(fs)
    cas_mean, cas_stderr = _mean_and_stderr([c["f"] for c in cas])
    return {
        "qber": q,
        "frames": FRAMES,
        "timed_frames": TIMED_FRAMES,
        "code_rate": code.rate,
        "codewords_per_frame": code.codewords,
        "codeword_bits": code.lift * ldpc.LdpcParams().code_n,
        "first_syndrome_bits_per_codeword": code.syndrome_bits,
        "mother_rows_merged": code.merged,
        "f": f_mean,
        "f_stderr": f_stderr,
        "f_max": float(np.max(fs)) if fs else None,
        "f_syndrome": float(np.mean(fsyn)) if fsyn else None,
        "codeword_fer_first": float(np.mean(cw_first)) if cw_first else None,
        "frame_fer_first": float(np.mean(fr_first)) if fr_first else None,
        "frame_fer_final": final_fail / FRAMES,
        "frame_fer_final_95_bound": (final_fail / FRAMES) if final_fail else 3 / FRAMES,
        "wrong_codewords_caught": int(np.sum(wrong)),
        "round_trips_mean": float(np.mean(rts)) if rts else None,
        "round_trips_max": int(np.max(rts)) if rts else None,
        "stage_seconds_mean": float(np.mean(walls)) if walls else None,
        "throughput_bit_per_s": N / float(np.mean(walls)) if walls else None,
        "decoder_bit_per_s": float(np.median(decs)) if decs else None,
        "decoder_mother_bit_per_s": float(np.median(decs_m)) if decs_m else None,
        "decoder_lanes_bit_per_s": float(np.median(decs_l)) if decs_l else None,
        "decoder_lanes_mother_bit_per_s": float(np.median(decs_lm)) if decs_lm else None,
        "decoder_target_bit_per_s": 30e6 if q == 0.03 else None,
        "ldpc_pkg": pkg,
        "cascade": {"f": cas_mean, "f_stderr": cas_stderr,
                    "f_parities": float(np.mean([c["f_parities"] for c in cas])),
                    "round_trips_mean": float(np.mean([c["round_trips"] for c in cas])),
                    "throughput_bit_per_s": N / float(np.mean([c["wall"] for c in cas])),
                    "residual_error_frames": sum(c["residual"] for c in cas)},
    }


def _latency() -> dict:
    q = 0.03
    a, b = _frame(q, 99)
    out = {"qber": q, "one_way_delay_s": DELAY_S}
    for name, fn in (("ldpc", lambda d: _ldpc(a, b, q, 5, d)), ("cascade", lambda d: _cascade(a, b, q, d))):
        times = {}
        for label, delay in (("zero_delay_s", 0.0), ("delayed_s", DELAY_S)):
            best = math.inf
            for _ in range(3):  # the best of three: the machine is shared
                t0 = time.perf_counter()
                _ra, rb = asyncio.run(fn(delay))
                best = min(best, time.perf_counter() - t0)
            times[label] = best
        times["round_trips"] = rb.round_trips
        times["ratio"] = times["delayed_s"] / times["zero_delay_s"]
        out[name] = times
    return out


def run() -> dict:
    ldpc.make_plan(N, 0.03, ldpc.LdpcParams())
    for r in ldpc_codes.RATES:  # build or load every code before timing anything
        ldpc_codes.get_code(r)
    return {"n": N, "code_n": ldpc.LdpcParams().code_n, "per_qber": [_one_qber(q) for q in QBERS],
            "latency": _latency()}


def _fer(frames: int) -> dict:
    """Only the per-QBER figures, over ``frames`` frames each (no ``ldpc`` package, no latency run)."""
    global FRAMES
    FRAMES = frames
    for r in ldpc_codes.RATES:
        ldpc_codes.get_code(r)
    out = []
    for q in QBERS:
        row = _one_qber_no_pkg(q)
        print(json.dumps(row), file=sys.stderr, flush=True)
        out.append(row)
    return {"n": N, "frames_per_qber": frames, "per_qber": out}


def _one_qber_no_pkg(q: float) -> dict:
    global _pkg
    saved, _pkg = _pkg, lambda *a: None
    try:
        return _one_qber(q)
    finally:
        _pkg = saved


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "fer":
        print(json.dumps(_fer(int(sys.argv[2])), indent=2))
    else:
        print(json.dumps(run(), indent=2))
