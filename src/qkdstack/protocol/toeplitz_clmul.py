"""Toeplitz matrix-vector products over GF(2) on packed 64-bit words, with the CPU's carry-less multiply.

A square Toeplitz matrix of ``64 K`` bits per side is given by its ``128 K`` diagonal bits
``t``, ``T[i, j] = t[i - j + 64K - 1]``, and ``T @ v`` is bits ``64K - 1 .. 128K - 2`` of the
GF(2)[x] product ``t * v`` (a *middle product*). Bit ``b`` of word ``w`` of a packed array is
bit ``64 w + b`` of the vector (``np.packbits(bits, bitorder="little").view("<u8")``); the top
diagonal bit ``t[128K - 1]`` is never read.

Algorithm: the three-products split of a Toeplitz product (the transpose of Karatsuba's
multiplication; e.g. Fan and Hasan, IEEE Trans. Computers 56, 224 (2007), Sect. 3). With
``T = [[T1, T0], [T2, T1]]`` in blocks of half the size and ``v = (v0, v1)``, over GF(2)

    P0 = T1 (v0 + v1),   P1 = (T0 + T1) v1,   P2 = (T2 + T1) v0,   T v = (P0 + P1, P0 + P2),

where ``T0 + T1`` and ``T2 + T1`` are Toeplitz again (XOR of their diagonals), so the cost
is ``3 T(K/2) + O(K)`` -- that of one Karatsuba product, half that of the full product of the
two ``t`` halves with ``v``. Blocks of at most :data:`LEAF_WORDS` words compute just the
needed columns of ``t * v``: column ``c`` is the XOR of the 128-bit carry-less products
``v[j] * t[c - j]``, made with ``PCLMULQDQ`` (two columns per instruction with the 256-bit
``VPCLMULQDQ`` where the CPU has it) and accumulated in a vector register by LLVM loops
emitted through Numba (:func:`_clmul_dot`, :func:`_clmul_dot2`). Every step is exact; the
tests compare with the dense product.

The instruction exists on every x86-64 CPU since 2010 (Intel Westmere, AMD Bulldozer);
:data:`AVAILABLE` is false elsewhere (e.g. on ARM), and :mod:`qkdstack.protocol.toeplitz`
then uses its floating-point FFT.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["AVAILABLE", "LEAF_WORDS", "toeplitz_times"]

_FEATURES = llvm.get_host_cpu_features()
AVAILABLE = bool(_FEATURES.get("pclmul", False)) and llvm.get_process_triple().startswith("x86_64")
"""Whether this CPU has the carry-less multiply instruction the kernels are compiled to."""

_WIDE = AVAILABLE and bool(_FEATURES.get("vpclmulqdq", False)) and bool(_FEATURES.get("avx", False))
"""Whether it also has the 256-bit form (two products per instruction; AMD Zen 3+, Intel Ice Lake+)."""

LEAF_WORDS = 32
"""Products of at most this many words (per side) are computed column by column (measured best)."""


_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_V2, _V4 = ir.VectorType(_I64, 2), ir.VectorType(_I64, 4)


def _xor_sum_loop(context, builder, signature, args, lanes: int, term) -> list:
    """Emit ``acc = XOR over t < count of term(a_t, b_t)`` as an LLVM loop; return the accumulator's words.

    ``args`` are ``(a, ia, b, ib, count)``; ``a_t`` points at ``a[ia + t]``, ``b_t`` at
    ``b[ib - t]``. ``term`` emits the ``lanes``-word carry-less product(s) of one step; the
    accumulator stays in a vector register across the loop.
    """
    a_arr = context.make_array(signature.args[0])(context, builder, args[0])
    b_arr = context.make_array(signature.args[2])(context, builder, args[2])
    acc_type = ir.VectorType(_I64, lanes)
    base_a = builder.gep(a_arr.data, [args[1]])
    base_b = builder.gep(b_arr.data, [args[3]])
    entry = builder.block
    head = builder.append_basic_block("clmul.head")
    body = builder.append_basic_block("clmul.body")
    done = builder.append_basic_block("clmul.done")
    builder.branch(head)
    builder.position_at_end(head)
    t = builder.phi(_I64)
    acc = builder.phi(acc_type)
    t.add_incoming(ir.Constant(_I64, 0), entry)
    acc.add_incoming(ir.Constant(acc_type, [ir.Constant(_I64, 0)] * lanes), entry)
    builder.cbranch(builder.icmp_signed("<", t, args[4]), body, done)
    builder.position_at_end(body)
    product = term(builder, builder.gep(base_a, [t]), builder.gep(base_b, [builder.neg(t)]))
    t.add_incoming(builder.add(t, ir.Constant(_I64, 1)), body)
    acc.add_incoming(builder.xor(acc, product), body)
    builder.branch(head)
    builder.position_at_end(done)
    return [builder.extract_element(acc, ir.Constant(_I32, j)) for j in range(lanes)]


def _pclmul(builder, x, y, selector: int):
    """One ``PCLMULQDQ``: the 128-bit product of the 64-bit halves of ``x``, ``y`` that ``selector`` picks."""
    fn = builder.module.declare_intrinsic("llvm.x86.pclmulqdq", fnty=ir.FunctionType(_V2, [_V2, _V2, _I8]))
    return builder.call(fn, [x, y, ir.Constant(_I8, selector)])


@intrinsic
def _clmul_dot(typingctx, a, ia, b, ib, count):
    """XOR over ``t < count`` of ``clmul(a[ia + t], b[ib - t])``, returned as ``(low, high)`` words.

    One ``PCLMULQDQ`` and one ``PXOR`` per term. Indices are not bounds-checked: callers stay
    inside both arrays.
    """
    sig = types.UniTuple(types.uint64, 2)(a, types.intp, b, types.intp, types.intp)

    def term(builder, a_t, b_t):
        undef = ir.Constant(_V2, ir.Undefined)
        x = builder.insert_element(undef, builder.load(a_t), ir.Constant(_I32, 0))
        y = builder.insert_element(undef, builder.load(b_t), ir.Constant(_I32, 0))
        return _pclmul(builder, x, y, 0x00)

    def codegen(context, builder, signature, args):
        words = _xor_sum_loop(context, builder, signature, args, 2, term)
        return context.make_tuple(builder, signature.return_type, words)

    return sig, codegen


@intrinsic
def _clmul_dot2(typingctx, a, ia, b, ib, count):
    """Two adjacent columns: XOR over ``t < count`` of ``a[ia + t] * b[ib - t]`` and of ``a[ia + t] * b[ib - t + 1]``.

    Returns ``(low_k, high_k, low_k1, high_k1)``. With 256-bit ``VPCLMULQDQ`` one instruction
    makes both products (``a[ia + t]`` broadcast, the pair ``b[ib - t], b[ib - t + 1]`` from one
    128-bit load); without it, two ``PCLMULQDQ``. No bounds checks.
    """
    sig = types.UniTuple(types.uint64, 4)(a, types.intp, b, types.intp, types.intp)
    lanes = ir.VectorType(_I32, 4)

    def term(builder, a_t, b_t):
        x = builder.load(a_t)
        pair = builder.load(builder.bitcast(b_t, _V2.as_pointer()), align=8)
        undef2, undef4 = ir.Constant(_V2, ir.Undefined), ir.Constant(_V4, ir.Undefined)
        if not _WIDE:
            xs = builder.insert_element(undef2, x, ir.Constant(_I32, 0))
            low, high = _pclmul(builder, xs, pair, 0x00), _pclmul(builder, xs, pair, 0x10)
            return builder.shuffle_vector(low, high, ir.Constant(lanes, [0, 1, 2, 3]))
        wide = builder.module.declare_intrinsic("llvm.x86.pclmulqdq.256", fnty=ir.FunctionType(_V4, [_V4, _V4, _I8]))
        xs = builder.insert_element(undef4, x, ir.Constant(_I32, 0))
        xs = builder.shuffle_vector(xs, undef4, ir.Constant(lanes, [0, 0, 0, 0]))
        ys = builder.shuffle_vector(pair, undef2, ir.Constant(lanes, [0, 0, 1, 1]))
        return builder.call(wide, [xs, ys, ir.Constant(_I8, 0)])

    def codegen(context, builder, signature, args):
        words = _xor_sum_loop(context, builder, signature, args, 4, term)
        return context.make_tuple(builder, signature.return_type, words)

    return sig, codegen


@njit(cache=True, nogil=True)
def _leaf(t: np.ndarray, v: np.ndarray, k: int, out: np.ndarray) -> None:
    """``out[:k] = T @ v`` for ``k`` words per side: words ``k - 1 .. 2k - 1`` of ``t * v``, shifted by 63 bits.

    Column ``c >= k - 1`` of ``t * v`` is the XOR of ``v[j] * t[c - j]`` for all ``j < k``;
    product word ``c`` is the low half of column ``c`` XOR the high half of column ``c - 1``.
    """
    carry = np.uint64(0)  # high half of the previous column
    if k >= 2:
        _, carry = _clmul_dot(v, 0, t, k - 2, k - 1)
    previous = np.uint64(0)
    c = k - 1
    while c <= 2 * k - 1:
        if c + 1 <= 2 * k - 1:
            low0, high0, low1, high1 = _clmul_dot2(v, 0, t, c, k)
            words = (low0 ^ carry, low1 ^ high0)
            carry = high1
            width = 2
        else:
            low0, high0 = _clmul_dot(v, 0, t, c, k)
            words = (low0 ^ carry, np.uint64(0))
            carry = high0
            width = 1
        for i in range(width):
            word = words[i]
            if c + i >= k:
                out[c + i - k] = (previous >> np.uint64(63)) | (word << np.uint64(1))
            previous = word
        c += width


@njit("void(uint64[::1], uint64[::1], int64, uint64[::1], uint64[::1])", cache=True, nogil=True)
def _product(t, v, k, out, scratch):
    """``out[:k] = T @ v`` by the three-products split; ``scratch`` holds at least ``4k`` words."""
    if k <= LEAF_WORDS or k % 2:
        _leaf(t, v, k, out)
        return
    h = k // 2
    v_sum = scratch[:h]
    p0 = scratch[h : 2 * h]
    diagonal = scratch[2 * h : 4 * h]
    deeper = scratch[4 * h :]
    for i in range(h):
        v_sum[i] = v[i] ^ v[h + i]
    _product(t[h : 3 * h], v_sum, h, p0, deeper)
    for i in range(2 * h):
        diagonal[i] = t[i] ^ t[h + i]
    _product(diagonal, v[h:k], h, out[:h], deeper)
    for i in range(2 * h):
        diagonal[i] = t[2 * h + i] ^ t[h + i]
    _product(diagonal, v[:h], h, out[h:k], deeper)
    for i in range(h):
        out[i] ^= p0[i]
        out[h + i] ^= p0[i]
    v_sum[:] = 0
    p0[:] = 0


def _leaf_task(t: np.ndarray, v: np.ndarray) -> np.ndarray:
    """One sub-product on a worker thread, with its own scratch (zeroed again: it held key-dependent words)."""
    out = np.empty(v.size, np.uint64)
    scratch = np.zeros(4 * v.size + 64, np.uint64)
    _product(t, v, v.size, out, scratch)
    scratch[:] = 0
    return out


_THREADS = ThreadPoolExecutor(2, thread_name_prefix="toeplitz")
"""Two threads share the sub-products of the top levels (the Numba kernels release the GIL)."""


def _fresh_threads_after_fork() -> None:
    """A forked child inherits the pool's bookkeeping but not its threads: give it a new pool."""
    global _THREADS
    _THREADS = ThreadPoolExecutor(2, thread_name_prefix="toeplitz")


