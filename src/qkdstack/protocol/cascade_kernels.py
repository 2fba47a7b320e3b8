"""Compiled kernels for Cascade: keyed permutations and mask shuffles, prefix parities, Fenwick trees.

Cascade needs, for every pass, the key read in a shuffled order and the parities of many
ranges of that order. Materialising a fresh uniformly random permutation of 10^6 indices
costs ~70 ms with :meth:`numpy.random.Generator.permutation` (and as much again for its
inverse) — more than the whole time budget of a 20 Mbit/s Cascade — so the shuffles here
are *keyed pseudo-random permutations* evaluated per index in both directions:

    x ↦ A3 ∘ X2 ∘ A2 ∘ X1 ∘ A1 (x)   on [0, 2^m),  2^m ≥ n, with cycle walking into [0, n),

where ``A_i(x) = a_i x + b_i mod 2^m`` (``a_i`` odd) and ``X_i(x) = x ⊕ (x >> s_i)``. Both
layers are bijections of [0, 2^m), so the composition is one; restricting it to [0, n)
by cycle walking (apply again while the image is ≥ n) keeps it a bijection of [0, n).
The parameters ``a_i, b_i`` are drawn from a :class:`numpy.random.Generator` seeded with
the public seed Alice sent, so both parties derive the same permutation. The permutation
is public; its only job is to scatter positions that were neighbours in earlier passes,
and the multiply (carries move low bits up) followed by the xorshift (high bits down)
does that (the benchmarks measure the resulting efficiency and frame error rate).

Passes of two blocks use *mask shuffles* instead (:func:`make_mask_params`): a keyed
SplitMix64 bit per key index picks the members, read first in index order; the first
block's parity is then a popcount over the packed key.

Bob's key changes while the searches run, so per pass he keeps a plain copy of the
shuffled key (small blocks: a range parity is a contiguous XOR) or a Fenwick (binary
indexed) tree (large blocks: O(log n) per parity and per correction), built only once the
pass is busy; his whole local work between round trips is one call (:func:`resolve_searches`).
Alice's key never changes, so her range parities are two look-ups in a prefix XOR array
(busy passes) or read straight from the key (passes with few questions).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Layout of one pass's permutation parameters (uint64 array of length NPARAM).
P_MODE, P_N, P_MASK, P_A1, P_B1, P_A2, P_B2, P_A3, P_B3, P_S1, P_S2, P_IA1, P_IA2, P_IA3, P_IT1, P_IT2 = range(16)
NPARAM = 48
P_SRC = P_MASK
"""Tile shuffles (mode 3) keep the index of their source pass in the P_MASK slot."""
TILE_SIGMA, TILE_BASE = 16, 32
"""Tile shuffles: slots 16-31 hold the keyed permutation of the words, 32-47 the source pass's parameters."""
TILE = 4096
"""Bits per tile (64 words of 64 bits) of a tile shuffle."""


