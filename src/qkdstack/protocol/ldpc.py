"""Syndrome-based LDPC reconciliation, rate-adapted by merging check rows, with blind rounds.

Roles and messages (all kinds start with ``"ldpc."``):

1. Both parties derive the same *plan* from public data: the key length N and the QBER
   estimate q (the test-basis QBER, floored). The codeword length is n = Z·``code_n``, the codes being
   Z-fold quasi-cyclic lifts of the PEG base codes (:func:`lift_for` picks Z from the frame size:
   longer codes, less shortening). The frame is cut into as few codewords as hold it,
   ⌈N/n⌉, of near-equal payload k; the n − k other positions of a codeword are *shortened*:
   fixed to 0 and known to both, never sent (Elkouss, Martinez-Mateo, Martin, QIC 11 (2011)).
   The first syndrome has exactly m₀ = ⌈f_start·h(q)·k⌉ bits per codeword: a *mother* code of the
   family (:mod:`qkdstack.protocol.ldpc_codes`) with m ≥ m₀ rows, m − m₀ of whose disjoint row pairs
   are merged (:func:`~qkdstack.protocol.ldpc_codes.merge_pairs`; the syndrome bit of a merged pair
   is the XOR of the two). The mother is the code with the fewest rows that leaves
   ``merge_headroom`` for the blind rounds with at most ``max_merged`` of its rows merged, else the
   code with the fewest rows ≥ m₀. If no code has m₀ rows, the frame is cut into more codewords.
2. ``ldpc.start`` (Alice → Bob): a public seed (which positions of each codeword carry key
   bits, and the blind rounds' extra checks), the code's name, the number of codewords and of merged
   pairs, and — disclosed — the m₀ syndrome bits of every codeword, then ``check_bits`` check
   parities of every codeword (dense random rows, half the payload each, from the public seed).
   Belief propagation can converge to a *wrong* codeword with the right syndrome; the check parities
   catch that (a wrong word passes all of them with probability 2^-check_bits) so Bob reports it as
   failed and the blind rounds go on, instead of the verification stage rejecting the whole frame.
3. Bob decodes each codeword with layered belief propagation (sum-product, or normalised min-sum)
   (:func:`~qkdstack.protocol.ldpc_decoder.decode_lanes_warm`, a Numba kernel, ``nogil``, 8 codewords
   at a time in SIMD lanes, each with the result of decoding it alone), looking for the error pattern
   e = x ⊕ y with syndrome H·x ⊕ H·y, and answers ``ldpc.status`` with one disclosed bit per
   codeword still open: 1 decoded (the syndrome and the check parities are satisfied), 0 failed.
4. Blind rounds (after Martinez-Mateo, Elkouss, Martin, "Blind reconciliation", QIC 12 (2012)):
   for every failed codeword, ``ldpc.reveal`` (Alice → Bob) discloses ⌈Δ·(1 + blind_growth·(r − 1))⌉
   bits in blind round r, Δ = ⌈blind_step·k·h(q)⌉: first her syndrome bits of merged pairs' first rows,
   the last merged first (un-merging them: the code moves back towards its mother, a full bit each,
   through the codes a larger f_start would have started from; :func:`_unmerge_order`), and once
   every pair is un-merged, the parities of sparse rows over the key positions (weight
   :func:`extension_weight`) drawn from the public seed. Bob rebuilds his checks and decodes again,
   *continuing* from the check messages of his last attempt (rows that did not change keep theirs;
   :func:`_carry`); ``ldpc.status`` again. f_start is below the codes' threshold on purpose: with
   small steps each codeword stops close to where it decodes. The original protocol converts
   punctured symbols into shortened ones; revealing *key* bits instead was tried and failed (a
   revealed key bit is worth only h(q) bits to a decoder that already knows it with error q). After
   ``max_blind_rounds`` a codeword that still fails gives up the whole frame: both parties raise
   :class:`~qkdstack.errors.ProtocolAbort` naming how many codewords failed.

Leakage: everything that crosses is ``disclosed`` and counted by the channel: the syndromes,
check parities, un-merged syndrome bits and extra parities (Alice → Bob) and Bob's status bits
(Bob → Alice; his success/failure is a function of the error pattern, so against general attacks it
counts too). λ_ldpc = m₀·(codewords) + check parities + blind-round bits + status bits. Bob's decoded
word satisfies the syndrome but may still differ from Alice's (a wrong codeword that passed the
check parities); the verification stage catches that, as after Cascade.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from qkdstack.bits import BitArray
from qkdstack.errors import ConfigError, ProtocolAbort
from qkdstack.protocol import ldpc_codes, public_random
from qkdstack.protocol.channel import RECEIVED, SENT, Channel
from qkdstack.protocol.ldpc_codes import LdpcCode
from qkdstack.protocol.ldpc_decoder import (  # noqa: F401  (decode_batch*: re-exported for callers)
    PHI_TABLE,
    STALL_ITERATIONS,
    decode_batch,
    decode_batch_warm,
    decode_lanes_warm,
)
from qkdstack.protocol.ldpc_repair import MAX_PATH, MAX_UNSATISFIED, repair_batch

__all__ = ["LdpcParams", "LdpcResult", "Plan", "alice", "bob", "decode_batch", "lift_for", "make_plan"]

STAGE = "ldpc"
KNOWN_LLR = np.float32(64.0)
"""|LLR| of a bit both parties know (a shortened position): large enough never to be a check's minimum."""
CHECK_BITS = 16
"""Default check parities per codeword (:attr:`LdpcParams.check_bits`)."""
LIFT_WEIGHT = 0.3
"""Efficiency cost of a short code against shortening in :func:`lift_for` (w + LIFT_WEIGHT/√Z)."""
LIFT_TOLERANCE = 0.02
""":func:`lift_for` takes the smallest Z whose score is within this of the lowest (shorter codewords decode faster)."""
_CHECK_ROUND = 1 << 20  # the check rows' stream of the public seed (blind rounds use 1, 2, ...)


