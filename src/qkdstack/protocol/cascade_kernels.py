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
NPARAM = 16


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


@njit(cache=True)
def mask_count(p):
    """Number of members of a mask shuffle."""
    c = np.uint64(0)
    for w in range((p[P_N] + np.uint64(63)) >> np.uint64(6)):
        c += _popcount(_mask_word(p, w, True))
    return c


@njit(cache=True, inline="always")
def _first_bits(m, r):
    """The lowest ``r`` set bits of ``m``."""
    keep = np.uint64(0)
    for _ in range(r):
        low = m & (~m + np.uint64(1))
        keep |= low
        m ^= low
    return keep


@njit(cache=True)
def _mask_select_parity(packed, p, y, member):
    """Parity of the packed key over the first ``y`` members (or non-members) in index order."""
    acc = np.uint64(0)
    cnt = np.uint64(0)
    y = np.uint64(y)
    if y == 0:
        return np.uint8(0)
    for w in range(packed.size):
        m = _mask_word(p, w, member)
        c = _popcount(m)
        if cnt + c < y:
            acc ^= _popcount(packed[w] & m)
            cnt += c
        else:
            acc ^= _popcount(packed[w] & _first_bits(m, np.int64(y - cnt)))
            break
    return np.uint8(acc & np.uint64(1))


@njit(cache=True)
def mask_prefix_parity(packed, p, y):
    """Parity of positions [0, y) of a mask shuffle, from the packed key (64 bits per step)."""
    c1 = np.int64(p[P_B1])
    if y <= c1:
        return _mask_select_parity(packed, p, y, True)
    return _mask_select_parity(packed, p, c1, True) ^ _mask_select_parity(packed, p, y - c1, False)


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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
def perm_fwd(i, p):
    """Original key index read at position ``i`` of the pass's shuffled order."""
    if p[P_MODE] == 0:
        return np.int64(i)
    if p[P_MODE] == 2:
        return _mask_fwd(i, p)
    n = p[P_N]
    x = _round_fwd(np.uint64(i), p)
    while x >= n:
        x = _round_fwd(x, p)
    return np.int64(x)


@njit(cache=True, inline="always")
def perm_inv(x, p):
    """Position of original index ``x`` in the pass's shuffled order."""
    if p[P_MODE] == 0:
        return np.int64(x)
    if p[P_MODE] == 2:
        return _mask_inv(x, p)
    n = p[P_N]
    y = _round_inv(np.uint64(x), p)
    while y >= n:
        y = _round_inv(y, p)
    return np.int64(y)


_CHUNK = 1024  # positions evaluated per vectorised batch


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
def shuffled_key(key, p, out):
    """out[i] = key[π(i)]: the key in the pass's shuffled order."""
    n = key.size
    if p[P_MODE] != 1:
        pre = prefix_parity(key, p)
        for i in range(n):
            out[i] = pre[i + 1] ^ pre[i]
        return
    nn = p[P_N]
    buf = np.empty(_CHUNK, np.uint64)
    for c0 in range(0, n, _CHUNK):
        cnt = min(_CHUNK, n - c0)
        _fill_positions(p, c0, cnt, buf)
        for i in range(cnt):
            x = buf[i]
            while x >= nn:
                x = _round_fwd(x, p)
            out[c0 + i] = key[x]


@njit(cache=True)
def perm_range_parity(key, p, start, end):
    """Parity of positions [start, end) of the key read in shuffled order (no prefix array)."""
    acc = np.uint8(0)
    if p[P_MODE] == 2:
        pre = prefix_parity(key, p)
        return pre[end] ^ pre[start]
    if p[P_MODE] == 0:
        for i in range(start, end):
            acc ^= key[i]
        return acc
    nn = p[P_N]
    buf = np.empty(_CHUNK, np.uint64)
    for c0 in range(start, end, _CHUNK):
        cnt = min(_CHUNK, end - c0)
        _fill_positions(p, c0, cnt, buf)
        for i in range(cnt):
            x = buf[i]
            while x >= nn:
                x = _round_fwd(x, p)
            acc ^= key[x]
    return acc