def make_permutation_params(rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw one keyed permutation of [0, n) from ``rng`` (the shared, seeded Generator)."""
    m = max(1, int(n - 1).bit_length()) if n > 1 else 1
    size = 1 << m
    words = rng.integers(0, size, size=6, dtype=np.uint64)
    a = [int(words[0]) | 1, int(words[2]) | 1, int(words[4]) | 1]
    b = [int(words[1]), int(words[3]), int(words[5])]
    s1 = max(1, (m + 1) // 2)
    s2 = max(1, m // 3 + 1)
    p = np.zeros(NPARAM, dtype=np.uint64)
    p[P_MODE] = 1
    p[P_N] = n
    p[P_MASK] = size - 1
    p[P_A1], p[P_B1], p[P_A2], p[P_B2], p[P_A3], p[P_B3] = a[0], b[0], a[1], b[1], a[2], b[2]
    p[P_S1], p[P_S2] = s1, s2
    p[P_IA1], p[P_IA2], p[P_IA3] = (pow(x, -1, size) for x in a)
    p[P_IT1] = -(-m // s1)
    p[P_IT2] = -(-m // s2)
    return p


def identity_params(n: int) -> np.ndarray:
    """Parameters of the identity permutation (pass 1 reads the key in order)."""
    p = np.zeros(NPARAM, dtype=np.uint64)
    p[P_N] = n
    return p


def make_mask_params(rng: np.random.Generator, n: int, cum: np.ndarray | None = None) -> np.ndarray:
    """Draw one "mask" shuffle of [0, n) from ``rng``, used for the passes of two blocks.

    A keyed pseudo-random mask (SplitMix64 of the word index, one bit per key index) splits
    the key into members and non-members, each bit independently with probability ½. The
    pass reads the members in index order, then the non-members. Its first block (the first
    ⌈n/2⌉ positions: the members, topped up or cut at the end in index order) has a parity
    that is a popcount over the packed key, 64 bits per operation, instead of a pass over
    shuffled positions; the split of any set of residual errors between the two blocks is
    as random as with a uniformly random permutation.
    """
    p = np.zeros(NPARAM, dtype=np.uint64)
    p[P_MODE] = 2
    p[P_N] = n
    p[P_A1] = rng.integers(0, 2**63, dtype=np.uint64) * np.uint64(2) + np.uint64(rng.integers(0, 2))
    p[P_B1] = mask_count(p) if cum is None else mask_cum(p, cum)
    return p


def make_tile_params(rng: np.random.Generator, src: np.ndarray, src_index: int) -> np.ndarray:
    """Draw a "tile" shuffle of [0, n) built on the keyed permutation ``src`` (pass ``src_index``).

    The pass reads the source pass's order through two cheap word-level steps: every tile of
    64 words (4096 bits) of the source row is transposed as a 64×64 bit matrix (bit c of word
    r ← bit r of word c), so bits that were close in the source order (one word apart at most
    for a block of ≤ 64 bits) land in different words; then the words of the whole tiles are
    placed by a keyed permutation σ of the words (the words after the last whole tile stay in
    place). Bob builds it from his source row with ~n/64 word operations instead of n
    scattered bit reads, and the words of one 4096-bit block come from 64 random tiles.
    """
    n = int(src[P_N])
    words = (n // TILE) * 64
    p = np.zeros(NPARAM, dtype=np.uint64)
    p[P_MODE] = 3
    p[P_N] = n
    p[P_SRC] = src_index
    p[TILE_SIGMA : TILE_SIGMA + 16] = make_permutation_params(rng, max(1, words))[:16]
    p[TILE_BASE : TILE_BASE + 16] = src[:16]
    return p


_GOLD = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@njit(cache=True, inline="always")
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


@njit(cache=True, inline="always")
def _valid_bits(n, w):
    """Bits of packed word ``w`` that hold key indices < n."""
    if (np.uint64(w) + np.uint64(1)) * np.uint64(64) <= n:
        return ~np.uint64(0)
    r = n - np.uint64(w) * np.uint64(64)
    return (np.uint64(1) << r) - np.uint64(1)


@njit(cache=True, inline="always")
def _mask_word(p, w, member):
    """Member bits (or, with ``member`` False, non-member bits) of key indices 64 w … 64 w + 63."""
    z = p[P_A1] + np.uint64(w) * _GOLD  # SplitMix64 of the word counter
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    if not member:
        z = ~z
    return z & _valid_bits(p[P_N], w)


@njit(cache=True, nogil=True)
def mask_count(p):
    """Number of members of a mask shuffle."""
    c = np.uint64(0)
    for w in range((p[P_N] + np.uint64(63)) >> np.uint64(6)):
        c += _popcount(_mask_word(p, w, True))
    return c


@njit(cache=True, nogil=True)
def _mask_fwd(i, p):
    """Key index at position ``i`` of a mask shuffle (select)."""
    c1 = np.int64(p[P_B1])
    member = i < c1
    r = np.uint64(i if member else i - c1)
    cnt = np.uint64(0)
    nw = (p[P_N] + np.uint64(63)) >> np.uint64(6)
    for w in range(nw):
        m = _mask_word(p, w, member)
        c = _popcount(m)
        if cnt + c > r:
            m2 = m
            for _ in range(r - cnt):
                m2 &= m2 - np.uint64(1)
            low = m2 & (~m2 + np.uint64(1))
            b = 0
            while (low >> np.uint64(b)) != np.uint64(1):
                b += 1
            return np.int64(w) * 64 + b
        cnt += c
    return np.int64(-1)


@njit(cache=True, nogil=True)
def _mask_inv(x, p):
    """Position of key index ``x`` in a mask shuffle (rank)."""
    w = x >> 6
    bit = np.uint64(x & 63)
    member = ((_mask_word(p, w, True) >> bit) & np.uint64(1)) == np.uint64(1)
    cnt = np.uint64(0)
    for v in range(w):
        cnt += _popcount(_mask_word(p, v, member))
    cnt += _popcount(_mask_word(p, w, member) & ((np.uint64(1) << bit) - np.uint64(1)))
    return np.int64(cnt) if member else np.int64(p[P_B1]) + np.int64(cnt)


@njit(cache=True, nogil=True)
def mask_cum(p, out):
    """out[w] = number of members in the words before ``w`` (w = 0 … ⌈n/64⌉); returns the total.

    With this table a mask shuffle's rank (key index → position) and select (position → key
    index) take a binary search and one word instead of a scan from the start of the key.
    """
    c = np.int64(0)
    nw = (np.int64(p[P_N]) + 63) >> 6
    out[0] = 0
    for w in range(nw):
        c += np.int64(_popcount(_mask_word(p, w, True)))
        out[w + 1] = c
    return c


@njit(cache=True, inline="always")
def _kind_before(cum, n, w, member):
    """Members (or non-members) among the key indices before word ``w``."""
    if member:
        return cum[w]
    return min(np.int64(w) * 64, n) - cum[w]


@njit(cache=True, inline="always")
def _nth_bit(m, r):
    """Index (0 … 63) of the ``r``-th (from 0) set bit of ``m``."""
    for _ in range(r):
        m &= m - np.uint64(1)
    b = 0
    while ((m >> np.uint64(b)) & np.uint64(1)) == np.uint64(0):
        b += 1
    return b


@njit(cache=True, nogil=True)
def _mask_select_kind(p, cum, r, member):
    """Key index of the ``r``-th member (or non-member) in index order (``r`` < their count)."""
    n = np.int64(p[P_N])
    lo, hi = 0, cum.size - 1  # the word w with before(w) <= r < before(w + 1)
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if _kind_before(cum, n, mid, member) <= r:
            lo = mid
        else:
            hi = mid
    m = _mask_word(p, lo, member)
    return np.int64(lo) * 64 + _nth_bit(m, r - _kind_before(cum, n, lo, member))


@njit(cache=True, inline="always")
def mask_select(p, cum, i):
    """Key index at position ``i`` of a mask shuffle, with its member-count table ``cum``."""
    c1 = np.int64(p[P_B1])
    if i < c1:
        return _mask_select_kind(p, cum, i, True)
    return _mask_select_kind(p, cum, i - c1, False)


@njit(cache=True, inline="always")
def mask_rank(p, cum, x):
    """Position of key index ``x`` in a mask shuffle, with its member-count table ``cum``."""
    w = x >> 6
    bit = np.uint64(x & 63)
    mw = _mask_word(p, w, True)
    below = (np.uint64(1) << bit) - np.uint64(1)
    if (mw >> bit) & np.uint64(1):
        return cum[w] + np.int64(_popcount(mw & below))
    nonm = ~mw & below
    return np.int64(p[P_B1]) + (np.int64(w) * 64 - cum[w]) + np.int64(_popcount(nonm))


@njit(cache=True, nogil=True)
def _mask_kind_parity(packed, p, cum, r0, r1, member):
    """Parity of the packed key over the members (or non-members) of ranks [r0, r1)."""
    if r1 <= r0:
        return np.uint8(0)
    n = np.int64(p[P_N])
    total = cum[cum.size - 1] if member else n - cum[cum.size - 1]
    x0 = _mask_select_kind(p, cum, r0, member)
    x1 = _mask_select_kind(p, cum, r1, member) if r1 < total else n
    w0, w1 = x0 >> 6, x1 >> 6
    lo = ~((np.uint64(1) << np.uint64(x0 & 63)) - np.uint64(1))
    acc = np.uint64(0)
    if w0 == w1:
        hi = (np.uint64(1) << np.uint64(x1 & 63)) - np.uint64(1)
        return np.uint8(_popcount(packed[w0] & _mask_word(p, w0, member) & lo & hi) & np.uint64(1))
    acc ^= packed[w0] & _mask_word(p, w0, member) & lo
    for w in range(w0 + 1, w1):
        acc ^= packed[w] & _mask_word(p, w, member)
    if (x1 & 63) != 0:
        hi = (np.uint64(1) << np.uint64(x1 & 63)) - np.uint64(1)
        acc ^= packed[w1] & _mask_word(p, w1, member) & hi
    return np.uint8(_popcount(acc) & np.uint64(1))


@njit(cache=True, nogil=True)
def mask_range_parity(packed, p, cum, a, b):
    """Parity of positions [a, b) of a mask shuffle, from the packed key: one XOR and AND per word spanned."""
    c1 = np.int64(p[P_B1])
    acc = np.uint8(0)
    if a < c1:
        acc ^= _mask_kind_parity(packed, p, cum, a, min(b, c1), True)
    if b > c1:
        acc ^= _mask_kind_parity(packed, p, cum, max(a, c1) - c1, b - c1, False)
    return acc


def pack_key(key: np.ndarray) -> np.ndarray:
    """The key as little-endian uint64 words: bit i of word w is key[64 w + i]."""
    raw = np.packbits(key, bitorder="little")
    pad = (-raw.size) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros(pad, np.uint8)])
    return raw.view("<u8").astype(np.uint64, copy=False)


@njit(cache=True, inline="always")
def _round_fwd(x, p):
    mask = p[P_MASK]
    x = (p[P_A1] * x + p[P_B1]) & mask
    x ^= x >> p[P_S1]
    x = (p[P_A2] * x + p[P_B2]) & mask
    x ^= x >> p[P_S2]
    x = (p[P_A3] * x + p[P_B3]) & mask
    return x


@njit(cache=True, inline="always")
def _unxorshift(y, s, iters):
    x = y
    for _ in range(np.int64(iters)):
        x = y ^ (x >> s)
    return x


@njit(cache=True, inline="always")
def _round_inv(y, p):
    mask = p[P_MASK]
    x = (p[P_IA3] * (y - p[P_B3])) & mask
    x = _unxorshift(x, p[P_S2], p[P_IT2])
    x = (p[P_IA2] * (x - p[P_B2])) & mask
    x = _unxorshift(x, p[P_S1], p[P_IT1])
    x = (p[P_IA1] * (x - p[P_B1])) & mask
    return x


@njit(cache=True, inline="always")
def _perm_fwd1(i, p):
    """Keyed permutation (mode 1) forward, cycle-walked into [0, n)."""
    n = p[P_N]
    x = _round_fwd(np.uint64(i), p)
    while x >= n:
        x = _round_fwd(x, p)
    return np.int64(x)


@njit(cache=True, inline="always")
def _perm_inv1(x, p):
    """Keyed permutation (mode 1) inverse, cycle-walked into [0, n)."""
    n = p[P_N]
    y = _round_inv(np.uint64(x), p)
    while y >= n:
        y = _round_inv(y, p)
    return np.int64(y)


@njit(cache=True, inline="always")
def _tile_fwd(i, p):
    """Source-order position read at position ``i`` of a tile shuffle."""
    words = (np.int64(p[P_N]) // TILE) * 64
    w = i >> 6
    if w >= words:
        return i
    u = _perm_fwd1(w, p[TILE_SIGMA : TILE_SIGMA + 16])
    return (((u >> 6) << 6) + (i & 63)) * 64 + (u & 63)


@njit(cache=True, inline="always")
def _tile_inv(y, p):
    """Position in a tile shuffle of source-order position ``y``."""
    words = (np.int64(p[P_N]) // TILE) * 64
    v = y >> 6
    if v >= words:
        return y
    u = ((v >> 6) << 6) + (y & 63)
    return _perm_inv1(u, p[TILE_SIGMA : TILE_SIGMA + 16]) * 64 + (v & 63)


@njit(cache=True, nogil=True)
def tile_words(src_row, p, out):
    """out = the packed row of tile shuffle ``p`` from the packed row of its source pass."""
    n = np.int64(p[P_N])
    nw = (n + 63) >> 6
    tiles = n // TILE
    sig = p[TILE_SIGMA : TILE_SIGMA + 16]
    a = np.empty(64, np.uint64)
    for t in range(tiles):
        for c in range(64):
            a[c] = src_row[t * 64 + c]
        _transpose64(a)
        for r in range(64):
            out[_perm_inv1(t * 64 + r, sig)] = a[r]
    for w in range(tiles * 64, nw):
        out[w] = src_row[w]


_TMASKS = np.array(
    [0x00000000FFFFFFFF, 0x0000FFFF0000FFFF, 0x00FF00FF00FF00FF, 0x0F0F0F0F0F0F0F0F, 0x3333333333333333,
     0x5555555555555555],
    dtype=np.uint64,
)  # fmt: skip


@njit(cache=True, inline="always")
def _transpose64(a):
    """Transpose a 64×64 bit matrix in place: afterwards bit c of a[r] is the old bit r of a[c]."""
    j = 32
    for level in range(6):
        m = _TMASKS[level]
        for k in range(64):
            if k & j == 0:
                t = ((a[k] >> np.uint64(j)) ^ a[k | j]) & m
                a[k] ^= t << np.uint64(j)
                a[k | j] ^= t
        j >>= 1


@njit(cache=True, inline="always")
def perm_fwd(i, p):
    """Original key index read at position ``i`` of the pass's shuffled order."""
    if p[P_MODE] == 0:
        return np.int64(i)
    if p[P_MODE] == 2:
        return _mask_fwd(i, p)
    if p[P_MODE] == 3:
        return _perm_fwd1(_tile_fwd(i, p), p[TILE_BASE : TILE_BASE + 16])
    return _perm_fwd1(i, p)


