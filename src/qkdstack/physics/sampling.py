"""Event sampling: which pulses of a frame produce an event, and which outcome each has.

A frame of N pulses is N independent, identically distributed trials whose outcome
distribution is a finite table (:mod:`qkdstack.physics.optics`) in which most of the mass
sits on one outcome, "nothing happens" (probability 1 − p). Instead of N trials we sample
the *event process* directly:

1. The event positions form a Bernoulli(p) process over the pulse indices 0..N−1. Its
   gaps are i.i.d. geometric: gap = ⌊ln U / ln(1 − p)⌋ + 1 with U uniform on (0, 1], since
   P(gap > g) = P(U ≤ (1 − p)^g) = (1 − p)^g. Summing gaps gives the event indices already
   sorted and distinct; their number is Binomial(N, p) and, given that number, the set is
   a uniform subset of the frame — the same law as "draw the count, then distinct
   uniform indices", without a sort.
2. Each event's outcome is drawn independently from the conditional table P(row)/p with
   Walker's alias method (Vose's construction): one uniform gives a column and a threshold.

Both steps are exact; the cost is O(number of events), independent of N. Random words come
from SplitMix64 (Steele, Lea, Flood, OOPSLA 2014) in counter mode, keyed by 64 bits drawn
from the caller's seeded ``numpy.random.Generator``: the kernel is reproducible for a seed
and needs no per-event calls into NumPy (which cost 5–10 ns each here, against ~1.5 ns).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_TWO_M53 = 1.0 / 9007199254740992.0


@njit(inline="always", cache=True)
def splitmix64(counter: np.uint64) -> np.uint64:
    """The SplitMix64 output function applied to a counter value."""
    z = counter
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(inline="always", cache=True)
def uniform_open0(word: np.uint64) -> float:
    """A float uniform on (0, 1] from the top 53 bits of a word."""
    return float((word >> np.uint64(11)) + np.uint64(1)) * _TWO_M53


def new_key(rng: np.random.Generator) -> np.uint64:
    """A 64-bit stream key drawn from the seeded generator."""
    return np.uint64(rng.integers(0, 2**64, dtype=np.uint64))


def alias_table(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table (threshold, alias) for a probability vector (normalised here).

    Vose, IEEE Trans. Softw. Eng. 17(9), 972 (1991): column i keeps i with probability
    threshold[i] and otherwise gives alias[i]; each column has mass 1/size.
    """
    p = np.asarray(prob, dtype=np.float64)
    if p.size == 0:
        raise ValueError("alias table of an empty distribution")
    return _vose(p * (p.size / p.sum()))