@njit(cache=True)
def block_parities(key, p, k, count, out):
    """out[t] = parity of shuffled positions [t k, min((t+1) k, n)) for t < count, without a prefix array."""
    n = key.size
    if p[P_MODE] == 2:
        pre = prefix_parity(key, p)
        for t in range(count):
            out[t] = pre[min((t + 1) * k, n)] ^ pre[t * k]
        return
    end = min(count * k, n)
    for t in range(count):
        out[t] = 0
    nn = p[P_N]
    ident = p[P_MODE] == 0
    buf = np.empty(_CHUNK, np.uint64)
    blk = 0
    left = k  # positions still to read in block ``blk``
    acc = np.uint8(0)
    for c0 in range(0, end, _CHUNK):
        cnt = min(_CHUNK, end - c0)
        if ident:
            for i in range(cnt):
                buf[i] = c0 + i
        else:
            _fill_positions(p, c0, cnt, buf)
        for i in range(cnt):
            x = buf[i]
            while x >= nn:
                x = _round_fwd(x, p)
            acc ^= key[x]
            left -= 1
            if left == 0:
                out[blk] = acc
                acc = np.uint8(0)
                blk += 1
                left = k
    if blk < count and left != k:
        out[blk] = acc


@njit(cache=True)
def direct_parity(key, p, start, end):
    """Parity of shuffled positions [start, end) read straight from ``key`` (short ranges: scalar loop)."""
    if end - start >= 256 or p[P_MODE] == 2:
        return perm_range_parity(key, p, start, end)
    acc = np.uint8(0)
    for i in range(start, end):
        acc ^= key[perm_fwd(i, p)]
    return acc


@njit(cache=True)
def answer_questions(prefixes, built, direct, key, packed, mcum, params, q, out):
    """Alice's answer to one ``cascade.ask``: the parity of every asked range, packed MSB first into ``out``.

    ``q`` holds one question per row: (pass, start, end) of a range of that pass's shuffled
    order. A keyed-permutation pass is read directly from the key until the ranges read that
    way (``direct``, per pass) exceed a quarter of the key; then its prefix XOR array is built
    in ``prefixes`` (``built``) and each parity is two look-ups. Mask-shuffle passes are read
    from the packed key with their member-count tables. Returns False, answering nothing, if
    any question lies outside the key.
    """
    npass = prefixes.shape[0]
    n = key.size
    m = q.shape[0]
    for t in range(m):
        j, a, b = q[t, 0], q[t, 1], q[t, 2]
        if j < 0 or j >= npass or a < 0 or b > n or a >= b:
            return False
        if built[j] == 0 and params[j, P_MODE] != 2:
            direct[j] += b - a
    for j in range(npass):
        if built[j] == 0 and params[j, P_MODE] != 2 and direct[j] > n // 4:
            prefix_parity(key, params[j], prefixes[j])
            built[j] = 1
    for i in range(out.size):
        out[i] = 0
    for t in range(m):
        j, a, b = q[t, 0], q[t, 1], q[t, 2]
        if built[j]:
            bit = prefixes[j, b] ^ prefixes[j, a]
        elif params[j, P_MODE] == 2:
            bit = mask_range_parity(packed, params[j], mcum[j], a, b)
        else:
            bit = direct_parity(key, params[j], a, b)
        out[t >> 3] |= np.uint8(bit << (7 - (t & 7)))
    return True


@njit(cache=True)
def build_question(p, s, e, two_level, two, q):
    """Bob's ``cascade.ask``: row t of ``q`` = (pass, start, midpoint) of open search t; returns the rows used.

    With ``two_level``, every search whose range has at least 4 bits (flagged in ``two``) also
    asks for the left quarter of both halves: those rows follow, all left-half quarters first,
    then all right-half quarters (the order :func:`apply_answers` reads them in).
    """
    m = p.size
    for t in range(m):
        mid = s[t] + (e[t] - s[t]) // 2
        q[t, 0], q[t, 1], q[t, 2] = p[t], s[t], mid
        two[t] = two_level and e[t] - s[t] >= 4
    k = m
    for t in range(m):
        if two[t]:
            mid = s[t] + (e[t] - s[t]) // 2
            q[k, 0], q[k, 1], q[k, 2] = p[t], s[t], s[t] + (mid - s[t]) // 2
            k += 1
    for t in range(m):
        if two[t]:
            mid = s[t] + (e[t] - s[t]) // 2
            q[k, 0], q[k, 1], q[k, 2] = p[t], mid, mid + (e[t] - mid) // 2
            k += 1
    return k


@njit(cache=True, inline="always")
def _packed_bit(packed, t):
    """Bit ``t`` of an MSB-first packed bit string (``numpy.packbits`` order)."""
    return (packed[t >> 3] >> (7 - (t & 7))) & np.uint8(1)


@njit(cache=True)
def fenwick_from_prefix(prefix, tree):
    """Fill ``tree`` (length n+1) so that node i holds the XOR of the bits (i - lowbit(i), i]."""
    n = prefix.size - 1
    tree[0] = 0
    for i in range(1, n + 1):
        tree[i] = prefix[i] ^ prefix[i - (i & -i)]