@njit(cache=True, inline="always")
def perm_inv(x, p):
    """Position of original index ``x`` in the pass's shuffled order."""
    if p[P_MODE] == 0:
        return np.int64(x)
    if p[P_MODE] == 2:
        return _mask_inv(x, p)
    if p[P_MODE] == 3:
        return _tile_inv(_perm_inv1(x, p[TILE_BASE : TILE_BASE + 16]), p)
    return _perm_inv1(x, p)


_CHUNK = 1024  # positions evaluated per vectorised batch


@njit(cache=True, nogil=True)
def _fill_positions(p, start, count, buf):
    """buf[i] = one round of the keyed map at start + i (no cycle walking), i < count.

    Written so that LLVM vectorises it: with 2^m ≤ 2^32 the arithmetic mod 2^m is done in
    uint32 lanes (the same values as the uint64 formula, since only the low m bits count).
    """
    if p[P_MASK] <= np.uint64(0xFFFFFFFF):
        mask = np.uint32(p[P_MASK])
        a1, b1 = np.uint32(p[P_A1] & np.uint64(0xFFFFFFFF)), np.uint32(p[P_B1] & np.uint64(0xFFFFFFFF))
        a2, b2 = np.uint32(p[P_A2] & np.uint64(0xFFFFFFFF)), np.uint32(p[P_B2] & np.uint64(0xFFFFFFFF))
        a3, b3 = np.uint32(p[P_A3] & np.uint64(0xFFFFFFFF)), np.uint32(p[P_B3] & np.uint64(0xFFFFFFFF))
        s1, s2 = np.uint32(p[P_S1]), np.uint32(p[P_S2])
        st = np.uint32(start)
        for i in range(count):
            x = st + np.uint32(i)
            x = (a1 * x + b1) & mask
            x ^= x >> s1
            x = (a2 * x + b2) & mask
            x ^= x >> s2
            x = (a3 * x + b3) & mask
            buf[i] = np.uint64(x)
    else:
        for i in range(count):
            buf[i] = _round_fwd(np.uint64(start + i), p)


