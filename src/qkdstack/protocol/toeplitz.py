"""Toeplitz hashing over GF(2), computed exactly with a real FFT.

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

Exactness
---------
The convolution is computed as a *cyclic* convolution of length ``N >= n + m - 1``
(``scipy.fft.next_fast_len``), ``c = irfft(rfft(seed, N) * rfft(key, N))``. Cyclic index
``k`` holds ``c[k] + c[k + N]``; for the indices we read, ``k >= n - 1``, so ``k + N >=
2n + m - 2`` lies past the last linear index ``2n + m - 3``: no wrap-around reaches them.

Every true coefficient is an integer in ``[0, min(n, m + n - 1)]``, far below ``2**53``, so
the only question is the floating-point rounding error. For an FFT-based convolution in
binary64 the componentwise error is bounded by (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., Thm 24.2, applied to the two forward and one inverse
transform; Percival, "Rapid multiplication modulo the sum and difference of highly
composite numbers", Math. Comp. 72 (2003), Thm 2.1 gives the same shape)

    |c_hat[k] - c[k]| <= ||seed||_2 * ||key||_2 * ((1 + u)^(3L) * (1 + u*sqrt(5))^(3L+1) * (1 + beta)^(3L) - 1)

with ``u = 2**-53``, ``L = ceil(log2 N)`` and ``beta`` the relative error of the twiddle
factors (taken as ``beta <= 2u``; pocketfft computes them to about ``u``). With
``||seed||_2 <= sqrt(n + m)`` and ``||key||_2 <= sqrt(n)`` this is at most about
``3L(1 + sqrt 5 + 2) u * sqrt(n(n+m)) < 16 L u sqrt(n(n+m))``: for ``n = m = 10**7`` and
``L = 25`` it is ``< 1e-6``, five orders of magnitude below the ``0.5`` at which rounding
to the nearest integer could go wrong; it stays below ``1e-3`` up to ``n = m = 2**31``.
Because pocketfft is a mixed-radix implementation rather than the radix-2 algorithm the
theorems analyse, :func:`toeplitz_hash` also *measures* the distance of every output
coefficient from the nearest integer and refuses (raises :class:`ToeplitzPrecisionError`) if
it exceeds ``0.25`` — it fails closed rather than returning a possibly wrong hash. In
practice the observed distance is ~1e-9.

The naive dense product :func:`toeplitz_hash_naive` is an independent reference for tests
(small sizes only: it builds the whole matrix).
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from qkdstack.errors import QKDError

__all__ = ["MAX_ROUNDING_ERROR", "ToeplitzPrecisionError", "toeplitz_hash", "toeplitz_hash_naive"]

MAX_ROUNDING_ERROR = 0.25
"""Largest accepted distance of an FFT output from the nearest integer (true values are integers)."""


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


def toeplitz_hash(key_bits: np.ndarray, seed_bits: np.ndarray, m: int) -> np.ndarray:
    """Return ``T @ key mod 2`` as a uint8 0/1 array of ``m`` bits (unpacked), ``T[i,j] = seed[i-j+n-1]``.

    ``key_bits`` (``n`` bits) and ``seed_bits`` (``n + m - 1`` bits) are 0/1 arrays of any
    integer or bool dtype. Computed with one real FFT convolution in binary64; exact by the
    bound in the module docstring, and checked at run time (:class:`ToeplitzPrecisionError`).
    """
    key, seed, n = _check_args(key_bits, seed_bits, m)
    size = scipy.fft.next_fast_len(n + m - 1, real=True)
    spectrum = scipy.fft.rfft(seed.astype(np.float64), size)
    spectrum *= scipy.fft.rfft(key.astype(np.float64), size)
    middle = scipy.fft.irfft(spectrum, size, overwrite_x=True)[n - 1 : n - 1 + m]
    nearest = np.rint(middle)
    if m and float(np.max(np.abs(middle - nearest))) > MAX_ROUNDING_ERROR:
        raise ToeplitzPrecisionError("FFT convolution rounding error exceeds 0.25; refusing an inexact hash")
    return (nearest.astype(np.int64) & 1).astype(np.uint8)


def toeplitz_hash_naive(key_bits: np.ndarray, seed_bits: np.ndarray, m: int) -> np.ndarray:
    """Reference ``T @ key mod 2`` by building the dense ``m x n`` matrix (tests only; small sizes)."""
    key, seed, n = _check_args(key_bits, seed_bits, m)
    rows = np.arange(m)[:, None]
    cols = np.arange(n)[None, :]
    matrix = seed.astype(np.uint8)[rows - cols + n - 1]
    return (np.bitwise_and(matrix, key.astype(np.uint8)[None, :]).sum(axis=1, dtype=np.int64) & 1).astype(np.uint8)