@njit(cache=True, inline="always")
def _fen_prefix(tree, i):
    acc = np.uint8(0)
    while i > 0:
        acc ^= tree[i]
        i -= i & -i
    return acc


PLAIN_MAX = 512
"""Bob's passes with blocks of at most this many bits keep a plain copy of the shuffled key
(a range parity is an XOR over at most this many contiguous bytes, a flip one byte) instead of a
Fenwick tree (two walks of ~log2(n) scattered bytes per parity, one per flip)."""

B_NONE, B_FENWICK, B_PLAIN, B_DIRECT = 0, 1, 2, 3
"""What Bob keeps for a pass (``built``): nothing yet, a Fenwick tree, a plain shuffled copy, or
nothing ever (an unshuffled pass with blocks ≤ 256 bits: its ranges are summed from the key)."""


@njit(cache=True)
def bob_build(key, p, k, row):
    """Build Bob's structure for a pass with blocks of ``k`` bits in ``row`` (length n+1); returns its kind."""
    if p[P_MODE] == 0 and k <= 256:
        return B_DIRECT
    if k <= PLAIN_MAX:
        row[0] = 0
        shuffled_key(key, p, row[1:])
        return B_PLAIN
    pre = prefix_parity(key, p)
    fenwick_from_prefix(pre, row)
    return B_FENWICK


@njit(cache=True)
def bob_build_tops(key, p, k, count, row, mine):
    """``bob_build`` plus Bob's parity of each of the first ``count`` top-level blocks in ``mine``."""
    n = key.size
    kind = bob_build(key, p, k, row)
    for t in range(count):
        a, b = t * k, min((t + 1) * k, n)
        if kind == B_FENWICK:
            mine[t] = _fen_prefix(row, b) ^ _fen_prefix(row, a)
        elif kind == B_PLAIN:
            acc = np.uint8(0)
            for i in range(a + 1, b + 1):
                acc ^= row[i]
            mine[t] = acc
        else:
            acc = np.uint8(0)
            for i in range(a, b):
                acc ^= key[i]
            mine[t] = acc
    return kind


@njit(cache=True, inline="always")
def _bob_parity(trees, built, key, bpk, mcum, params, j, a, b):
    """Bob's parity of range [a, b) of pass j from whatever he keeps for the pass (see ``B_*``)."""
    kind = built[j]
    if kind == B_PLAIN:
        row = trees[j]
        acc = np.uint8(0)
        for i in range(a + 1, b + 1):
            acc ^= row[i]
        return acc
    if kind == B_FENWICK:
        tree = trees[j]
        return _fen_prefix(tree, b) ^ _fen_prefix(tree, a)
    mode = params[j, P_MODE]
    if mode == 0 and b - a <= 256:
        acc = np.uint8(0)
        for i in range(a, b):
            acc ^= key[i]
        return acc
    if mode == 2:
        return mask_range_parity(bpk, params[j], mcum[j], a, b)
    return direct_parity(key, params[j], a, b)


@njit(cache=True)
def originals(params, passes, positions):
    """Original key indices of shuffled ``positions`` in the given passes."""
    out = np.empty(positions.size, np.int64)
    for t in range(positions.size):
        out[t] = perm_fwd(positions[t], params[passes[t]])
    return out


@njit(cache=True)
def apply_corrections(xs, key, bpk, mcum, trees, built, params, active, block_size, mism, mism_off):
    """Flip Bob's bits ``xs`` (distinct original indices) and update every active pass.

    For each pass < ``active``: toggle the Fenwick tree (if built) at the bit's shuffled
    position and the parity mismatch of the top-level block that holds it. Returns the
    flat indices of the top-level blocks touched (candidates for new searches).
    """
    n = key.size
    touched = np.empty(xs.size * active, np.int64)
    for t in range(xs.size):
        x = xs[t]
        key[x] ^= 1
        bpk[x >> 6] ^= np.uint64(1) << np.uint64(x & 63)
        for j in range(active):
            pos = mask_rank(params[j], mcum[j], x) if params[j, P_MODE] == 2 else perm_inv(x, params[j])
            if built[j] == B_FENWICK:
                tree = trees[j]
                i = pos + 1
                while i <= n:
                    tree[i] ^= 1
                    i += i & -i
            elif built[j] == B_PLAIN:
                trees[j, pos + 1] ^= 1
            blk = mism_off[j] + pos // block_size[j]
            mism[blk] ^= 1
            touched[t * active + j] = blk
    return touched


@njit(cache=True)
def free_descent(trees, built, key, bpk, mcum, params, p, s, e, a, d, bits, leaf, rbits, on):
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
            pb = _bob_parity(trees, built, key, bpk, mcum, params, j, cs, ce)
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