@njit(cache=True, nogil=True)
def prefix_parity(key, p, out=None):
    """Prefix XOR of the key read in shuffled order: out[i] = key[π(0)] ⊕ … ⊕ key[π(i-1)]."""
    n = key.size
    if out is None:
        out = np.empty(n + 1, np.uint8)
    out[0] = 0
    acc = np.uint8(0)
    if p[P_MODE] == 0:
        for i in range(n):
            acc ^= key[i]
            out[i + 1] = acc
        return out
    if p[P_MODE] == 2:  # members in index order, then the others
        c1 = np.int64(p[P_B1])
        k1, k0 = 1, c1 + 1
        for w in range((n + 63) >> 6):
            m = _mask_word(p, w, True)
            for i in range(min(64, n - 64 * w)):
                if (m >> np.uint64(i)) & np.uint64(1):
                    out[k1] = key[64 * w + i]
                    k1 += 1
                else:
                    out[k0] = key[64 * w + i]
                    k0 += 1
        for i in range(1, n + 1):
            acc ^= out[i]
            out[i] = acc
        return out
    if p[P_MODE] == 3:
        for i in range(n):
            acc ^= key[perm_fwd(i, p)]
            out[i + 1] = acc
        return out
    nn = p[P_N]
    buf = np.empty(_CHUNK, np.uint64)
    for c0 in range(0, n, _CHUNK):
        cnt = min(_CHUNK, n - c0)
        _fill_positions(p, c0, cnt, buf)
        for i in range(cnt):
            x = buf[i]
            while x >= nn:  # cycle walking into [0, n): rare (2^m < 2n)
                x = _round_fwd(x, p)
            acc ^= key[x]
            out[c0 + i + 1] = acc
    return out