os.register_at_fork(after_in_child=_fresh_threads_after_fork)


def _split(t: np.ndarray, v: np.ndarray, depth: int) -> Callable[[], np.ndarray]:
    """Submit the ``3^depth`` sub-products of the top ``depth`` splits; return the function that combines them."""
    k = v.size
    if depth == 0 or k <= 2 * LEAF_WORDS or k % 2:
        future = _THREADS.submit(_leaf_task, t, v)
        return future.result
    h = k // 2
    v_sum = v[:h] ^ v[h:]
    p0 = _split(t[h : 3 * h], v_sum, depth - 1)
    p1 = _split(t[: 2 * h] ^ t[h : 3 * h], v[h:], depth - 1)
    p2 = _split(t[2 * h :] ^ t[h : 3 * h], v[:h], depth - 1)

    def combine() -> np.ndarray:
        first = p0()
        parts = (p1(), p2())
        out = np.concatenate([first ^ parts[0], first ^ parts[1]])
        for array in (first, *parts, v_sum):
            array[:] = 0
        return out

    return combine


def toeplitz_times(t: np.ndarray, v: np.ndarray, depth: int = 2) -> np.ndarray:
    """``T @ v`` (``K`` words) for ``v`` of ``K`` words and the ``2K``-word diagonal ``t``; exact.

    The top ``depth`` levels of the split run as ``3^depth`` tasks on two threads. ``K`` should
    be ``LEAF_WORDS``-sized times a power of two (a block with an odd word count is done by the
    quadratic column method).
    """
    if not AVAILABLE:
        raise RuntimeError("this CPU has no carry-less multiply instruction")
    t = np.ascontiguousarray(t, np.uint64)
    v = np.ascontiguousarray(v, np.uint64)
    if t.size != 2 * v.size:
        raise ValueError(f"a Toeplitz product of {v.size} words needs {2 * v.size} diagonal words, got {t.size}")
    if v.size == 0:
        return np.zeros(0, np.uint64)
    return _split(t, v, depth)()