def _check_rows(seed: int, plan: Plan, positions: np.ndarray, count: int) -> dict[int, np.ndarray]:
    """The check rows of each payload size: ``count`` dense rows of half the payload's positions."""
    return {k: _extension(seed, _CHECK_ROUND, k, count, max(1, k // 2), positions) for k in set(plan.payloads)}


def binary_entropy(q: float) -> float:
    if q <= 0.0 or q >= 1.0:
        return 0.0
    return -q * math.log2(q) - (1 - q) * math.log2(1 - q)


@dataclass(frozen=True)
class LdpcParams:
    """Public parameters of the LDPC stage (both parties must use the same)."""

    f_start: float = 1.05
    """Target efficiency of the first attempt: syndrome bits per key bit = f_start·h(q). Below the codes'
    threshold on purpose: the blind rounds add what a codeword needs, so f ends near the mean threshold.
    The mother code is chosen for this f_start (its rows and headroom), on every code."""
    f_start_by_rate: tuple[tuple[float, float], ...] = (
        (0.85, 1.08), (0.87, 1.09), (0.9, 1.09), (0.915, 1.09), (0.95, 1.13))
    """(mother-code rate, f) pairs: the first syndrome of a frame on that code has ⌈f·h(q)·k⌉ bits instead of
    ⌈f_start·h(q)·k⌉ (fewer rows merged; the code stays the one f_start chooses). For the high-rate codes,
    whose codewords decode far above f_start, so that first attempts that nearly always fail (each a
    round trip and a decoding that runs until it stalls) are skipped. Chosen on decode points
    (``scripts/ldpc_schedule.py measure``, 40 frames of 10⁵ bits per QBER, replayed with the blind steps
    below): start → mean f and round trips, against f_start 1.05: QBER 0.5 % (rate 0.95) 1.13 → 1.216 and
    5.7 (1.222, 9.0); 1 % (0.915) 1.09 → 1.144 and 4.4 (1.145, 6.3); 1.3 % (0.85, 39 % merged) 1.09 → 1.167
    and 5.3 (1.169, 7.1); 2 % (0.85) 1.09 → 1.110 and 2.5 (1.110, 4.9). At 3 % (0.8) a start of 1.07
    already costs 0.004 in f (a tenth of the frames decode at the first step from 1.05), so the codes of rate
    0.8 and below start at f_start. Since the rate-0.85 code has the simulated profile and QBER 1.25–1.75 % the
    rate-0.87 code (fourth session), replayed on 80 frames at 2 %: 0.85 at 1.08 → 1.0985 and 2.3 (1.1034,
    2.0 at 1.09; 1.0986, 3.0 at 1.07); the 0.87 code at 1.09 (1.6 %: 1.116, 3.0; 1.07: 1.115, 4.1)."""
    blind_step: float = 0.012
    """Blind round r reveals Δ·(1 + blind_growth·(r − 1)) more bits of every failed codeword,
    Δ = ⌈blind_step·k·h(q)⌉: small first steps (f ends close to where each codeword decodes), growing so
    that a bad codeword does not cost many round trips. Chosen on where codewords decode
    (``scripts/ldpc_schedule.py``: 60–80 frames of 10⁵ bits per QBER decoded in steps of 0.004, then
    schedules replayed on those decode points): 0.012 with growth 0.2 ends 0.004–0.012 lower in f than
    0.015 with 0.5 (the setting until 2026-12-04) at QBER 1–8 %, for 0.3–0.6 more round trips on average
    (1.7 at 1 %); confirmed on 300 frames per QBER (docs/ldpc.md)."""
    blind_growth: float = 0.2
    max_blind_rounds: int = 26
    """Round 26 has revealed 1.09·k·h(q) bits on top of the first syndrome, about the reach of the 16 rounds at
    0.015 and 0.5 before (1.14·k·h(q)); a codeword that still fails gives up its frame. Rare codewords need
    far more than the mean: one frame of 300 at QBER 8 % decoded at f = 1.58, after 17 blind rounds."""
    merge_headroom: float = 1.1
    """The mother code has at least merge_headroom × the first syndrome's rows when one does (with at most
    ``max_merged`` of its rows merged), so the first blind rounds un-merge rows (a full bit each, on the
    designed code) before extra parities are needed."""
    max_merged: float = 0.25
    """Measured (10⁵-bit frames, two or three per point): headroom 1.1 alone put QBER 3.1 % on the rate-0.75
    code with 27 % of its rows merged (f = 1.165) where the rate-0.8 code with 9 % gives 1.139; at 8 % the
    rate-0.55 code with 18 % merged (f = 1.093) beats the rate-0.6 code with 8 % and little headroom (1.106)."""
    check_bits: int = CHECK_BITS
    """Check parities per codeword: a decoded word that is not Alice's passes them with probability 2^-c."""
    code_n: int = ldpc_codes.DEFAULT_N
    """Length of the PEG base codes; a frame's codewords are lifts of them (``max_lift``)."""
    code_seed: int = ldpc_codes.DEFAULT_SEED
    max_lift: int = 8
    """Codewords are the Z-fold quasi-cyclic lifts (:func:`ldpc_codes.lift_code`) of the base codes, Z ≤
    max_lift chosen from the frame size (:func:`lift_for`): longer codes decode closer to capacity. 1 = the
    base codes only (the behaviour until 2026-12-04)."""
    max_iterations: int = 60
    alpha: float = 0.0
    """0: sum-product (the default; Gallager's phi form). > 0: normalised min-sum with check messages
    scaled by alpha (Chen & Fossorier 2002) — faster, but on these irregular codes far from capacity."""

    def public(self) -> dict[str, object]:
        return {"f_start": self.f_start, "blind_step": self.blind_step,
                "blind_growth": self.blind_growth, "max_blind_rounds": self.max_blind_rounds,
                "f_start_by_rate": [list(pair) for pair in self.f_start_by_rate],
                "merge_headroom": self.merge_headroom, "max_merged": self.max_merged, "check_bits": self.check_bits,
                "code_n": self.code_n, "code_seed": self.code_seed, "max_lift": self.max_lift,
                "max_iterations": self.max_iterations, "alpha": self.alpha}


@dataclass(frozen=True)
class Plan:
    """How a frame of ``n_key`` bits maps onto codewords of one mother code with ``merged`` row pairs merged."""

    rate: float
    n_key: int
    payloads: tuple[int, ...]
    step: int
    """Δ: blind round r reveals ⌈Δ·(1 + growth·(r − 1))⌉ bits per open codeword (un-merges first, then
    extra parities)."""
    growth: float
    merged: int
    """Row pairs of the mother code merged in the first syndrome (:func:`ldpc_codes.merge_pairs`)."""
    m: int
    """Rows of the mother code; the first syndrome has m − merged bits per codeword."""
    lift: int = 1
    """The mother code is the ``lift``-fold lift of the base code of ``rate`` (:func:`lift_for`)."""

    @property
    def codewords(self) -> int:
        return len(self.payloads)

    @property
    def syndrome_bits(self) -> int:
        """Syndrome bits of one codeword's first attempt."""
        return self.m - self.merged


def lift_for(n_key: int, params: LdpcParams) -> int:
    """The lift factor Z ≤ ``max_lift`` for a frame of ``n_key`` bits: with score(Z) = w + 0.3/√Z, w the fraction
    of shortened positions when the frame fills ⌈N/(Z·n)⌉ codewords of Z·n bits, the smallest Z whose score is
    within 0.02 of the lowest.

    Both terms cost efficiency: the gap to capacity of a finite code shrinks roughly like 1/√n (Polyanskiy,
    Poor, Verdú, IEEE Trans. IT 56(5), 2010), and a shortened code is not the one its degree distribution
    was optimised for. The weight 0.3 is fitted to our measurements (docs/ldpc.md, "Longer codes"): at QBER
    1 % n = 65536 unshortened gave f = 1.205, with 24 % shortened 1.276, n = 16384 unshortened 1.249; at 3 %
    n = 16384 and 114688 (Z = 7), both 13 % shortened, 1.14 and 1.10. The tolerance prefers the shorter
    codeword where the model sees little difference: on a 2.4·10⁶-bit frame at 1 % Z = 4 and Z = 8 both
    gave f = 1.207, the stage taking 4.0 s and 8.5 s (longer codewords leave the caches). A 10⁵-bit frame
    gets Z = 7 (one codeword), a 2.4·10⁶-bit frame Z = 4 (37 codewords); no Z beyond the first that holds
    the frame in one codeword.
    """
    n = params.code_n
    scores: dict[int, float] = {}
    for z in range(1, max(1, params.max_lift) + 1):
        count = -(-n_key // (z * n))
        scores[z] = 1.0 - n_key / (count * z * n) + LIFT_WEIGHT / math.sqrt(z)
        if count == 1:  # a longer codeword would only shorten more
            break
    best = min(scores.values())
    return min(z for z, score in scores.items() if score <= best + LIFT_TOLERANCE)


def _pairs_of(rate: float, lift: int, params: LdpcParams) -> np.ndarray:
    return ldpc_codes.merge_pairs(ldpc_codes.get_code(rate, params.code_n, params.code_seed, lift), params.code_seed)


def _unmerge_order(code: LdpcCode, plan: Plan, params: LdpcParams) -> np.ndarray:
    """The ``plan.merged`` merged row pairs in the order the blind rounds un-merge them: the last merged first.

    So the code after u un-merges is the one a plan with u fewer merged pairs starts from (nested, like
    rate-compatible codes), not a different subset of merged rows. Measured: un-merging from the first pair
    instead left one 10⁵-bit frame at QBER 8 % (one lifted codeword) failing up to f = 1.25, where a first
    syndrome of f = 1.09 decodes it; in this order it ends at f = 1.087 after two blind rounds.
    """
    return ldpc_codes.merge_pairs(code, params.code_seed)[: plan.merged][::-1]


def make_plan(n_key: int, qber: float, params: LdpcParams) -> Plan:
    """The mother code, the merged rows and the payload of every codeword for ``n_key`` key bits at QBER ``qber``.

    As few codewords as hold the frame (⌈N/n⌉, the rest of each codeword shortened); the first syndrome has
    ⌈f_start·h(q)·k⌉ bits, reached by merging row pairs of the mother code: the code of the family with the
    fewest rows that leaves ``merge_headroom`` for blind rounds with at most ``max_merged`` of its rows merged;
    else the fewest rows that leave the headroom with more merged; else the fewest rows that reach it at all.
    The middle step is new (2026-12-04): without it a frame whose first syndrome fell just below a code's rows
    (an unshortened frame at QBER 2 % on the rate-0.85 code) had no row to un-merge, and its blind rounds
    were all extra parities: f = 1.223 on eight 114688-bit frames, 1.133 from the rate-0.8 code with 26 %
    of its rows merged.
    """
    if n_key <= 0:
        raise ConfigError("the LDPC stage needs a non-empty key")
    h = binary_entropy(qber)
    if h <= 0.0:
        raise ConfigError("the LDPC stage needs a QBER estimate strictly between 0 and 1")
    lift = lift_for(n_key, params)
    n = params.code_n * lift
    need = params.f_start * h
    if need >= 1.0:
        raise ProtocolAbort(STAGE, f"QBER estimate {100 * qber:.2f}% is beyond the reach of syndrome "
                                   "reconciliation (the syndrome would be longer than the key)")
    by_rows = sorted((ldpc_codes.code_rows(r, params.code_n, lift), r) for r in ldpc_codes.RATES)
    count = -(-n_key // n)
    while True:
        k = -(-n_key // count)
        m0 = math.ceil(need * k)
        if m0 >= k:
            break
        choice = None
        for headroom, max_merged in ((params.merge_headroom, params.max_merged), (params.merge_headroom, 1.0),
                                     (1.0, 1.0)):
            for m, r in by_rows:
                if m < m0 * headroom or m - m0 > max_merged * m:
                    continue
                pairs = _pairs_of(r, lift, params)
                if m - m0 <= pairs.shape[0]:
                    choice = (r, m)
                    break
            if choice:
                break
        if choice is None and m0 < by_rows[0][0]:  # a very low QBER: the highest-rate code, merged all it can
            m, r = by_rows[0]
            pairs = _pairs_of(r, lift, params)
            choice, m0 = (r, m), m - pairs.shape[0]
        if choice:
            rate, m = choice
            first = dict(params.f_start_by_rate).get(rate, params.f_start)
            if first > params.f_start:  # a code that decodes far above f_start: skip the hopeless first attempts
                m0 = max(m0, min(m, math.ceil(first * h * k)))
            base, extra = divmod(n_key, count)
            payloads = tuple(base + (1 if i < extra else 0) for i in range(count))
            step = max(1, math.ceil(params.blind_step * k * h))
            return Plan(rate, n_key, payloads, step, params.blind_growth, m - m0, m, lift)
        count += 1  # the syndrome needs more rows than any code has: shorter payloads
    raise ProtocolAbort(STAGE, f"QBER estimate {100 * qber:.2f}% is beyond the reach of the LDPC codes")


@dataclass
class LdpcResult:
    """The outcome at one party (``key``: Bob's corrected bits, or Alice's unchanged bits)."""

    key: np.ndarray = field(repr=False)
    leaked_bits: int
    round_trips: int
    codewords: int
    code: str
    blind_rounds: int
    revealed_bits: int
    """Bits Alice disclosed in the blind rounds (un-merged syndrome bits and extra parities)."""
    syndrome_bits: int
    status_bits: int
    failed_first: int
    """Codewords that failed their first decoding (before any blind round)."""
    errors_corrected: int = 0
    iterations: int = 0
    check_bits: int = 0
    """Check parities Alice disclosed (``check_bits`` per codeword) so that Bob can tell a wrong codeword."""
    wrong_codewords: int = 0
    """Bob only: decodings that met the syndrome but failed the check parities (a wrong codeword caught)."""


# --------------------------------------------------------------------------------------------
# Numba kernels


@njit(cache=True, nogil=True)
def _carry(old_keys, old_ptr, old_r, old_rows, new_keys, new_ptr, offset, out):
    """Check messages of the rows a new check set shares with the old one (same key), 0 on new rows.

    ``out[i]`` is filled from ``old_r[old_rows[i]]`` (the codeword's messages in the last attempt's array,
    so the open codewords are not copied out of it first), codeword by codeword: both arrays are read and
    written in order. Keys: −(p + 1) for merged pair p, c for mother row c, m + x for extra row x;
    ``offset`` > every −key.
    """
    size = offset
    for k in old_keys:
        size = max(size, k + offset + 1)
    for k in new_keys:
        size = max(size, k + offset + 1)
    where = np.full(size, -1, np.int64)
    for r in range(old_keys.size):
        where[old_keys[r] + offset] = r
    source = np.empty(new_keys.size, np.int64)  # the old row of each new row, −1: new
    for r in range(new_keys.size):
        source[r] = where[new_keys[r] + offset]
    for i in range(out.shape[0]):
        src = old_r[old_rows[i]]
        dst = out[i]
        for r in range(new_keys.size):
            a, b = new_ptr[r], new_ptr[r + 1]
            o = source[r]
            if o >= 0:
                oa = old_ptr[o]
                for e in range(b - a):
                    dst[a + e] = src[oa + e]
            else:
                for e in range(a, b):
                    dst[e] = 0.0


@njit(cache=True, nogil=True)
def _syndromes(row_ptr, col_idx, words, out):
    for i in range(words.shape[0]):
        for c in range(row_ptr.size - 1):
            s = 0
            for e in range(row_ptr[c], row_ptr[c + 1]):
                s ^= words[i, col_idx[e]]
            out[i, c] = s


# --------------------------------------------------------------------------------------------
# Helpers shared by both parties


LOW_DEGREE_SHORTENING_RATE = 0.95
"""Codes of at least this rate shorten their lowest-degree variables first (:func:`_layout`)."""


def _layout(seed: int, code: LdpcCode) -> np.ndarray:
    """The codeword positions of the key bits: a public permutation of 0..n-1; the first k carry key bits, the
    other n − k are shortened.

    Seeded and random, except on the codes of rate ≥ :data:`LOW_DEGREE_SHORTENING_RATE` (0.95), whose
    positions go by decreasing variable degree (random within a degree), so that shortening takes the
    degree-2 variables first. Measured (10⁵-bit frames, one lifted codeword, 8 frames per point) on the
    measured rate-0.9 profile, which the 0.95 code still uses: f = 1.226 instead of 1.284 at QBER 0.5 %,
    1.191 instead of 1.238 at 1 %. On the redesigned rate-0.9 code (no degree-2 variables) random is better:
    1.171 against 1.187 at 1 % (16 frames, first redesign), so the rule stopped applying to it. On the
    rate-0.85 code the same ordering was no better at 1.5 % (1.167 / 1.166) and worse at 2 % (1.164 / 1.12,
    4 frames), on the 0.8 code at 3 % (1.166 / 1.10), hence random there. An empirical rule for these codes
    (the measured high-rate profiles, their degree-2 variables capped at m − 1, are the weak ones), not from
    the cited papers.
    """
    perm = np.random.default_rng(seed).permutation(code.n).astype(np.int64)
    if code.rate >= LOW_DEGREE_SHORTENING_RATE - 1e-9:
        deg = np.diff(code.var_ptr)
        perm = perm[np.argsort(-deg[perm], kind="stable")]
    return perm


def extension_weight(qber: float) -> int:
    """Row weight w of the blind rounds' extra parity checks: (1 − 2q)^w ≈ 1/2, clamped to [3, 64].

    A parity of w bits each wrong with probability q is itself wrong with probability
    (1 − (1 − 2q)^w)/2; at w ≈ ln 2 / −ln(1 − 2q) the check is neither nearly certain (wasted) nor
    nearly useless to belief propagation. A heuristic of ours, not from the cited papers.
    """
    q = min(max(qber, 1e-4), 0.25)
    return int(min(64, max(3, round(math.log(2) / -math.log(1 - 2 * q)))))


def _extension(seed: int, blind_round: int, k: int, count: int, weight: int, positions: np.ndarray):
    """Extra parity checks of one blind round for a payload of k bits, in CSR form over codeword positions.

    Each row: ``weight`` distinct key positions drawn from a generator keyed by (seed, round, k), so both
    parties derive the same rows from public data.
    """
    rng = np.random.default_rng([seed, blind_round, k])
    w = min(weight, k)
    n = positions.size
    cols = np.empty((count, w), dtype=np.int64)
    mask = np.zeros(n, dtype=bool) if w > n // 64 else None
    for r in range(count):
        chosen = positions[rng.choice(k, size=w, replace=False)]
        if mask is None:
            cols[r] = np.sort(chosen)
        else:  # dense rows (the check rows, half the payload): marking beats sorting, same result
            mask[:] = False
            mask[chosen] = True
            cols[r] = np.flatnonzero(mask)
    return cols


def _extended(row_ptr: np.ndarray, col_idx: np.ndarray, rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """H with the extra rows appended (CSR: row_ptr, col_idx)."""
    if not rows:
        return row_ptr, col_idx
    extra = np.concatenate(rows)
    lens = np.full(extra.shape[0], extra.shape[1], dtype=np.int64)
    row_ptr = np.concatenate([row_ptr, row_ptr[-1] + np.cumsum(lens)])
    col_idx = np.concatenate([col_idx, extra.ravel().astype(col_idx.dtype)])
    return row_ptr, col_idx


@dataclass(frozen=True)
class _State:
    """The checks of a codeword with row pairs ``pairs[j:t]`` of the mother code still merged.

    Rows of the CSR: the merged pairs first (c1 ∪ c2, in pair order), then every other mother row in
    increasing order (``singles``).
    """

    row_ptr: np.ndarray
    col_idx: np.ndarray
    c1: np.ndarray
    c2: np.ndarray
    singles: np.ndarray


def _state(code: LdpcCode, pairs: np.ndarray, t: int, j: int) -> _State:
    merged = pairs[j:t]
    c1, c2 = merged[:, 0], merged[:, 1]
    in_merged = np.zeros(code.m, dtype=bool)
    in_merged[merged.ravel()] = True
    singles = np.flatnonzero(~in_merged)
    seq = np.concatenate([merged.ravel(), singles])  # mother rows in CSR order (a pair's two rows adjacent)
    deg = np.diff(code.row_ptr)
    lens = deg[seq]
    starts = code.row_ptr[seq]
    total = int(lens.sum())
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])
    col_idx = code.col_idx[np.repeat(starts - first, lens) + np.arange(total)]
    row_lens = np.concatenate([deg[c1] + deg[c2], deg[singles]])
    row_ptr = np.zeros(row_lens.size + 1, dtype=np.int64)
    np.cumsum(row_lens, out=row_ptr[1:])
    return _State(row_ptr, col_idx, c1, c2, singles)


def _parities(words: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Parities of ``rows`` (count × w codeword positions) of each word: (words, count) uint8."""
    return np.bitwise_xor.reduce(words[:, rows], axis=2).astype(np.uint8)


def _words(key: np.ndarray, plan: Plan, positions: np.ndarray, n: int) -> np.ndarray:
    words = np.zeros((plan.codewords, n), dtype=np.uint8)
    off = 0
    for i, k in enumerate(plan.payloads):
        words[i, positions[:k]] = key[off : off + k]
        off += k
    return words


def _offsets(plan: Plan) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(plan.payloads)]).astype(np.int64)


def _check_key(key: np.ndarray) -> np.ndarray:
    arr = np.asarray(key)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError("key must be a non-empty one-dimensional array of bits")
    if arr.dtype.kind not in "biu" or int(arr.max(initial=0)) > 1 or int(arr.min(initial=0)) < 0:
        raise ConfigError("key must contain only the bits 0 and 1")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _snapshot(channel: Channel) -> tuple[int, int, int]:
    stats = channel.stats
    return stats.disclosed_bits(STAGE, SENT), stats.disclosed_bits(STAGE, RECEIVED), stats.messages(STAGE, SENT)


def _reveal_counts(plan: Plan, blind: int, unmerged: int) -> tuple[int, int]:
    """Blind round r reveals ⌈Δ·(1 + growth·(r − 1))⌉ bits per open codeword: (pairs to un-merge, extra parities)."""
    total = math.ceil(plan.step * (1.0 + plan.growth * (blind - 1)))
    unmerge = min(total, plan.merged - unmerged)
    return unmerge, total - unmerge


def _give_up(failed: int, plan: Plan, params: LdpcParams) -> ProtocolAbort:
    return ProtocolAbort(STAGE, f"{failed} of {plan.codewords} codewords failed to decode after "
                                f"{params.max_blind_rounds} blind rounds; the frame is given up")


DECODER_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Worker threads Bob decodes codewords on (the kernel releases the GIL)."""


async def _decode_threads(row_ptr, col_idx, llr: np.ndarray, target: np.ndarray, params: LdpcParams,
                          r_state: np.ndarray, no_repair: np.ndarray | None = None):
    """decode_lanes_warm over the rows of ``llr``, then :func:`~qkdstack.protocol.ldpc_repair.repair_batch`
    on the words it failed (not on the rows ``no_repair`` marks), split across up to :data:`DECODER_THREADS`
    worker threads in units of 4 codewords (the kernel's smallest block; a 4-lane block costs about 0.6 of an
    8-lane one): 7 codewords run as 4 + 3 on two threads, 3 on one, 16 as 8 + 8."""
    count, n = llr.shape
    err = np.empty((count, n), dtype=np.uint8)
    iters = np.empty(count, dtype=np.int32)
    skip = np.zeros(count, dtype=np.bool_) if no_repair is None else no_repair
    units = -(-count // 4)
    bounds = np.minimum(np.linspace(0, units, min(DECODER_THREADS, units) + 1).astype(int) * 4, count)
    await asyncio.gather(*(
        asyncio.to_thread(_decode_block, row_ptr, col_idx, llr[a:b], target[a:b], params, err[a:b], iters[a:b],
                          r_state[a:b], skip[a:b])
        for a, b in itertools.pairwise(bounds) if b > a
    ))
    return err, iters


def _decode_block(row_ptr, col_idx, llr, target, params: LdpcParams, err, iters, r_state, skip) -> None:
    # PHI_TABLE passed, not left to a default: a default array argument types as omitted(default=array),
    # which Numba's on-disk cache never matches in a new process (a recompilation and a new cache file each run)
    decode_lanes_warm(row_ptr, col_idx, llr, target, params.max_iterations, params.alpha, err, iters, r_state,
                      PHI_TABLE)
    repair_batch(row_ptr, col_idx, target, err, iters, skip, MAX_UNSATISFIED, MAX_PATH)


# --------------------------------------------------------------------------------------------
# The two parties


async def alice(
    channel: Channel, key: np.ndarray, qber_estimate: float, params: LdpcParams | None = None, *,
    seed: int | None = None,
) -> LdpcResult:
    """Alice's side: send the syndromes, then un-merged rows / extra parities of failed codewords until Bob
    decodes all."""
    params = params or LdpcParams()
    bits = _check_key(key)
    plan = make_plan(bits.size, qber_estimate, params)
    code = ldpc_codes.get_code(plan.rate, params.code_n, params.code_seed, plan.lift)
    pairs = _unmerge_order(code, plan, params)
    seed = public_random.randbits(63) if seed is None else seed
    positions = _layout(seed, code)
    weight = extension_weight(qber_estimate)
    snap0 = _snapshot(channel)
    words = _words(bits, plan, positions, code.n)
    full = np.empty((plan.codewords, code.m), dtype=np.uint8)
    _syndromes(code.row_ptr, code.col_idx, words, full)
    st = _state(code, pairs, plan.merged, 0)
    synd = np.concatenate([full[:, st.c1] ^ full[:, st.c2], full[:, st.singles]], axis=1)
    check_rows = _check_rows(seed, plan, positions, params.check_bits)
    checks = np.concatenate([_parities(words[i : i + 1], check_rows[k])[0] for i, k in enumerate(plan.payloads)])
    await channel.send("ldpc.start", disclosed=BitArray.from_bits(np.concatenate([synd.ravel(), checks])),
                       seed=seed, n_key=bits.size, code=code.name, codewords=plan.codewords, merged=plan.merged)
    open_ = np.arange(plan.codewords)
    extra = 0
    failed_first = 0
    blind = 0
    unmerged = 0
    while True:
        status = await channel.recv(expect="ldpc.status")
        if status.disclosed is None or len(status.disclosed) != open_.size:
            raise ProtocolAbort(STAGE, f"ldpc.status must carry {open_.size} status bits")
        ok = status.disclosed.to_bits().astype(bool)
        if blind == 0:
            failed_first = int(np.count_nonzero(~ok))
        open_ = open_[~ok]
        if open_.size == 0:
            break
        if blind >= params.max_blind_rounds:
            raise _give_up(open_.size, plan, params)
        blind += 1
        n_unmerge, n_extra = _reveal_counts(plan, blind, unmerged)
        c1 = pairs[unmerged : unmerged + n_unmerge, 0]
        unmerged += n_unmerge
        out = []
        for i in open_:
            out.append(full[i, c1])
            if n_extra:
                rows = _extension(seed, blind, plan.payloads[i], n_extra, weight, positions)
                out.append(_parities(words[i : i + 1], rows)[0])
        sent = np.concatenate(out)
        extra += sent.size
        await channel.send("ldpc.reveal", disclosed=BitArray.from_bits(sent), round=blind)
    sent_bits, received, round_trips = (b - a for a, b in zip(snap0, _snapshot(channel), strict=True))
    return LdpcResult(
        key=bits.copy(), leaked_bits=sent_bits + received, round_trips=round_trips, codewords=plan.codewords,
        code=code.name, blind_rounds=blind, revealed_bits=extra, syndrome_bits=int(synd.size),
        status_bits=received, failed_first=failed_first, check_bits=int(checks.size),
    )


async def bob(
    channel: Channel, key: np.ndarray, qber_estimate: float, params: LdpcParams | None = None,
) -> LdpcResult:
    """Bob's side: decode every codeword to Alice's word; report each outcome; take more bits on failure."""
    params = params or LdpcParams()
    bits = _check_key(key)
    plan = make_plan(bits.size, qber_estimate, params)
    code = ldpc_codes.get_code(plan.rate, params.code_n, params.code_seed, plan.lift)
    pairs = _unmerge_order(code, plan, params)
    snap0 = _snapshot(channel)
    start = await channel.recv(expect="ldpc.start")
    if int(start["n_key"]) != bits.size:
        raise ProtocolAbort(STAGE, f"key length mismatch: Alice has {int(start['n_key'])} bits, Bob {bits.size}")
    if (str(start["code"]) != code.name or int(start["codewords"]) != plan.codewords
            or int(start["merged"]) != plan.merged):
        raise ProtocolAbort(STAGE, f"code mismatch: Alice uses {start['code']} x {start['codewords']} "
                                   f"({start['merged']} merged), Bob {code.name} x {plan.codewords} ({plan.merged})")
    n_synd = plan.codewords * plan.syndrome_bits
    nchk = params.check_bits
    if start.disclosed is None or len(start.disclosed) != n_synd + plan.codewords * nchk:
        raise ProtocolAbort(STAGE, "ldpc.start carries the wrong number of syndrome and check bits")
    seed = int(start["seed"])
    positions = _layout(seed, code)
    weight = extension_weight(qber_estimate)
    words = _words(bits, plan, positions, code.n)
    disclosed = start.disclosed.to_bits()
    synd_a = disclosed[:n_synd].reshape(plan.codewords, plan.syndrome_bits)
    checks_a = disclosed[n_synd:].reshape(plan.codewords, nchk)
    check_rows = _check_rows(seed, plan, positions, nchk)
    t = plan.merged
    sb = np.empty((plan.codewords, code.m), dtype=np.uint8)
    _syndromes(code.row_ptr, code.col_idx, words, sb)
    st = _state(code, pairs, t, 0)
    sa_pair = synd_a[:, :t].copy()  # Alice's merged syndrome bits, pair by pair
    sa_row = np.zeros((plan.codewords, code.m), dtype=np.uint8)  # her single rows' bits, where known
    sa_row[:, st.singles] = synd_a[:, t:]
    q = min(max(qber_estimate, 1e-4), 0.5 - 1e-4)
    llr = np.full((plan.codewords, code.n), KNOWN_LLR, dtype=np.float32)
    channel_llr = np.float32(math.log((1 - q) / q))
    for i, k in enumerate(plan.payloads):
        llr[i, positions[:k]] = channel_llr
    offsets = _offsets(plan)
    err = np.zeros((plan.codewords, code.n), dtype=np.uint8)
    open_ = np.arange(plan.codewords)
    rows: dict[int, list[np.ndarray]] = {k: [] for k in set(plan.payloads)}  # extra rows so far, per payload
    extra_target: dict[int, list[np.ndarray]] = {int(i): [] for i in open_}
    extra = 0
    failed_first = 0
    blind = 0
    unmerged = 0
    total_iters = 0
    wrong = 0
    caught = np.zeros(plan.codewords, dtype=np.bool_)  # a wrong word was caught: no more repairs (see below)
    # Warm start: each open codeword's check messages from its last attempt, by row key (see _carry):
    # per payload size, the last attempt's row keys, row pointers, codewords and their messages.
    last: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    while True:
        st = _state(code, pairs, t, unmerged)
        state_keys = np.concatenate([-(np.arange(unmerged, t, dtype=np.int64) + 1), st.singles])
        p0 = st.c1.size
        base_tgt = np.empty((plan.codewords, st.row_ptr.size - 1), dtype=np.uint8)
        base_tgt[:, :p0] = sa_pair[:, unmerged:] ^ sb[:, st.c1] ^ sb[:, st.c2]
        base_tgt[:, p0:] = sa_row[:, st.singles] ^ sb[:, st.singles]
        ok = np.zeros(open_.size, dtype=bool)
        for k, k_rows in rows.items():
            members = np.nonzero(np.array([plan.payloads[i] == k for i in open_], dtype=bool))[0]
            if members.size == 0:
                continue
            idx = open_[members]
            row_ptr, col_idx = _extended(st.row_ptr, st.col_idx, k_rows)
            tgt = np.ascontiguousarray(np.concatenate(
                [base_tgt[idx], *([np.stack([np.concatenate(extra_target[int(i)]) for i in idx])]
                                  if k_rows else [])], axis=1))
            keys = np.concatenate([state_keys, code.m + np.arange(row_ptr.size - 1 - state_keys.size)])
            if k in last:  # the open codewords of this size are a subset of the last attempt's
                old_keys, old_ptr, old_idx, old_r = last[k]
                r_state = np.empty((idx.size, col_idx.size), dtype=np.float32)
                _carry(old_keys, old_ptr, old_r, np.searchsorted(old_idx, idx), keys, row_ptr, t + 1, r_state)
            else:
                r_state = np.zeros((idx.size, col_idx.size), dtype=np.float32)
            last[k] = (keys, row_ptr, idx, r_state)
            sub_err, sub_it = await _decode_threads(row_ptr, col_idx, np.ascontiguousarray(llr[idx]), tgt, params,
                                                    r_state, caught[idx])
            err[idx] = sub_err
            total_iters += int(np.abs(sub_it).sum())
            decoded = sub_it >= 0
            # a word with the right syndrome may still not be Alice's: her check parities tell
            mine = _parities(words[idx] ^ sub_err, check_rows[k])
            good = np.all(mine == checks_a[idx], axis=1)
            wrong += int(np.count_nonzero(decoded & ~good))
            # BP's warm start stays near a wrong word, and the repair would pick it again every round
            caught[idx[decoded & ~good]] = True
            ok[members] = decoded & good
        if blind == 0:
            failed_first = int(np.count_nonzero(~ok))
        await channel.send("ldpc.status", disclosed=BitArray.from_bits(ok.astype(np.uint8)))
        open_ = open_[~ok]
        if open_.size == 0:
            break
        if blind >= params.max_blind_rounds:
            raise _give_up(open_.size, plan, params)
        blind += 1
        msg = await channel.recv(expect="ldpc.reveal")
        n_unmerge, n_extra = _reveal_counts(plan, blind, unmerged)
        newly = np.arange(unmerged, unmerged + n_unmerge)
        unmerged += n_unmerge
        new_rows = {}
        if n_extra:
            for k in sorted({plan.payloads[i] for i in open_}):
                new_rows[k] = _extension(seed, blind, k, n_extra, weight, positions)
                rows[k].append(new_rows[k])
        per = n_unmerge + n_extra
        if msg.disclosed is None or len(msg.disclosed) != per * open_.size:
            raise ProtocolAbort(STAGE, "ldpc.reveal carries the wrong number of bits")
        values = msg.disclosed.to_bits().reshape(open_.size, per)
        c1, c2 = pairs[newly, 0], pairs[newly, 1]
        for row, i in enumerate(open_):
            got = values[row, :n_unmerge]
            sa_row[i, c1] = got
            sa_row[i, c2] = got ^ sa_pair[i, newly]
            if n_extra:
                r = new_rows[plan.payloads[i]]
                extra_target[int(i)].append(values[row, n_unmerge:] ^ _parities(words[i : i + 1], r)[0])
        extra += per * open_.size
    corrected = bits.copy()
    for i, k in enumerate(plan.payloads):
        corrected[offsets[i] : offsets[i] + k] ^= err[i, positions[:k]]
    sent, received, round_trips = (b - a for a, b in zip(snap0, _snapshot(channel), strict=True))
    return LdpcResult(
        key=corrected, leaked_bits=sent + received, round_trips=round_trips, codewords=plan.codewords,
        code=code.name, blind_rounds=blind, revealed_bits=extra, syndrome_bits=int(synd_a.size),
        status_bits=sent, failed_first=failed_first,
        errors_corrected=int(np.count_nonzero(corrected != bits)), iterations=total_iters,
        check_bits=int(checks_a.size), wrong_codewords=wrong,
    )