@njit(cache=True, nogil=True)
def shuffled_words(packed, p, out):
    """out = the key read in the pass's shuffled order, packed like :func:`pack_key`.

    ``packed`` is the packed key; bit i of ``out`` is key bit π(i). Positions come from the
    vectorised keyed map in batches of ``_CHUNK``; the gather reads the packed key (n/8 bytes,
    cache-resident) rather than one byte per bit.
    """
    n = np.int64(p[P_N])
    nw = (n + 63) >> 6
    if p[P_MODE] == 0:
        for w in range(nw):
            out[w] = packed[w]
        return
    if p[P_MASK] <= np.uint64(0xFFFFFFFF):  # uint32 lanes: twice as many per vector
        _shuffled_words(packed, p, out, np.empty(_CHUNK, np.uint32))
    else:
        _shuffled_words(packed, p, out, np.empty(_CHUNK, np.uint64))


@njit(cache=True, nogil=True)
def _round_again(p, vals, count):
    """vals[i] = one more round of the keyed map, i < count: cycle walking, vectorised like :func:`_fill_positions`."""
    if p[P_MASK] <= np.uint64(0xFFFFFFFF):
        mask = np.uint32(p[P_MASK])
        a1, b1 = np.uint32(p[P_A1] & np.uint64(0xFFFFFFFF)), np.uint32(p[P_B1] & np.uint64(0xFFFFFFFF))
        a2, b2 = np.uint32(p[P_A2] & np.uint64(0xFFFFFFFF)), np.uint32(p[P_B2] & np.uint64(0xFFFFFFFF))
        a3, b3 = np.uint32(p[P_A3] & np.uint64(0xFFFFFFFF)), np.uint32(p[P_B3] & np.uint64(0xFFFFFFFF))
        s1, s2 = np.uint32(p[P_S1]), np.uint32(p[P_S2])
        for i in range(count):
            x = np.uint32(vals[i])
            x = (a1 * x + b1) & mask
            x ^= x >> s1
            x = (a2 * x + b2) & mask
            x ^= x >> s2
            x = (a3 * x + b3) & mask
            vals[i] = x
    else:
        for i in range(count):
            vals[i] = _round_fwd(np.uint64(vals[i]), p)


@njit(cache=True, nogil=True)
def _shuffled_words(packed, p, out, buf):
    n = np.int64(p[P_N])
    nn = p[P_N]
    bitv = np.empty(_CHUNK, np.uint64)
    where = np.empty(_CHUNK, np.int64)
    walking = np.empty_like(buf)
    for c0 in range(0, n, _CHUNK):
        cnt = min(_CHUNK, n - c0)
        _fill_positions(p, c0, cnt, buf)
        # Cycle walking into [0, n): with 2^m < 2n up to half the images land >= n. Instead of a
        # data-dependent loop per position (a mispredicted branch each), gather the ones still
        # outside (branch-free), give them all one more vectorised round, and repeat.
        k = 0
        for i in range(cnt):
            where[k] = i
            walking[k] = buf[i]
            k += np.int64(np.uint64(buf[i]) >= nn)
        while k:
            _round_again(p, walking, k)
            still = 0
            for j in range(k):
                buf[where[j]] = walking[j]
                where[still] = where[j]
                walking[still] = walking[j]
                still += np.int64(np.uint64(walking[j]) >= nn)
            k = still
        for i in range(cnt):  # separate simple loops: the compiler vectorises them
            x = np.uint64(buf[i])
            bitv[i] = (packed[x >> np.uint64(6)] >> (x & np.uint64(63))) & np.uint64(1)
        for w0 in range(0, cnt, 64):
            word = np.uint64(0)
            for i in range(min(64, cnt - w0)):
                word |= bitv[w0 + i] << np.uint64(i)
            out[(c0 + w0) >> 6] = word