@njit(cache=True, nogil=True)
def _vose(scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = scaled.size
    scaled = scaled.copy()
    threshold = np.ones(size)
    alias = np.arange(size).astype(np.int32)
    small = np.empty(size, np.int64)
    large = np.empty(size, np.int64)
    n_small = 0
    n_large = 0
    for i in range(size):
        if scaled[i] < 1.0:
            small[n_small] = i
            n_small += 1
        else:
            large[n_large] = i
            n_large += 1
    while n_small > 0 and n_large > 0:
        n_small -= 1
        s = small[n_small]
        n_large -= 1
        g = large[n_large]
        threshold[s] = scaled[s]
        alias[s] = g
        scaled[g] = scaled[g] + scaled[s] - 1.0
        if scaled[g] < 1.0:
            small[n_small] = g
            n_small += 1
        else:
            large[n_large] = g
            n_large += 1
    # Leftovers are 1 up to rounding: they keep their own column (threshold 1).
    return threshold, alias


@njit(inline="always", cache=True)
def alias_draw(word: np.uint64, threshold: np.ndarray, alias: np.ndarray) -> int:
    """One draw from an alias table using a single 64-bit word (column from its top bits, then a threshold).

    Branch-free select: the threshold comparison is unpredictable, and a mispredicted
    branch costs more than the arithmetic.
    """
    x = float(word >> np.uint64(11)) * _TWO_M53 * threshold.size
    col = min(int(x), threshold.size - 1)
    other = np.int64(alias[col])
    return other + (col - other) * np.int64(x - col < threshold[col])


GAP_TABLE_MAX = 16384
"""Largest gap covered by one draw from the gap table (192 KiB: stays in L2)."""


def gap_table(p: float) -> tuple[np.ndarray, np.ndarray, np.int64, float]:
    """Alias table for the geometric gap G ≥ 1 of a Bernoulli(p) process, folded at L.

    G − 1 = q·L + r with r ~ geometric truncated to [0, L) and q independent; by
    memorylessness P(G > L) = (1 − p)^L and then G − L is again geometric. Row r < L has
    probability p (1 − p)^r, row L ("overflow") (1 − p)^L; after an overflow the rest of
    the gap is drawn by inversion, ⌊ln U / ln(1 − p)⌋ + 1. One alias draw thus replaces
    the logarithm of the inversion method in all but a fraction (1 − p)^L of the gaps,
    exactly. Returns (threshold, alias, L, ln(1 − p)).
    """
    size = int(min(GAP_TABLE_MAX, max(64, math.ceil(40.0 / p)))) if p < 1 else 1
    r = np.arange(size, dtype=np.float64)
    log1m = math.log1p(-p) if p < 1 else -math.inf
    prob = np.empty(size + 1)
    prob[:size] = p * np.exp(r * log1m) if p < 1 else np.r_[1.0, np.zeros(size - 1)]
    prob[size] = math.exp(size * log1m) if p < 1 else 0.0
    threshold, alias = alias_table(prob)
    return threshold, alias, np.int64(size), log1m


@njit(inline="always", cache=True)
def gap_draw(
    ctr: np.uint64, threshold: np.ndarray, alias: np.ndarray, fold: np.int64, log1m: float
) -> tuple[np.uint64, np.int64]:
    """A geometric gap ≥ 1 from :func:`gap_table`; returns (advanced counter, gap)."""
    ctr += GOLDEN_GAMMA
    r = alias_draw(splitmix64(ctr), threshold, alias)
    if r < fold:
        return ctr, np.int64(r + 1)
    ctr += GOLDEN_GAMMA
    rest = math.floor(math.log(uniform_open0(splitmix64(ctr))) / log1m) + 1.0
    return ctr, fold + np.int64(min(rest, 4.0e18))


@njit(cache=True, nogil=True)
def _sample_events_kernel(
    n_pulses: np.int64,
    gap_threshold: np.ndarray,
    gap_alias: np.ndarray,
    gap_fold: np.int64,
    gap_log1m: float,
    key: np.uint64,
    threshold: np.ndarray,
    alias: np.ndarray,
    out_index: np.ndarray,
    out_row: np.ndarray,
    out_bits: np.ndarray,
) -> np.int64:
    """Fill event indices, table rows and two spare random bits per event; return the count or −1 if full."""
    cap = out_index.size
    ctr = key
    pos = np.int64(-1)
    count = np.int64(0)
    while True:
        ctr, gap = gap_draw(ctr, gap_threshold, gap_alias, gap_fold, gap_log1m)
        pos += gap
        if pos >= n_pulses:
            break
        if count >= cap:
            return np.int64(-1)
        ctr += GOLDEN_GAMMA
        w = splitmix64(ctr)
        out_index[count] = pos
        out_row[count] = alias_draw(w, threshold, alias)
        out_bits[count] = np.uint8(w & np.uint64(3))
        count += 1
    return count


def sample_events(
    n_pulses: int, prob: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample the events of ``n_pulses`` i.i.d. pulses whose per-pulse event rows have probabilities ``prob``.

    ``prob[r]`` is the probability that a pulse produces event row r; 1 − sum(prob) is the
    probability of no event. Returns (pulse indices int64 sorted, row ids int32, two random
    bits per event as uint8 in {0..3}).
    """
    prob = np.asarray(prob, dtype=np.float64)
    p_event = float(prob.sum())
    if n_pulses <= 0 or p_event <= 0 or prob.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.uint8)
    p_event = min(p_event, 1.0)
    threshold, alias = alias_table(prob)
    gap = gap_table(p_event)
    key = new_key(rng)
    mean = n_pulses * p_event
    cap = int(min(n_pulses, mean + 12 * math.sqrt(mean) + 1024))
    while True:
        out_index = np.empty(cap, np.int64)
        out_row = np.empty(cap, np.int32)
        out_bits = np.empty(cap, np.uint8)
        count = _sample_events_kernel(np.int64(n_pulses), *gap, key, threshold, alias, out_index, out_row, out_bits)
        if count >= 0:
            return out_index[:count], out_row[:count], out_bits[:count]
        cap = min(n_pulses, 2 * cap)  # astronomically rare: same key, so the same events come out


def sample_rows(prob: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` i.i.d. row ids from the (normalised) distribution ``prob``; for small materialisations."""
    if size == 0:
        return np.empty(0, np.int32)
    p = np.asarray(prob, dtype=np.float64)
    return rng.choice(p.size, size=size, p=p / p.sum()).astype(np.int32)


@njit(cache=True, nogil=True)
def _sample_detections_kernel(
    n_pulses: np.int64,
    gap_threshold: np.ndarray,
    gap_alias: np.ndarray,
    gap_fold: np.int64,
    gap_log1m: float,
    key: np.uint64,
    threshold: np.ndarray,
    alias: np.ndarray,
    row_k: np.ndarray,
    row_a: np.ndarray,
    row_beta: np.ndarray,
    row_n: np.ndarray,
    row_pattern: np.ndarray,
    row_ek: np.ndarray,
    out_index: np.ndarray,
    out_k: np.ndarray,
    out_a: np.ndarray,
    out_bit: np.ndarray,
    out_beta: np.ndarray,
    out_bob: np.ndarray,
    out_mask: np.ndarray,
    out_n: np.ndarray,
    out_ek: np.ndarray,
) -> np.int64:
    """Fused form of :func:`_sample_events_kernel` for event tables: writes every record column at once.

    Pattern 1 (R) clicks the detector of Alice's bit b, 2 (W) that of 1 − b, 3 both
    (Bob's bit then a fresh random bit: squashing). Returns the count, or −1 if full.
    """
    cap = out_index.size
    ctr = key
    pos = np.int64(-1)
    count = np.int64(0)
    while True:
        ctr, gap = gap_draw(ctr, gap_threshold, gap_alias, gap_fold, gap_log1m)
        pos += gap
        if pos >= n_pulses:
            break
        if count >= cap:
            return np.int64(-1)
        ctr += GOLDEN_GAMMA
        w = splitmix64(ctr)
        r = alias_draw(w, threshold, alias)
        b = np.uint8(w & np.uint64(1))
        pat = row_pattern[r]
        both = np.uint8(pat == 3)
        squash = np.uint8((w >> np.uint64(1)) & np.uint64(1))
        bob = ((b ^ np.uint8(pat == 2)) & np.uint8(1 - both)) | (squash & both)
        mask = (np.uint8(1) << bob) | (np.uint8(3) * both)
        out_index[count] = np.uint64(pos)
        out_k[count] = row_k[r]
        out_a[count] = row_a[r]
        out_bit[count] = b
        out_beta[count] = row_beta[r]
        out_bob[count] = bob
        out_mask[count] = mask
        out_n[count] = row_n[r]
        out_ek[count] = row_ek[r] != 0
        count += 1
    return count


class DetectionSampler:
    """Prepared tables (alias tables of the outcomes and of the gaps) for sampling frames of one event table.

    ``table`` has columns k, a, beta, n, pattern, ek, prob (see
    :class:`qkdstack.physics.optics.EventTable`); building the tables once per device keeps
    a frame's cost proportional to its detections.
    """

    NAMES = ("index", "k", "a", "bit", "beta", "bob", "mask", "n", "ek")
    DTYPES = (np.uint64, np.uint8, np.uint8, np.uint8, np.uint8, np.uint8, np.uint8, np.uint16, np.bool_)

    def __init__(self, table: object) -> None:
        prob = np.asarray(table.prob, dtype=np.float64)  # type: ignore[attr-defined]
        self.p_event = min(float(prob.sum()), 1.0)
        self._empty = prob.size == 0 or self.p_event <= 0
        if self._empty:
            return
        self._threshold, self._alias = alias_table(prob)
        self._gap = gap_table(self.p_event)
        rows = [np.ascontiguousarray(getattr(table, c)) for c in ("k", "a", "beta", "n", "pattern", "ek")]
        rows[3] = rows[3].astype(np.uint16)
        self._rows = rows

    def sample(self, n_pulses: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The primary clicks of ``n_pulses`` pulses, as record columns in pulse order.

        Columns: index (uint64), k, a, bit (Alice), beta, bob (Bob's bit if no dead time
        and no after-pulse acted), mask (detectors fired), n (uint16), ek (bool).
        """
        if n_pulses <= 0 or self._empty:
            return {nm: np.empty(0, dt) for nm, dt in zip(self.NAMES, self.DTYPES, strict=True)}
        key = new_key(rng)
        mean = n_pulses * self.p_event
        cap = int(min(n_pulses, mean + 12 * math.sqrt(mean) + 1024))
        while True:
            out = {nm: np.empty(cap, dt) for nm, dt in zip(self.NAMES, self.DTYPES, strict=True)}
            count = _sample_detections_kernel(
                np.int64(n_pulses),
                *self._gap,
                key,
                self._threshold,
                self._alias,
                *self._rows,
                *(out[nm] for nm in self.NAMES),
            )
            if count >= 0:
                return {nm: col[:count] for nm, col in out.items()}
            cap = min(n_pulses, 2 * cap)  # astronomically rare; same key, so the same events come out