@njit(cache=True, inline="always")
def _descend(trees, built, key, bpk, mcum, params, t, p, s, e, a, d, bits, alice_left):
    j = p[t]
    mid = s[t] + (e[t] - s[t]) // 2
    mine = _bob_parity(trees, built, key, bpk, mcum, params, j, s[t], mid)
    if (alice_left ^ mine) == 1:
        e[t] = mid
        a[t] = alice_left
    else:
        s[t] = mid
        a[t] = a[t] ^ alice_left
    d[t] += 1
    bits[t] |= np.uint64(a[t]) << np.uint64(d[t])


@njit(cache=True)
def apply_answers(trees, built, key, bpk, mcum, params, p, s, e, a, d, bits, two, answers):
    """Descend every search one level with Alice's parity of its left half (``answers``: packed, MSB first).

    Searches flagged in ``two`` had also asked the left quarter of both halves (answers
    after the first m, in the order of ``two``'s set rows: all left quarters, then all
    right-half quarters); they descend a second level with the quarter on their side.
    """
    m = p.size
    nt = 0
    for t in range(m):
        if two[t]:
            nt += 1
    k = 0
    for t in range(m):
        mid = s[t] + (e[t] - s[t]) // 2
        _descend(trees, built, key, bpk, mcum, params, t, p, s, e, a, d, bits, _packed_bit(answers, t))
        if two[t]:
            quarter = _packed_bit(answers, m + k) if e[t] == mid else _packed_bit(answers, m + nt + k)
            _descend(trees, built, key, bpk, mcum, params, t, p, s, e, a, d, bits, quarter)
            k += 1


@njit(cache=True)
def resolve_searches(
    key,
    bpk,
    mcum,
    trees,
    built,
    params,
    sizes,
    mism,
    mism_off,
    busy,
    rec_leaf,
    rec_bits,
    alice_flat,
    opened,
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
):
    """Bob's local work between two round trips, compiled (rows [0, m) are the open searches).

    Repeats until every open search needs a parity from Alice: drop searches whose range
    no longer disagrees oddly with Alice's known parity (only searches in blocks a flip
    touched are re-checked; their block becomes a candidate),
    walk the recorded paths for free, flip the bits where searches ended (updating every
    active pass and making the touched blocks candidates), and open a search on every odd
    candidate block without one (building a pass's Fenwick tree once its searches would
    read about a quarter of the key directly). Returns (open searches, bits flipped).
    """
    n = key.size
    npass = sizes.size
    flag = np.zeros(mism.size, np.uint8)  # candidate already listed
    pend = np.empty(mism.size, np.int64)
    npend = 0
    for t in range(cand.size):
        f = cand[t]
        if flag[f] == 0:
            flag[f] = 1
            pend[npend] = f
            npend += 1
    flipped = 0
    xs = np.empty(mism.size, np.int64)
    # Rows are consistent on entry (just answered, or none open): only flips can break them.
    dirty = np.zeros(mism.size, np.uint8)
    dlist = np.empty(mism.size, np.int64)
    ndirty = 0
    while True:
        # 1. re-check the open searches whose block a flip touched since their last check (a
        #    search's range lies in its block, so no other search's disagreement can change)
        w = 0
        for t in range(m if ndirty else 0):
            j = rows_p[t]
            f = mism_off[j] + rows_b[t]
            if (
                dirty[f] == 0
                or (_bob_parity(trees, built, key, bpk, mcum, params, j, rows_s[t], rows_e[t]) ^ rows_a[t]) == 1
            ):
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
            m = w
            for t in range(ndirty):
                dirty[dlist[t]] = 0
            ndirty = 0
        # 2. free descent along recorded paths
        free_descent(
            trees,
            built,
            key,
            bpk,
            mcum,
            params,
            rows_p[:m],
            rows_s[:m],
            rows_e[:m],
            rows_a[:m],
            rows_d[:m],
            rows_bits[:m],
            rows_leaf[:m],
            rows_rbits[:m],
            rows_on[:m],
        )
        # 3. searches that reached one bit
        nx = 0
        w = 0
        for t in range(m):
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
        if nx:
            ux = np.unique(xs[:nx])  # two searches (different passes) may end on the same bit
            touched = apply_corrections(ux, key, bpk, mcum, trees, built, params, active, sizes, mism, mism_off)
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
                opened[j] += 1
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
        for j in range(npass):
            if built[j] == B_NONE and params[j, P_MODE] != 2 and opened[j] * sizes[j] * 2 > n // 4:
                built[j] = bob_build(key, params[j], sizes[j], trees[j])