@njit(cache=True, inline="always")
def words_parity(row, a, b):
    """Parity of bits [a, b) of a packed row (a < b): one XOR per word spanned, one popcount."""
    w0, w1 = a >> 6, b >> 6
    lo = ~((np.uint64(1) << np.uint64(a & 63)) - np.uint64(1))
    if w0 == w1:
        acc = row[w0] & lo & ((np.uint64(1) << np.uint64(b & 63)) - np.uint64(1))
    else:
        acc = row[w0] & lo
        for w in range(w0 + 1, w1):
            acc ^= row[w]
        if (b & 63) != 0:
            acc ^= row[w1] & ((np.uint64(1) << np.uint64(b & 63)) - np.uint64(1))
    return np.uint8(_popcount(acc) & np.uint64(1))


@njit(cache=True, inline="always")
def range_parity(shuf, params, mcum, j, a, b):
    """Parity of positions [a, b) of pass j's shuffled order.

    ``shuf`` row 0 is the packed key (pass 1 reads it in order; mask shuffles read it through
    their member tables ``mcum``); the row of a keyed-permutation pass is the packed key in that
    pass's order (:func:`shuffled_words`).
    """
    mode = np.int64(params[j, P_MODE])
    if mode == 2:
        return mask_range_parity(shuf[0], params[j], mcum[j], a, b)
    if mode == 0:
        return words_parity(shuf[0], a, b)
    return words_parity(shuf[j], a, b)


@njit(cache=True, nogil=True)
def top_parities(shuf, params, mcum, j, k, count, out):
    """out[t] = parity of pass j's top-level block t (positions [t k, min((t+1) k, n))), t < count."""
    n = np.int64(params[j, P_N])
    for t in range(count):
        out[t] = range_parity(shuf, params, mcum, j, t * k, min((t + 1) * k, n))


@njit(cache=True, nogil=True)
def answer_questions(shuf, params, mcum, q, out):
    """Alice's answer to one ``cascade.ask``: the parity of every asked range, packed MSB first into ``out``.

    ``q`` holds one question per row: (pass, start, end) of a range of that pass's shuffled
    order, answered from ``shuf``/``mcum`` (:func:`range_parity`). Returns False, answering
    nothing, if any question lies outside the key.
    """
    npass = params.shape[0]
    n = np.int64(params[0, P_N])
    m = q.shape[0]
    for t in range(m):
        j, a, b = q[t, 0], q[t, 1], q[t, 2]
        if j < 0 or j >= npass or a < 0 or b > n or a >= b:
            return False
    for i in range(out.size):
        out[i] = 0
    for t in range(m):
        bit = range_parity(shuf, params, mcum, q[t, 0], q[t, 1], q[t, 2])
        out[t >> 3] |= np.uint8(bit << (7 - (t & 7)))
    return True


@njit(cache=True, inline="always")
def _node(s, e, level, index):
    """Range of node ``index`` (0 … 2^level − 1, left to right) at ``level`` below [s, e) in the binary search."""
    for k in range(level - 1, -1, -1):
        mid = s + (e - s) // 2
        if (index >> k) & 1:
            s = mid
        else:
            e = mid
    return s, e


@njit(cache=True, nogil=True)
def build_question(p, s, e, depth_max, depth, q):
    """Bob's ``cascade.ask``: one (pass, start, end) row per asked range; returns the rows used.

    Row t is the left half of open search t's range. A search may look ahead: with depth D
    (``depth[t]``, set here: the largest D ≤ ``depth_max`` with 2^D ≤ its range's length) it
    also asks the left half of every node of the next D − 1 levels of its search tree
    (2^D − 2 rows, breadth first, after the first m rows, in search order), so one round trip
    descends D levels for 2^D − 1 parities instead of D.
    """
    m = p.size
    k = m
    for t in range(m):
        mid = s[t] + (e[t] - s[t]) // 2
        q[t, 0], q[t, 1], q[t, 2] = p[t], s[t], mid
        dd = 1
        while dd < depth_max and e[t] - s[t] >= (np.int64(1) << (dd + 1)):
            dd += 1
        depth[t] = dd
    for t in range(m):
        for level in range(1, depth[t]):
            for i in range(1 << level):
                a, b = _node(s[t], e[t], level, i)
                q[k, 0], q[k, 1], q[k, 2] = p[t], a, a + (b - a) // 2
                k += 1
    return k


@njit(cache=True, inline="always")
def _packed_bit(packed, t):
    """Bit ``t`` of an MSB-first packed bit string (``numpy.packbits`` order)."""
    return (packed[t >> 3] >> (7 - (t & 7))) & np.uint8(1)


@njit(cache=True, nogil=True)
def originals(params, passes, positions):
    """Original key indices of shuffled ``positions`` in the given passes."""
    out = np.empty(positions.size, np.int64)
    for t in range(positions.size):
        out[t] = perm_fwd(positions[t], params[passes[t]])
    return out


