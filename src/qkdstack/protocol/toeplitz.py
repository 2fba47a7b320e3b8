"""Toeplitz hashing over GF(2), computed exactly with a floating-point FFT convolution.

Convention
----------
For an input ``key`` of ``n`` bits, an output length ``m`` (1 <= m <= n) and a ``seed`` of
``n + m - 1`` bits, the Toeplitz matrix is the ``m x n`` matrix over GF(2)

    T[i, j] = seed[i - j + n - 1]        (0 <= i < m, 0 <= j < n),

constant along every diagonal; row 0 reads the seed from index ``n - 1`` down to ``0``,
column 0 reads it from ``n - 1`` up to ``n + m - 2``. The hash is ``y = T @ key mod 2``:

    y[i] = sum_j seed[i + n - 1 - j] * key[j]  (mod 2) = c[i + n - 1] mod 2,

where ``c = seed * key`` is the ordinary (integer) linear convolution. So the hash is the
*middle* ``m`` coefficients of an integer polynomial product, reduced mod 2. Toeplitz
matrices with a uniformly random seed form a 2-universal family (Krawczyk, CRYPTO 1994;
Mansour, Nisan, Tiwari, STOC 1990), which is what the leftover hash lemma needs.

Algorithm
---------
The convolution is computed as a *cyclic* convolution of length ``N = C * R >= n + m - 1``
(``C`` and ``R`` 5-smooth and close to ``sqrt(N)``). Cyclic index ``k`` holds ``c[k] + c[k +
N]``; for the indices we read, ``k >= n - 1``, so ``k + N >= 2n + m - 2`` lies past the last
linear index ``2n + m - 3``: no wrap-around reaches them. Five measured tricks make it fast
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

Exactness
---------
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
|seed| + |key| <= 2n + m`` (Parseval: the error of ``Z[k]^2 - conj(Z[-k])^2`` is bounded by
that of ``|Z[k]|^2 + |Z[-k]|^2``). The bound is then at most about ``3L(1 + sqrt 5 + 3) u
(2n + m) < 20 L u (2n + m)``: for ``n = m = 10**7`` (``L <= 28``) it is ``< 2e-6``, five
orders of magnitude below the ``0.5`` at which rounding to the nearest integer could go
wrong; it stays below ``1e-3`` up to ``n = m = 2**31``.

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

__all__ = ["MAX_ROUNDING_ERROR", "ToeplitzPrecisionError", "toeplitz_hash", "toeplitz_hash_naive"]

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
    if seed.size != n + m - 1:
        raise ValueError(f"Toeplitz seed must have n + m - 1 = {n + m - 1} bits, got {seed.size}")
    return key, seed, n


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


def toeplitz_hash(key_bits: np.ndarray, seed_bits: np.ndarray, m: int) -> np.ndarray:
    """Return ``T @ key mod 2`` as a uint8 0/1 array of ``m`` bits (unpacked), ``T[i,j] = seed[i-j+n-1]``.

    ``key_bits`` (``n`` bits) and ``seed_bits`` (``n + m - 1`` bits) are 0/1 arrays of any
    integer or bool dtype. Computed with one packed complex four-step FFT convolution in
    binary64; exact by the bound in the module docstring, and checked at run time
    (:class:`ToeplitzPrecisionError`).
    """
    key, seed, n = _check_args(key_bits, seed_bits, m)
    cols, rows = _shape(seed.size)
    z = _WORKSPACE.get("spectrum", cols * rows).reshape(cols, rows)
    q = _WORKSPACE.get("half", cols * rows // 2).reshape(cols, rows // 2)
    out = np.empty(m, np.uint8)
    try:
        conv = _cyclic_convolution(seed.astype(np.uint8, copy=False), key.astype(np.uint8, copy=False), z, q)
        worst = _round_parity(conv[n - 1 : n - 1 + m], out)
    finally:
        z.fill(0)
        q.fill(0)
    if worst > MAX_ROUNDING_ERROR:
        raise ToeplitzPrecisionError("FFT convolution rounding error exceeds 0.25; refusing an inexact hash")
    return out


def toeplitz_hash_naive(key_bits: np.ndarray, seed_bits: np.ndarray, m: int) -> np.ndarray:
    """Reference ``T @ key mod 2`` by building the dense ``m x n`` matrix (tests only; small sizes)."""
    key, seed, n = _check_args(key_bits, seed_bits, m)
    rows = np.arange(m)[:, None]
    cols = np.arange(n)[None, :]
    matrix = seed.astype(np.uint8)[rows - cols + n - 1]
    return (np.bitwise_and(matrix, key.astype(np.uint8)[None, :]).sum(axis=1, dtype=np.int64) & 1).astype(np.uint8)
