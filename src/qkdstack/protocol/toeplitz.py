"""Toeplitz hashing over GF(2), computed exactly: carry-less products, or a floating-point FFT.

Convention
----------
For an input ``key`` of ``n`` bits, an output length ``m`` (1 <= m <= n) and a ``seed`` of
``n - 1`` bits, the hash is the *modified Toeplitz* matrix ``[I_m | T]`` of Hayashi and
Tsurumaru ("More efficient privacy amplification with less random seeds via dual universal
hash function", IEEE Trans. Inf. Theory 62, 2213 (2016)): the ``m x m`` identity next to the
``m x (n - m)`` Toeplitz matrix over GF(2)

    T[i, j] = seed[i - j + w - 1]        (0 <= i < m, 0 <= j < w = n - m),

constant along every diagonal (row 0 reads the seed from index ``w - 1`` down to ``0``,
column 0 from ``w - 1`` up to ``n - 2``). The hash is

    y = key[:m] XOR T @ key[m:],   (T @ key[m:])[i] = c[i + w - 1] mod 2,

where ``c = seed * key[m:]`` is the ordinary (integer) linear convolution: the Toeplitz part
is the *middle* ``m`` coefficients of an integer polynomial product, reduced mod 2.

Why this family. It is 2-universal: for keys ``x != x'`` with difference ``d = (d1, d2)``,
``d2 = 0`` gives ``y - y' = d1 != 0``, and ``d2 != 0`` makes ``T @ d2`` uniform on
``{0,1}^m`` over the seed (row ``i`` of ``T @ d2`` contains seed bit ``i - j_min + w - 1``,
``j_min`` the first 1 of ``d2``, which no earlier row contains, so the map from seed to
``T @ d2`` is onto), hence ``Pr[y = y'] <= 2^-m`` -- what the leftover hash lemma needs
(Krawczyk, CRYPTO 1994, for the plain Toeplitz case; ``tests/test_toeplitz.py`` checks the
bound exhaustively on small sizes). Against the plain ``m x n`` Toeplitz matrix it needs
``n - 1`` instead of ``n + m - 1`` seed bits and a convolution of length ``n - 1`` instead of
``n + m - 1``: a third less work at ``m = n/2``.

Methods
-------
``"clmul"`` (wherever the CPU has a carry-less multiply instruction): ``T`` is cut into square
blocks whose products :mod:`qkdstack.protocol.toeplitz_clmul` computes on packed 64-bit
words (see :func:`_toeplitz_clmul`); exact by construction. ``"fft"`` (elsewhere; the tests
and benchmarks run both): the floating-point convolution below.

FFT algorithm
-------------
The convolution is computed as a *cyclic* convolution of length ``N = C * R >= n - 1``
(``C`` and ``R`` 5-smooth and close to ``sqrt(N)``). Cyclic index ``k`` holds ``c[k] + c[k +
N]``; for the indices we read, ``k >= w - 1``, so ``k + N >= w + n - 2`` lies past the last
linear index ``w + n - 3``: no wrap-around reaches them. Five measured tricks make it fast
(see ``docs/amplification.md`` for the figures):

* both real inputs ride in one complex array, ``z = seed + i*key``, so one complex FFT ``Z``
  transforms both; the product spectrum is ``S*K = (Z[k]^2 - conj(Z[-k])^2) / (4i)``;
* the length-``N`` FFT is done as a *four-step* FFT (Bailey 1990): length-``C`` FFTs down the
  columns of the ``C x R`` matrix, a twiddle multiplication ``w^(k2*j1)``, length-``R`` FFTs
  along the rows. The spectrum comes out transposed (``Y[k2, k1] = Z[k2 + C*k1]``), which a
  convolution never needs to undo: the inverse runs the same steps backwards. Batches of
  small transforms stay in cache, where one pocketfft transform of ``1.5e7`` points is
  memory-bound and 2-3x slower on the 2-core machine;
* the product spectrum is Hermitian (the convolution is real), so instead of a complex
  inverse of length ``N`` it is folded into a spectrum of length ``N/2`` whose inverse is
  ``p[2j] + i*p[2j+1]`` (even and odd samples; see :func:`_half_length_spectrum`);
* twiddle factors are products of two table entries ``w^(k2*a) * w^(k2*A*b)`` with
  ``j1 = a + A*b`` and ``A = ceil(sqrt(R))``, each entry computed by ``cos``/``sin`` of an
  exactly reduced angle ``2*pi*((k2*a) mod N)/N``, so the tables cost ``O(C sqrt R)`` and
  every twiddle has a relative error of at most about ``3u``.
* the two complex work arrays are kept per thread and zeroed after use (:class:`_Workspace`):
  on this machine first-touching fresh pages costs more than an FFT pass.

Exactness of the FFT method
---------------------------
Every true coefficient is an integer in ``[0, n]``, far below ``2**53``, so the only
question is the floating-point rounding error. For an FFT-based convolution in binary64
the componentwise error is bounded by (Percival, "Rapid multiplication modulo the sum and
difference of highly composite numbers", Math. Comp. 72 (2003), Thm 2.1; Higham, *Accuracy
and Stability of Numerical Algorithms*, 2nd ed., Thm 24.2 for the transform itself)

    |c_hat[k] - c[k]| <= ||seed||_2 * ||key||_2 * ((1 + u)^(3L) * (1 + u*sqrt(5))^(3L+1) * (1 + beta)^(3L) - 1)

with ``u = 2**-53``, ``L`` the number of levels of rounded multiplications and ``beta`` the
relative error of the twiddle factors (``<= 3u`` here). ``L = log2 N`` for a radix-2 FFT;
the four-step twiddle, the product formula and the even/odd fold each add one level, so
``L <= log2 N + 3``. The complex packing replaces ``||seed||_2 * ||key||_2`` by ``||z||_2^2 =
|seed| + |key[m:]| < 2n`` (Parseval: the error of ``Z[k]^2 - conj(Z[-k])^2`` is bounded by
that of ``|Z[k]|^2 + |Z[-k]|^2``). The bound is then at most about ``3L(1 + sqrt 5 + 3) u
(2n) < 40 L u n``: for ``n = 10**7`` (``L <= 28``) it is ``< 2e-6``, five
orders of magnitude below the ``0.5`` at which rounding to the nearest integer could go
wrong; it stays below ``1e-3`` up to ``n = 2**31``.

Because pocketfft is a mixed-radix implementation rather than the radix-2 algorithm the
theorems analyse, :func:`toeplitz_hash` also *measures* the distance of every output
coefficient from the nearest integer and refuses (raises :class:`ToeplitzPrecisionError`)
if it exceeds ``0.25``: it fails closed rather than returning a possibly wrong hash. The
observed distance is about ``1e-9`` at ``n = 10**7``.

The naive dense product :func:`toeplitz_hash_naive` is an independent reference for tests
(small sizes only: it builds the whole matrix).
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache

import numpy as np
import scipy.fft
from numba import njit

from qkdstack.errors import QKDError
from qkdstack.protocol import toeplitz_clmul

__all__ = [
    "DEFAULT_METHOD",
    "MAX_ROUNDING_ERROR",
    "METHODS",
    "ToeplitzPrecisionError",
    "seed_length",
    "toeplitz_hash",
    "toeplitz_hash_naive",
]

MAX_ROUNDING_ERROR = 0.25
"""Largest accepted distance of an FFT output from the nearest integer (true values are integers)."""

_WORKERS = 2
"""Threads scipy.fft may use for a batch of row or column transforms."""


class _Workspace(threading.local):
    """Per-thread complex buffers reused across calls.

    Touching ~360 MB of fresh pages (n = 10**7, m = n/2) costs more than an FFT pass on the
    2-core machine (measured 0.45 s to fault in 240 MB versus 0.02 s to rewrite it), so the
    buffers are kept, grown on demand, and zeroed after every hash so that no key-dependent
    values linger in them.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int) -> np.ndarray:
        buf = self.buffers.get(name)
        if buf is None or buf.size < size:
            buf = np.empty(size, np.complex128)
            self.buffers[name] = buf
        return buf[:size]