@njit(cache=True, nogil=True)
def apply_corrections(xs, shuf, params, mcum, active, block_size, mism, mism_off):
    """Flip Bob's bits ``xs`` (distinct original indices) and update every active pass.

    Each flip toggles the bit in the packed key (row 0 of ``shuf``) and, for each pass <
    ``active`` with its own row (keyed permutations), at the bit's shuffled position there, and
    toggles the parity mismatch of the top-level block that holds it. Returns the flat indices
    of the top-level blocks touched (candidates for new searches).
    """
    touched = np.empty(xs.size * active, np.int64)
    for t in range(xs.size):
        x = xs[t]
        shuf[0, x >> 6] ^= np.uint64(1) << np.uint64(x & 63)
        for j in range(active):
            mode = params[j, P_MODE]
            if mode == 0:
                pos = x
            elif mode == 2:
                pos = mask_rank(params[j], mcum[j], x)
            else:  # keyed permutation or tile shuffle: its own row
                pos = perm_inv(x, params[j])
                shuf[j, pos >> 6] ^= np.uint64(1) << np.uint64(pos & 63)
            blk = mism_off[j] + pos // block_size[j]
            mism[blk] ^= 1
            touched[t * active + j] = blk
    return touched


@njit(cache=True, nogil=True)
def free_descent(shuf, params, mcum, p, s, e, a, d, bits, leaf, rbits, on):
    """Walk each search down the recorded path of its block while that path's parities are known.

    Row by row (searches are independent while no bit flips): at each level the child on the
    recorded path has Alice's parity from ``rbits``; if Bob's parity of it differs, the search
    follows the path, otherwise it steps to the sibling (parity by difference) and leaves it.
    """
    for t in range(p.size):
        j = p[t]
        while on[t] and e[t] - s[t] > 1:
            mid = s[t] + (e[t] - s[t]) // 2
            left = leaf[t] < mid
            cs = s[t] if left else mid
            ce = mid if left else e[t]
            d1 = d[t] + 1
            pa = np.uint8((rbits[t] >> np.uint64(d1)) & np.uint64(1))
            pb = range_parity(shuf, params, mcum, j, cs, ce)
            follow = (pa ^ pb) == 1
            if follow:
                s[t], e[t], a[t] = cs, ce, pa
            else:
                if left:
                    s[t] = mid
                else:
                    e[t] = mid
                a[t] = a[t] ^ pa
            d[t] = d1
            bits[t] |= np.uint64(a[t]) << np.uint64(d1)
            on[t] = follow


@njit(cache=True, nogil=True)
def apply_answers(shuf, params, mcum, p, s, e, a, d, bits, depth, answers):
    """Descend every search ``depth[t]`` levels with Alice's parities (``answers``: packed, MSB first).

    Answer t is Alice's parity of the left half of search t's range; a search with depth D
    finds the left-half parity of the node it reaches at level l ≥ 1 among its 2^D − 2 extra
    answers (layout of :func:`build_question`). Bob's parity of the left half decides the
    side: the disagreement is odd in exactly one half, and Alice's right-half parity is her
    parent parity XOR the left one.
    """
    m = p.size
    k = m
    for t in range(m):
        j, st, en, at, dt, bt = p[t], s[t], e[t], a[t], d[t], bits[t]
        mid = st + (en - st) // 2
        al = _packed_bit(answers, t)
        node = 0
        if (al ^ range_parity(shuf, params, mcum, j, st, mid)) == 1:
            en = mid
            at = al
        else:
            st = mid
            at ^= al
            node = 1
        dt += 1
        bt |= np.uint64(at) << np.uint64(dt)
        dep = np.int64(depth[t])
        for level in range(1, dep):
            mid = st + (en - st) // 2
            al = _packed_bit(answers, k + (1 << level) - 2 + node)
            if (al ^ range_parity(shuf, params, mcum, j, st, mid)) == 1:
                en = mid
                at = al
                node = 2 * node
            else:
                st = mid
                at ^= al
                node = 2 * node + 1
            dt += 1
            bt |= np.uint64(at) << np.uint64(dt)
        if dep > 1:
            k += (1 << dep) - 2
        s[t], e[t], a[t], d[t], bits[t] = st, en, at, dt, bt


@njit(cache=True, nogil=True)
def resolve_searches(
    shuf,
    params,
    mcum,
    sizes,
    mism,
    mism_off,
    busy,
    rec_leaf,
    rec_bits,
    alice_flat,
    active,
    rows_p,
    rows_b,
    rows_s,
    rows_e,
    rows_a,
    rows_d,
    rows_bits,
    rows_leaf,
    rows_rbits,
    rows_on,
    m,
    cand,
    flag,
    dirty,
    pend,
    xs,
    dlist,
    mark,
):
    """Bob's local work between two round trips, compiled (rows [0, m) are the open searches).

    Repeats until every open search needs a parity from Alice: drop searches whose range
    no longer disagrees oddly with Alice's known parity (only searches in blocks a flip
    touched are re-checked; their block becomes a candidate),
    walk the recorded paths for free, flip the bits where searches ended (updating every
    active pass and making the touched blocks candidates), and open a search on every odd
    candidate block without one. Returns (open searches, bits flipped).

    ``flag``, ``dirty`` (uint8, zero on entry and on return), ``pend``, ``xs``, ``dlist`` (int64)
    are scratch arrays of one entry per top-level block, ``mark`` (uint8, zero) one entry per
    key bit, kept by the caller across calls.
    """
    n = np.int64(params[0, P_N])
    npend = 0
    for t in range(cand.size):
        f = cand[t]
        if flag[f] == 0:
            flag[f] = 1
            pend[npend] = f
            npend += 1
    flipped = 0
    # Rows are consistent on entry (just answered, or none open): only flips can break them.
    ndirty = 0
    lo = 0  # rows [lo, m) are new or just answered: only they can descend for free or be finished
    while True:
        # 1. re-check the open searches whose block a flip touched since their last check (a
        #    search's range lies in its block, so no other search's disagreement can change)
        w = 0
        new_lo = -1
        for t in range(m if ndirty else 0):
            if t == lo:
                new_lo = w
            j = rows_p[t]
            f = mism_off[j] + rows_b[t]
            if dirty[f] == 0 or (range_parity(shuf, params, mcum, j, rows_s[t], rows_e[t]) ^ rows_a[t]) == 1:
                if w != t:
                    rows_p[w], rows_b[w], rows_s[w], rows_e[w] = rows_p[t], rows_b[t], rows_s[t], rows_e[t]
                    rows_a[w], rows_d[w], rows_bits[w] = rows_a[t], rows_d[t], rows_bits[t]
                    rows_leaf[w], rows_rbits[w], rows_on[w] = rows_leaf[t], rows_rbits[t], rows_on[t]
                w += 1
            else:
                busy[f] = 0
                if flag[f] == 0:
                    flag[f] = 1
                    pend[npend] = f
                    npend += 1
        if ndirty:
            lo = new_lo if new_lo >= 0 else w
            m = w
            for t in range(ndirty):
                dirty[dlist[t]] = 0
            ndirty = 0
        # 2. free descent along recorded paths
        free_descent(
            shuf,
            params,
            mcum,
            rows_p[lo:m],
            rows_s[lo:m],
            rows_e[lo:m],
            rows_a[lo:m],
            rows_d[lo:m],
            rows_bits[lo:m],
            rows_leaf[lo:m],
            rows_rbits[lo:m],
            rows_on[lo:m],
        )
        # 3. searches that reached one bit
        nx = 0
        w = lo
        for t in range(lo, m):
            if rows_e[t] - rows_s[t] == 1:
                f = mism_off[rows_p[t]] + rows_b[t]
                rec_leaf[f] = rows_s[t]
                rec_bits[f] = rows_bits[t]
                busy[f] = 0
                j = rows_p[t]
                if params[j, P_MODE] == 2:
                    xs[nx] = mask_select(params[j], mcum[j], rows_s[t])
                else:
                    xs[nx] = perm_fwd(rows_s[t], params[j])
                nx += 1
            else:
                if w != t:
                    rows_p[w], rows_b[w], rows_s[w], rows_e[w] = rows_p[t], rows_b[t], rows_s[t], rows_e[t]
                    rows_a[w], rows_d[w], rows_bits[w] = rows_a[t], rows_d[t], rows_bits[t]
                    rows_leaf[w], rows_rbits[w], rows_on[w] = rows_leaf[t], rows_rbits[t], rows_on[t]
                w += 1
        m = w
        lo = m
        if nx:
            # two searches (different passes) may end on the same bit: flip it once
            nu = 0
            for t in range(nx):
                x = xs[t]
                if mark[x] == 0:
                    mark[x] = 1
                    xs[nu] = x
                    nu += 1
            ux = xs[:nu]
            for t in range(nu):
                mark[ux[t]] = 0
            touched = apply_corrections(ux, shuf, params, mcum, active, sizes, mism, mism_off)
            flipped += ux.size
            for t in range(touched.size):
                f = touched[t]
                if dirty[f] == 0:
                    dirty[f] = 1
                    dlist[ndirty] = f
                    ndirty += 1
                if flag[f] == 0:
                    flag[f] = 1
                    pend[npend] = f
                    npend += 1
            continue
        # 4. open a search on every odd candidate block without one
        if npend == 0:
            return m, flipped
        if npend * 8 > flag.size:  # many (a pass just started): collect them in order from the flags
            c = 0
            for f in range(flag.size):
                if flag[f]:
                    flag[f] = 0
                    pend[c] = f
                    c += 1
            odd = pend[:c]
        else:
            odd = np.sort(pend[:npend])
            for t in range(npend):
                flag[pend[t]] = 0
        npend = 0
        first = m
        for t in range(odd.size):
            f = odd[t]
            if mism[f] == 1 and busy[f] == 0:
                busy[f] = 1
                j = np.searchsorted(mism_off, f, side="right") - 1
                b = f - mism_off[j]
                rows_p[m], rows_b[m] = j, b
                rows_s[m] = b * sizes[j]
                rows_e[m] = min(rows_s[m] + sizes[j], n)
                rows_a[m] = alice_flat[f]
                rows_d[m] = 0
                rows_bits[m] = np.uint64(alice_flat[f])
                rows_leaf[m] = rec_leaf[f]
                rows_rbits[m] = rec_bits[f]
                rows_on[m] = rec_leaf[f] >= 0
                m += 1
        if m == first:
            return m, flipped