_WORKSPACE = _Workspace()


class ToeplitzPrecisionError(QKDError):
    """The floating-point convolution drifted too far from an integer; the hash is not trusted."""


def _check_args(key_bits: np.ndarray, seed_bits: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, int]:
    key = np.asarray(key_bits)
    seed = np.asarray(seed_bits)
    if key.ndim != 1 or seed.ndim != 1:
        raise ValueError("key and seed must be one-dimensional 0/1 arrays")
    n = key.size
    if not 1 <= m <= n:
        raise ValueError(f"output length m = {m} must lie in 1..n = {n}")
    if seed.size != seed_length(n):
        raise ValueError(f"Toeplitz seed must have n - 1 = {seed_length(n)} bits, got {seed.size}")
    return key, seed, n


def seed_length(n: int) -> int:
    """Bits of seed the hash of an ``n``-bit key needs, whatever the output length: ``n - 1``."""
    return n - 1


def _smooth_numbers(limit: int) -> list[int]:
    """All 2^a 3^b 5^c <= limit, sorted (pocketfft's fastest lengths)."""
    out = []
    p2 = 1
    while p2 <= limit:
        p3 = p2
        while p3 <= limit:
            p5 = p3
            while p5 <= limit:
                out.append(p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return sorted(out)


@lru_cache(maxsize=64)
def _shape(length: int) -> tuple[int, int]:
    """Four-step matrix shape ``(C, R)``: 5-smooth, ``R`` even, ``C * R >= length`` minimal, then most square."""
    root = math.isqrt(length)
    best: tuple[tuple[int, float], int, int] | None = None
    for rows in _smooth_numbers(4 * root + 4):
        if rows % 2 or rows * 16 < root:
            continue
        cols = scipy.fft.next_fast_len(-(-length // rows))
        score = (rows * cols, abs(math.log(rows / cols)))
        if best is None or score < best[0]:
            best = (score, cols, rows)
    assert best is not None
    return best[1], best[2]


@njit(cache=True)
def _twiddle(a: np.ndarray, n_total: int, sign: float) -> None:
    """Multiply ``a[k2, j1]`` in place by ``exp(sign * 2*pi*i * k2*j1 / n_total)``.

    Each factor is the product of two table entries (``j1 = lo + step*hi``) whose angles are
    reduced exactly mod ``n_total`` in integers before ``cos``/``sin``.
    """
    rows, cols = a.shape
    step = 1
    while step * step < cols:
        step += 1
    n_hi = (cols + step - 1) // step
    lo = np.empty(step, np.complex128)
    hi = np.empty(n_hi, np.complex128)
    scale = sign * 2.0 * math.pi / n_total
    for r in range(1, rows):
        for i in range(step):
            angle = scale * ((r * i) % n_total)
            lo[i] = complex(math.cos(angle), math.sin(angle))
        for i in range(n_hi):
            angle = scale * ((r * step * i) % n_total)
            hi[i] = complex(math.cos(angle), math.sin(angle))
        for c in range(cols):
            a[r, c] *= lo[c % step] * hi[c // step]


@njit(cache=True)
def _mirror_product(z: np.ndarray, r: int, c: int) -> complex:
    """``FFT(seed) * FFT(key)`` at four-step position ``[r, c]`` of ``z = FFT(seed + i*key)``.

    Position ``[r, c]`` holds frequency ``k = r + C*c``; its mirror ``-k mod N`` sits at
    ``[0, -c mod R]`` when ``r = 0`` and at ``[C - r, R - 1 - c]`` otherwise, and
    ``S[k] * K[k] = (Z[k]^2 - conj(Z[-k])^2) / (4i)``.
    """
    rows, cols = z.shape
    mirror = z[0, (cols - c) % cols] if r == 0 else z[rows - r, cols - 1 - c]
    here = z[r, c]
    return (here * here - mirror.conjugate() ** 2) * -0.25j


@njit(cache=True)
def _half_length_spectrum(z: np.ndarray, q: np.ndarray) -> None:
    """Write to ``q`` the spectrum ``Q`` of length ``N/2`` whose inverse is ``p[2j] + i*p[2j+1]``, ``p = seed (*) key``.

    The product spectrum ``P`` is Hermitian (``p`` is real), so a complex inverse of length
    ``N`` would waste half its work. With ``E[k] = (P[k] + P[k + N/2]) / 2`` (spectrum of the
    even samples) and ``O[k] = (P[k] - P[k + N/2]) * w^(-k) / 2`` (odd samples, ``w =
    exp(-2*pi*i/N)``), ``Q = E + i*O``. ``k + N/2`` is column ``c + R/2`` of the same row, so
    ``Q`` has the four-step layout ``(C, R/2)`` for length ``N/2``.
    """
    rows, cols = z.shape
    half = cols // 2
    n_total = rows * cols
    row_turn = np.empty(rows, np.complex128)
    col_turn = np.empty(half, np.complex128)
    for r in range(rows):
        angle = 2.0 * math.pi * r / n_total
        row_turn[r] = complex(math.cos(angle), math.sin(angle))
    for c in range(half):
        angle = 2.0 * math.pi * c / cols
        col_turn[c] = complex(math.cos(angle), math.sin(angle))
    for r in range(rows):
        for c in range(half):
            low = _mirror_product(z, r, c)
            high = _mirror_product(z, r, c + half)
            q[r, c] = 0.5 * (low + high) + 0.5j * (low - high) * (row_turn[r] * col_turn[c])


@njit(cache=True)
def _interleave(seed: np.ndarray, key: np.ndarray, flat: np.ndarray) -> None:
    """Fill ``flat`` with ``seed + i*key``, zero-padded, in one pass."""
    for j in range(flat.size):
        re = float(seed[j]) if j < seed.size else 0.0
        im = float(key[j]) if j < key.size else 0.0
        flat[j] = complex(re, im)


@njit(cache=True)
def _round_parity(values: np.ndarray, out: np.ndarray) -> float:
    """Write ``round(values) mod 2`` to ``out``; return the largest distance to the nearest integer."""
    worst = 0.0
    for i in range(values.size):
        nearest = np.rint(values[i])
        worst = max(worst, abs(values[i] - nearest))
        out[i] = np.uint8(int(nearest) & 1)
    return worst


def _cyclic_convolution(seed: np.ndarray, key: np.ndarray, z: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Cyclic convolution (float64, length ``C*R``) of two 0/1 vectors, natural order.

    ``z`` (``C x R``) and ``q`` (``C x R/2``) are complex work arrays; the result is a float64
    view of ``q`` (or of the array scipy returned, should it not work in place).
    """
    cols, rows = z.shape
    _interleave(seed, key, z.reshape(-1))
    z = scipy.fft.fft(z, axis=0, overwrite_x=True, workers=_WORKERS)
    _twiddle(z, cols * rows, -1.0)
    z = scipy.fft.fft(z, axis=1, overwrite_x=True, workers=_WORKERS)
    _half_length_spectrum(z, q)
    q = scipy.fft.ifft(q, axis=1, overwrite_x=True, workers=_WORKERS)
    _twiddle(q, cols * rows // 2, 1.0)
    q = scipy.fft.ifft(q, axis=0, overwrite_x=True, workers=_WORKERS)
    return q.reshape(-1).view(np.float64)


def _words(bits: np.ndarray, lead: int, total_words: int) -> np.ndarray:
    """``lead`` zero bits, then ``bits`` (0/1), packed little-endian into ``total_words`` uint64 words."""
    packed = np.zeros(total_words * 8, np.uint8)
    if bits.size:
        body = np.packbits(np.concatenate([np.zeros(lead, np.uint8), bits]), bitorder="little")
        packed[: body.size] = body
    return packed.view("<u8")


def _square_size(words: int) -> int:
    """The smallest ``leaf * 2^d >= words`` with ``leaf <= LEAF_WORDS``: sizes the split halves evenly."""
    halvings = max(0, math.ceil(math.log2(words / toeplitz_clmul.LEAF_WORDS))) if words else 0
    return -(-words // 2**halvings) * 2**halvings


def _toeplitz_clmul(tail: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """``T @ tail mod 2`` (``m`` bits, unpacked) from square Toeplitz blocks on packed words.

    ``T`` (``m x w``, ``w = len(tail)``) is cut into square blocks of ``s`` bits per side,
    ``s = min(m, w)`` rounded up to whole words: along the columns when ``w >= m`` (the block
    products are XORed), along the rows otherwise (they are stacked). Each block sits in the
    top-left corner of an ``S``-bit square (``S >= s``, a size the split halves evenly), whose
    diagonal is the seed from bit ``w - b s - S`` (block ``b`` of columns) or ``b s + w - S``
    (block ``b`` of rows); the products are :func:`toeplitz_clmul.toeplitz_times`. The seed is
    packed after zero bits that make every start a whole word; bits outside the seed
    read as zeros and only ever meet zero key bits or discarded rows.
    """
    w = tail.size
    block_words = -(-min(m, w) // 64)
    block = 64 * block_words
    size_words = _square_size(block_words)
    size = 64 * size_words
    by_columns = w >= m
    blocks = -(-(w if by_columns else m) // block)
    lead = size + (blocks - 1) * block - w if by_columns else size - w
    seed_words = _words(seed, lead, (lead + seed.size) // 64 + 2 * size_words + 1)
    key_words = _words(tail, 0, blocks * block_words)
    out = np.zeros(size_words if by_columns else blocks * block_words, np.uint64)
    vector = np.zeros(size_words, np.uint64)  # one block of the key, zero-padded to the square's size
    for b in range(blocks):
        if by_columns:
            first = (blocks - 1 - b) * block_words  # word of seed bit w - b*s - S, after the lead
            vector[:block_words] = key_words[b * block_words : (b + 1) * block_words]
        else:
            first = b * block_words
            vector[:block_words] = key_words[:block_words]
        product = toeplitz_clmul.toeplitz_times(seed_words[first : first + 2 * size_words], vector)
        if by_columns:
            out ^= product
        else:  # rows past the block's own s are the padding's: dropped
            out[b * block_words : (b + 1) * block_words] ^= product[:block_words]
        product[:] = 0
    vector[:] = 0
    bits = np.unpackbits(out.view(np.uint8), bitorder="little")[:m]
    for array in (out, key_words):
        array[:] = 0
    return bits


def _toeplitz_fft(tail: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """``T @ tail mod 2`` (``m`` bits, unpacked) by the exact floating-point FFT convolution."""
    cols, rows = _shape(seed.size)
    z = _WORKSPACE.get("spectrum", cols * rows).reshape(cols, rows)
    q = _WORKSPACE.get("half", cols * rows // 2).reshape(cols, rows // 2)
    product = np.empty(m, np.uint8)
    try:
        conv = _cyclic_convolution(seed, tail, z, q)
        worst = _round_parity(conv[tail.size - 1 : tail.size - 1 + m], product)
    finally:
        z.fill(0)
        q.fill(0)
    if worst > MAX_ROUNDING_ERROR:
        raise ToeplitzPrecisionError("FFT convolution rounding error exceeds 0.25; refusing an inexact hash")
    return product


METHODS = {"clmul": _toeplitz_clmul, "fft": _toeplitz_fft}
"""The two exact ways to compute ``T @ tail``."""

DEFAULT_METHOD = "clmul" if toeplitz_clmul.AVAILABLE else "fft"
"""Carry-less products wherever the CPU has them: on the quiet 2-core machine they took 0.175 s
against 0.40 s for the FFT at ``n = 10^7, m = n/2`` and 0.086 s against 0.39 s at ``m = n/10``
(docs/amplification.md)."""


def toeplitz_hash(key_bits: np.ndarray, seed_bits: np.ndarray, m: int, method: str | None = None) -> np.ndarray:
    """Return ``[I_m | T] @ key mod 2`` as a uint8 0/1 array of ``m`` bits (unpacked).

    ``T[i, j] = seed[i - j + n - m - 1]`` is the ``m x (n - m)`` Toeplitz matrix of the module
    docstring; ``key_bits`` (``n`` bits) and ``seed_bits`` (``n - 1`` bits) are 0/1 arrays of
    any integer or bool dtype. ``method`` picks how ``T @ key[m:]`` is computed, both exact:
    ``"clmul"``, GF(2)[x] products with the CPU's carry-less multiply, or ``"fft"``, a packed
    complex four-step FFT convolution in binary64, exact by the bound in the module docstring
    and checked at run time (:class:`ToeplitzPrecisionError`). ``None`` means
    :data:`DEFAULT_METHOD`.
    """
    key, seed, n = _check_args(key_bits, seed_bits, m)
    out = key[:m].astype(np.uint8)  # a copy: the identity block
    if m == n:
        return out
    method = method or DEFAULT_METHOD
    product = METHODS[method](key[m:].astype(np.uint8, copy=False), seed.astype(np.uint8, copy=False), m)
    np.bitwise_xor(out, product, out=out)
    return out


def toeplitz_hash_naive(key_bits: np.ndarray, seed_bits: np.ndarray, m: int) -> np.ndarray:
    """Reference ``[I_m | T] @ key mod 2`` by building the dense ``m x n`` matrix (tests only; small sizes)."""
    key, seed, n = _check_args(key_bits, seed_bits, m)
    rows = np.arange(m)[:, None]
    cols = np.arange(n - m)[None, :]
    toeplitz = seed.astype(np.uint8)[rows - cols + n - m - 1]
    matrix = np.concatenate([np.eye(m, dtype=np.uint8), toeplitz], axis=1)
    return (np.bitwise_and(matrix, key.astype(np.uint8)[None, :]).sum(axis=1, dtype=np.int64) & 1).astype(np.uint8)
